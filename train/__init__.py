"""Training: recipes, model families, data, metrics and the trainer."""

"""Task metrics: VQAv2's official accuracy, and COCO caption metrics through pycocoevalcap's scorers."""

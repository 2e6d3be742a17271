"""Export: merge adapters, write GGUF (LLM) and ONNX (vision + bridge), bundle with a self-check."""

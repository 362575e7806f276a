"""Text to vectors: model files, the ONNX Runtime encoder, chunking."""

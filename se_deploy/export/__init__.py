"""Checkpoint to clean ONNX: the exporter, the SE graph pass, simplification and metadata."""

"""se-deploy: deployment toolchain for SE-YOLOv5 detectors (ONNX, ONNX Runtime, TensorRT)."""

__version__ = "0.1.0"

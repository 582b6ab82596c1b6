"""Precision made explicit in the ONNX: FP16/INT8 quantization, calibration data, the mAP budget search."""

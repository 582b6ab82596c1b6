"""Serving on NVIDIA Triton Inference Server: model configs, the model repository, a local tritonserver."""

"""PyTorch runner for YOLOv5 checkpoints (.pt), loaded through the safe checkpoint loader."""

from __future__ import annotations

import numpy as np

from se_deploy.errors import SeDeployError
from se_deploy.runners.base import Runner


class TorchRunner(Runner):
    """Runs a fused FP32 (or FP16 on CUDA with ``half``) DetectionModel."""

    backend = "pytorch"

    def __init__(self, path, device: str | None = None, half: bool = False, trust: bool = False, cfg=None):
        super().__init__(path)
        self._requested_device = device
        self._half = half
        self._trust = trust
        self._cfg = cfg
        self.model = None

    def _activate(self) -> None:
        try:
            import torch
        except ImportError:
            raise SeDeployError("PyTorch is not installed: pip install torch (needed for .pt models)") from None
        from se_deploy.checkpoint import load_checkpoint

        device = self._requested_device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device != "cpu" and not device.startswith("cuda"):
            raise SeDeployError(f"--device {device}: a .pt checkpoint runs on PyTorch, on cpu or cuda[:N]")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SeDeployError(f"--device {device}: PyTorch sees no CUDA GPU")
        if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
            raise SeDeployError(f"--device {device}: PyTorch sees {torch.cuda.device_count()} CUDA GPU(s)")
        if self._half and not device.startswith("cuda"):
            raise SeDeployError("FP16 PyTorch inference needs a CUDA device")
        loaded = load_checkpoint(self.path, cfg=self._cfg, trust=self._trust)
        self.model = loaded.model.to(device)
        if self._half:
            self.model.half()
        self._torch = torch
        self.device = device
        self.precision = "fp16" if self._half else "fp32"
        self.names = loaded.names
        self.stride = max(loaded.stride)
        self.input_shape = (None, 3, None, None)

    def _deactivate(self) -> None:
        self.model = None

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
        if self._half:
            x = x.half()
        with torch.inference_mode():
            pred = self.model(x)[0]
        return pred.float().cpu().numpy()

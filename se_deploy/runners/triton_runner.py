"""Triton runner: a detector served by Triton Inference Server, over gRPC or HTTP (tritonclient).

``grpc://HOST:PORT/NAME`` or ``http://HOST:PORT/NAME`` names the model. Activation checks that the
server answers and the model is ready, and reads its config: input and output, the largest batch, and
the class names, stride and precision ``se-deploy triton`` wrote there. Batches larger than the model's
``max_batch_size`` go in several requests. A server that stops answering mid-run raises
``ModelServerLostError``, which ``infer`` treats like a lost stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from se_deploy.errors import ModelServerLostError, SeDeployError, first_line
from se_deploy.runners.base import Runner

SCHEMES = ("grpc", "http")
URL_PATTERN = re.compile(r"(grpc|http)://([^/:]+|\[[^\]]+\]):(\d+)/([^/]+)/?")
TIMEOUT_S = 60.0  # one request; a server that takes longer is taken as lost
NUMPY_TYPES = {"FP32": np.float32, "FP16": np.float16}
DTYPE_NAMES = {"TYPE_FP32": "FP32", "TYPE_FP16": "FP16"}


@dataclass(frozen=True)
class ModelURL:
    """Where a Triton model is; ``name`` is the model's name, so messages read ``NAME: ...`` like a file's."""

    scheme: str
    host: str
    port: int
    name: str

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.address}/{self.name}"


def is_model_url(spec) -> bool:
    """Whether a --model value names a Triton model rather than a file."""
    return isinstance(spec, str) and spec.lower().startswith(tuple(f"{s}://" for s in SCHEMES))


def parse_model_url(spec: str) -> ModelURL:
    match = URL_PATTERN.fullmatch(spec.strip())
    if not match or not 0 < int(match.group(3)) < 65536:
        raise SeDeployError(f"--model {spec}: expected grpc://HOST:PORT/NAME or http://HOST:PORT/NAME")
    scheme, host, port, name = match.groups()
    return ModelURL(scheme, host, int(port), name)


def _client_module(scheme: str):
    try:
        if scheme == "grpc":
            import tritonclient.grpc as client
        else:
            import tritonclient.http as client
    except ImportError:
        raise SeDeployError("tritonclient is not installed: pip install 'se-deploy[triton]'") from None
    return client


def _reason(error: BaseException) -> str:
    text = error.message() if hasattr(error, "message") and callable(error.message) else str(error)
    return first_line(text)


class TritonRunner(Runner):
    """Runs a detector a Triton server serves (the models ``se-deploy triton`` writes, or any YOLOv5 one)."""

    backend = "triton"

    def __init__(self, spec: str, device: str | None = None, timeout: float = TIMEOUT_S):
        super().__init__(spec)
        if device is not None:
            raise SeDeployError(f"--device {device}: a Triton model runs where its server puts it; leave --device out")
        self.path = parse_model_url(spec)
        self._timeout = timeout
        self.client = None
        self.max_batch = 0

    def _activate(self) -> None:
        url = self.path
        module = _client_module(url.scheme)
        self._module = module
        try:
            if url.scheme == "grpc":
                self.client = module.InferenceServerClient(url.address)
            else:
                self.client = module.InferenceServerClient(url.address, connection_timeout=10.0,
                                                           network_timeout=self._timeout)
            live = self.client.is_server_live()
        except Exception as e:  # tritonclient raises its own and its transports' exception types
            raise SeDeployError(f"{url}: no Triton server answers at {url.address} ({_reason(e)})") from None
        if not live:
            raise SeDeployError(f"{url}: the Triton server at {url.address} is not live")
        try:
            ready = self.client.is_model_ready(url.name)
            config = self._config() if ready else None
        except Exception as e:
            raise SeDeployError(f"{url}: the server answered but not about the model ({_reason(e)})") from None
        if not ready:
            raise SeDeployError(f"{url}: model '{url.name}' is not ready on the server (served: "
                                f"{', '.join(self._ready_models()) or 'none'})")
        self._read(config)

    def _config(self) -> dict:
        if self.path.scheme == "grpc":
            return self.client.get_model_config(self.path.name, as_json=True)["config"]
        return self.client.get_model_config(self.path.name)

    def _ready_models(self) -> list[str]:
        try:
            index = self.client.get_model_repository_index(**({"as_json": True} if self.path.scheme == "grpc" else {}))
        except Exception:  # only for the message
            return []
        models = index.get("models", []) if isinstance(index, dict) else index
        return sorted(m["name"] for m in models if m.get("state") == "READY")

    def _read(self, config: dict) -> None:
        """Input, output, batch and metadata from the model's config (JSON form, as both protocols give it)."""
        from se_deploy.runners.onnxruntime_runner import parse_names
        from se_deploy.serving.model_config import PARAMETER_PREFIX

        params = {k[len(PARAMETER_PREFIX):]: v.get("string_value", "")
                  for k, v in config.get("parameters", {}).items() if k.startswith(PARAMETER_PREFIX)}
        inputs, outputs = config.get("input", []), config.get("output", [])
        if params.get("role") == "e2e" or any(i.get("data_type") == "TYPE_STRING" for i in inputs):
            raise SeDeployError(f"{self.path}: an end-to-end model (image bytes in, detections out); --model takes "
                                f"the detector it wraps (the name without _e2e)")
        if len(inputs) != 1 or len(outputs) != 1:
            raise SeDeployError(f"{self.path}: expected one input and one output, found {len(inputs)} and {len(outputs)}")
        (inp,), (out,) = inputs, outputs
        self.max_batch = int(config.get("max_batch_size", 0))
        dims = [int(d) for d in inp.get("dims", [])]
        dims = dims if self.max_batch == 0 else [-1, *dims]
        out_dims = [int(d) for d in out.get("dims", [])]
        if len(dims) != 4 or dims[1] != 3 or len(out_dims) != (2 if self.max_batch else 3):
            raise SeDeployError(f"{self.path}: not a YOLOv5 detector (input {dims}, output {out_dims})")
        for tensor in (inp, out):
            if tensor.get("data_type") not in DTYPE_NAMES:
                raise SeDeployError(f"{self.path}: '{tensor['name']}' is {tensor.get('data_type')}; expected FP32/FP16")
        self.input_name, self._output_name = inp["name"], out["name"]
        self._input_type = DTYPE_NAMES[inp["data_type"]]
        self.input_shape = tuple(d if d > 0 else None for d in dims)
        self.names = parse_names(params.get("names"), out_dims[-1] - 5 if out_dims[-1] > 5 else 0)
        self.stride = int(params.get("stride") or 32)
        self.precision = params.get("precision") or "unknown"
        self.device = f"triton {self.path.address} ({config.get('platform') or config.get('backend')})"
        self.metadata = {k: v for k, v in params.items() if k in ("source_sha256", "source")}

    def _deactivate(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = None

    def _request(self, batch: np.ndarray) -> np.ndarray:
        module = self._module
        inp = module.InferInput(self.input_name, list(batch.shape), self._input_type)
        inp.set_data_from_numpy(np.ascontiguousarray(batch, NUMPY_TYPES[self._input_type]))
        wanted = [module.InferRequestedOutput(self._output_name)]
        try:
            if self.path.scheme == "grpc":
                result = self.client.infer(self.path.name, [inp], outputs=wanted, client_timeout=self._timeout)
            else:
                result = self.client.infer(self.path.name, [inp], outputs=wanted)
            pred = result.as_numpy(self._output_name)
        except Exception as e:  # a refused request, or a server that went away
            raise self._failure(e) from None
        if pred is None or pred.shape[0] != len(batch):
            raise SeDeployError(f"{self.path}: the server answered without the output '{self._output_name}' "
                                f"for {len(batch)} images")
        return pred.astype(np.float32, copy=False)

    def _failure(self, error: BaseException) -> SeDeployError:
        """Lost (the server or the model is gone) or refused (the server still serves and said why)."""
        try:
            serving = self.client.is_server_live() and self.client.is_model_ready(self.path.name)
        except Exception:
            serving = False
        if not serving:
            return ModelServerLostError(f"{self.path}: the Triton server stopped answering ({_reason(error)})")
        return SeDeployError(f"{self.path}: the server refused the request ({_reason(error)})")

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        size = self.max_batch or len(batch)
        if len(batch) <= size:
            return self._request(batch)
        return np.concatenate([self._request(batch[i : i + size]) for i in range(0, len(batch), size)])

"""Safe loading of YOLOv5 checkpoints (``weights.pt``) into this repo's ``models`` classes.

A checkpoint is a pickle, and a pickle can name any callable. ``load_checkpoint`` unpickles with an
allowlist: tensor rebuilders, ``torch.nn`` layers, the ``models.*`` network classes, plain containers,
numpy arrays, ``_codecs.encode`` only as pickles use it for bytes, and ``getattr`` only to bind a fused
forward method. A fork's own ``models.common``/``models.yolo`` class becomes an inert placeholder that
``se_deploy.se_forms`` rebuilds as our module when it is a known SE form. Any other global is refused
before it is called, with its name (and, inside a fork's class, that class and its layers) in the error.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from se_deploy.errors import SeDeployError, first_line
from se_deploy.se_forms import TRUST_HINT, Placeholder, class_name, describe_children, placeholder_class

# (module, name) pairs that may be resolved besides nn layers and models.* classes.
_SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
    ("torch", "device"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
}
# WindowsPath (in 'opt' of checkpoints saved on Windows) cannot be built on Linux; its pure twin can.
_RENAMED_GLOBALS = {("pathlib", "WindowsPath"): ("pathlib", "PureWindowsPath")}
_NETWORK_MODULES = ("models.yolo", "models.common", "models.se_blocks")
# The only methods a pickle may bind with getattr: YOLOv5's fuse() sets ``forward`` to one of them.
_BINDABLE_METHODS = frozenset({"fuseforward", "forward_fuse"})


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle asked for a global outside the allowlist (``inside``: the fork class whose state held it)."""

    def __init__(self, qualified_name: str, inside: Placeholder | None = None):
        super().__init__(qualified_name)
        self.qualified_name, self.inside = qualified_name, inside


def _allowed_global(module: str, name: str, unpickler: _AllowlistUnpickler):
    """Resolve ``module.name`` if it is on the allowlist; a fork's network class becomes a placeholder;
    anything else is refused (``unpickler.refuse``)."""
    import importlib

    import torch
    from torch import nn

    if module == "__builtin__":  # protocol-2 pickles use Python 2's module name
        module = "builtins"
    module, name = _RENAMED_GLOBALS.get((module, name), (module, name))
    if (module, name) in _SAFE_GLOBALS:
        return getattr(importlib.import_module(module), name)
    if (module, name) == ("_codecs", "encode"):
        return unpickler.latin1_bytes
    if (module, name) == ("builtins", "getattr"):
        return unpickler.bind_method
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if module.startswith("torch.nn.modules.") or module in _NETWORK_MODULES:
        candidate = getattr(importlib.import_module(module), name, None)
        if isinstance(candidate, type) and issubclass(candidate, nn.Module):
            return candidate
        if candidate is None and module in _NETWORK_MODULES and name.isidentifier():
            return placeholder_class(f"{module}.{name}", unpickler.reading)
    return unpickler.refuse(f"{module}.{name}")


class _AllowlistUnpickler(pickle.Unpickler):
    def __init__(self, file, **kwargs):
        super().__init__(file, **kwargs)
        self.reading: list[Placeholder] = []  # fork classes whose state is being read, innermost last
        self.refused: list[tuple[str, Placeholder]] = []

    def find_class(self, module, name):
        return _allowed_global(module, name, self)

    def load(self):
        result = super().load()
        if self.refused:
            raise RefusedGlobal(*self.refused[0])
        return result

    def refuse(self, qualified_name: str):
        """Refuse a global: at once, or inside a fork class's state once that state is read (so the error
        can list the class's layers). Either way it is never called: an inert stand-in takes its place."""
        if not self.reading:
            raise RefusedGlobal(qualified_name)
        self.refused.append((qualified_name, self.reading[-1]))
        return placeholder_class(qualified_name)

    def latin1_bytes(self, text, encoding="latin1"):
        """``_codecs.encode`` as protocol-2 pickles use it to store bytes; no other use."""
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            return self.refuse(f"_codecs.encode(..., {encoding!r})")()
        return text.encode("latin1")

    def bind_method(self, obj, name):
        """``getattr`` only to bind a fused forward method of one of our network classes."""
        from torch import nn

        if name in _BINDABLE_METHODS and isinstance(obj, nn.Module) and callable(getattr(type(obj), name, None)):
            return getattr(obj, name)
        return self.refuse(f"builtins.getattr({class_name(obj)}, {str(name)[:40]!r})")()


def _allowlist_load(file, **kwargs):
    return _AllowlistUnpickler(file, **kwargs).load()


# torch.load accepts any object with pickle's Unpickler/load interface as its pickle module.
_ALLOWLIST_PICKLE = SimpleNamespace(__name__="se_deploy_allowlist", Unpickler=_AllowlistUnpickler, load=_allowlist_load)


@dataclass
class LoadedModel:
    """A model ready for inference plus facts about where it came from."""

    model: object  # models.yolo.DetectionModel, fused, FP32, eval mode
    source_format: str  # 'checkpoint-dict (ema)', 'checkpoint-dict (model)', 'pickled-model', 'state_dict+yaml'
    path: Path
    extras: dict = field(default_factory=dict)  # epoch, date, git... when the checkpoint has them

    @property
    def names(self) -> dict[int, str]:
        return normalize_names(getattr(self.model, "names", None), self.model.model[-1].nc)

    @property
    def stride(self) -> list[int]:
        return [int(s) for s in self.model.stride.tolist()]


def normalize_names(names, nc: int) -> dict[int, str]:
    """Class names as ``{index: name}`` whatever form the checkpoint stored (list, dict, none)."""
    if isinstance(names, dict):
        return {int(k): str(v) for k, v in names.items()}
    if isinstance(names, (list, tuple)):
        return dict(enumerate(map(str, names)))
    return {i: f"class{i}" for i in range(nc)}


def _check_container(path: Path) -> None:
    """torch.save writes a zip holding ``<root>/data.pkl`` (or, before torch 1.6, a bare pickle):
    refuse anything else with a plain reason instead of torch's internal error text."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            raise SeDeployError(f"{path}: damaged zip archive, not a readable PyTorch checkpoint") from None
        if not any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
            raise SeDeployError(f"{path}: a zip archive without data.pkl, not a PyTorch checkpoint")
        return
    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"PK":
        raise SeDeployError(f"{path}: truncated or damaged zip archive, not a readable PyTorch checkpoint")
    if len(head) < 2 or head[0] != 0x80 or not 2 <= head[1] <= 5:  # a pickle starts with PROTO 2-5
        raise SeDeployError(f"{path}: not a PyTorch checkpoint (neither torch.save's zip format nor a pickle)")


def _read_pickle(path: Path, trust: bool):
    import torch

    if path.stat().st_size == 0:
        raise SeDeployError(f"{path}: file is empty, not a PyTorch checkpoint")
    if path.suffix.lower() == ".onnx":
        raise SeDeployError(f"{path}: this is an ONNX model; give a PyTorch checkpoint (.pt) here")
    _check_container(path)
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_ALLOWLIST_PICKLE)
    except RefusedGlobal as e:
        inside = f" inside {e.inside.pickled_name} ({describe_children(e.inside)})" if e.inside else ""
        raise SeDeployError(
            f"{path}: refused to unpickle global '{e.qualified_name}'{inside}: not a YOLOv5 network class, "
            f"nothing was run; {TRUST_HINT}"
        ) from None
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError, TypeError,
            KeyError) as e:
        raise SeDeployError(f"{path}: not a readable PyTorch checkpoint ({first_line(e).split('. ')[0]})") from None
    except (AttributeError, ModuleNotFoundError, ImportError) as e:
        raise SeDeployError(f"{path}: checkpoint needs code se-deploy does not have ({e})") from None


def _model_from_state_dict(state: dict, cfg: Path | None, path: Path):
    from models.yolo import DetectionModel

    if cfg is None:
        raise SeDeployError(f"{path}: holds only a state_dict; pass --cfg MODEL.yaml to say which network it is")
    if not cfg.is_file():
        raise SeDeployError(f"{cfg}: model YAML not found")
    try:
        model = DetectionModel(cfg)
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    except (ValueError, KeyError, RuntimeError) as e:
        raise SeDeployError(f"{path}: state_dict does not fit {cfg.name} ({first_line(e)})") from None
    if missing or unexpected:
        raise SeDeployError(
            f"{path}: state_dict does not fit {cfg.name} "
            f"({len(missing)} missing keys, e.g. {missing[:1]}; {len(unexpected)} unexpected, e.g. {unexpected[:1]})"
        )
    return model


def _pick_model(obj, cfg: Path | None, path: Path):
    """Find the network inside whatever the pickle held; return (model, source_format, extras)."""
    import torch
    from torch import nn

    modules = (nn.Module, Placeholder)
    if isinstance(obj, modules):
        return obj, "pickled-model", {}
    if not isinstance(obj, dict):
        raise SeDeployError(f"{path}: holds a {type(obj).__name__}, not a YOLOv5 checkpoint")
    extras = {k: obj[k] for k in ("epoch", "date", "best_fitness") if k in obj and not isinstance(obj[k], modules)}
    for key in ("ema", "model"):
        if isinstance(obj.get(key), modules):
            return obj[key], f"checkpoint-dict ({key})", extras
    state = obj.get("state_dict", obj)
    if state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return _model_from_state_dict(state, cfg, path), "state_dict+yaml", extras
    raise SeDeployError(f"{path}: checkpoint holds no model (keys: {', '.join(map(str, list(obj)[:8]))})")


def _restore_defaults(model) -> None:
    """Give modules from older pickles the attributes current code expects."""
    import torch
    from torch import nn

    from models.yolo import Detect

    for m in model.modules():
        if isinstance(m, Detect) and not isinstance(m.anchor_grid, list):
            m.anchor_grid = [torch.empty(0) for _ in range(m.nl)]
            m.grid = [torch.empty(0) for _ in range(m.nl)]
        elif isinstance(m, nn.Upsample) and not hasattr(m, "recompute_scale_factor"):
            m.recompute_scale_factor = None


def load_checkpoint(path: str | Path, *, cfg: str | Path | None = None, trust: bool = False, fuse: bool = True) -> LoadedModel:
    """Load a YOLOv5 checkpoint safely; return an FP32, eval-mode (and by default fused) model.

    Without ``trust``, a fork's SE classes are rebuilt as our modules (``se_deploy.se_forms``).
    """
    from models.yolo import DetectionModel
    from se_deploy.se_forms import rebuild_placeholders

    path = Path(path)
    if path.is_dir():
        raise SeDeployError(f"{path}: is a directory, not a checkpoint file")
    if not path.is_file():
        raise SeDeployError(f"{path}: checkpoint not found")
    obj = _read_pickle(path, trust)
    model, source_format, extras = _pick_model(obj, Path(cfg) if cfg else None, path)
    if not isinstance(model, DetectionModel) or not hasattr(model, "stride"):
        raise SeDeployError(f"{path}: model is a {class_name(model)}, not a YOLOv5 DetectionModel")
    if not trust:
        try:
            rebuild_placeholders(model)
        except SeDeployError as e:
            raise SeDeployError(f"{path}: {e}") from None
        except (AttributeError, TypeError, ValueError, RuntimeError, KeyError) as e:  # a malformed pickled state
            raise SeDeployError(f"{path}: a fork class's pickled layers are malformed "
                                f"({type(e).__name__}: {first_line(e)})") from None
    _restore_defaults(model)
    model = model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if fuse:
        model.fuse()
    return LoadedModel(model=model, source_format=source_format, path=path, extras=extras)

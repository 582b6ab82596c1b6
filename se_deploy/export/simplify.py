"""Simplify an ONNX model: onnxsim, else onnxslim; then lift leftover Constant nodes and drop dead nodes."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import onnx

from se_deploy.errors import SeDeployError, first_line


@dataclass
class Simplified:
    """The simplified model, which tool did it, and anything the user should hear about."""

    model: onnx.ModelProto
    tool: str  # 'onnxsim' or 'onnxslim'
    notices: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _captured_fds() -> Iterator[list[str]]:
    """Send what native code writes to stdout/stderr into a buffer (onnxsim's C++ warnings)."""
    sys.stdout.flush()
    sys.stderr.flush()
    text: list[str] = []
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield text
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            text.append(sink.read().decode(errors="replace"))


def _onnxsim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    with _captured_fds():
        simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise RuntimeError("its result failed its own check")
    return simplified


def _onnxslim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    with _captured_fds():
        return onnxslim.slim(model)


def tidy(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant nodes become initializers; unused nodes, initializers and opsets go; nodes in order."""
    import onnx_ir as ir
    from onnx_ir.passes.common import (
        LiftConstantsToInitializersPass,
        RemoveUnusedNodesPass,
        RemoveUnusedOpsetsPass,
        TopologicalSortPass,
    )

    graph_model = ir.from_proto(model)
    for step in (LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0), RemoveUnusedNodesPass(),
                 RemoveUnusedOpsetsPass(), TopologicalSortPass()):
        step(graph_model)
    return ir.to_proto(graph_model)


def _keep_metadata(simplified: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """The original's ``metadata_props`` only: the simplifiers add their own (onnxsim 19 ``onnxsim.*`` keys)."""
    del simplified.metadata_props[:]
    simplified.metadata_props.extend(original.metadata_props)
    return simplified


def simplify(model: onnx.ModelProto) -> Simplified:
    """Simplify with onnxsim; if it is missing or fails, with onnxslim (and say so in ``notices``).

    The result keeps the model's own metadata and nothing the simplifier adds about itself.
    """
    notices = []
    try:
        return Simplified(_keep_metadata(tidy(_onnxsim(model)), model), "onnxsim")
    except ImportError:
        notices.append("onnxsim is not installed; simplifying with onnxslim instead")
    except Exception as e:  # onnxsim raises many types (RuntimeError, onnx errors, C++ exceptions)
        notices.append(f"onnxsim failed ({first_line(e)}); simplifying with onnxslim instead")
    try:
        return Simplified(_keep_metadata(tidy(_onnxslim(model)), model), "onnxslim", notices)
    except ImportError:
        raise SeDeployError(
            "neither onnxsim nor onnxslim works here: pip install 'se-deploy[export]', or pass --no-simplify"
        ) from None
    except Exception as e:
        raise SeDeployError(f"onnxslim failed too ({first_line(e)}); pass --no-simplify to skip it") from None

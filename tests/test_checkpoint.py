"""Checkpoint loading: real fixture parity, every checkpoint shape users have, and safe refusal."""

from __future__ import annotations

import json
import pickle
from copy import deepcopy

import numpy as np
import pytest
import torch
import yaml
from conftest import CHECKPOINT, REFS, REPO, ref_input, run_cli

from models.yolo import DetectionModel
from se_deploy.checkpoint import load_checkpoint
from se_deploy.errors import SeDeployError

INPUTS = ["input_val3", "input_rand_seed0", "input_video_f0_f30"]


@pytest.mark.parametrize("name", INPUTS)
def test_fixture_checkpoint_reproduces_upstream_outputs(fixture_model, name):
    x = torch.from_numpy(ref_input(name))
    ref = np.load(REFS / "se-yolov5n-shapes" / f"raw_{name}.npy")
    with torch.no_grad():
        out = fixture_model.model(x)[0].numpy()
    assert out.shape == ref.shape
    # obj and class scores: absolute error
    assert np.abs(out[..., 4:] - ref[..., 4:]).max() <= 1e-4
    # boxes: in units of the input size (pixels / 320); FP32 kernels of two torch builds differ by ~1e-6 of that
    assert np.abs(out[..., :4] - ref[..., :4]).max() / x.shape[-1] <= 1e-4
    assert np.abs(out[..., :4] - ref[..., :4]).max() <= 1e-3


def test_fixture_facts(fixture_model):
    assert fixture_model.names == {0: "circle", 1: "rectangle", 2: "triangle"}
    assert fixture_model.stride == [8, 16, 32]
    assert fixture_model.source_format == "checkpoint-dict (model)"
    assert next(fixture_model.model.parameters()).dtype == torch.float32


def _save_checkpoint(model, path, **extra):
    ckpt = {"epoch": -1, "best_fitness": None, "model": deepcopy(model).half(), "ema": None, "updates": None,
            "optimizer": None, "opt": {}, "date": "test"}
    ckpt.update(extra)
    torch.save(ckpt, path)
    return path


def _se_everywhere_yaml() -> dict:
    """A tiny model with SE in the backbone and in the head, feeding two Detect levels."""
    return {
        "nc": 2, "depth_multiple": 0.33, "width_multiple": 0.25,
        "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119]],
        "backbone": [
            [-1, 1, "Conv", [64, 6, 2, 2]],
            [-1, 1, "Conv", [128, 3, 2]],
            [-1, 1, "SEAttention", [128]],
            [-1, 3, "C3", [128]],
            [-1, 1, "Conv", [256, 3, 2]],
            [-1, 1, "C3", [256]],
            [-1, 1, "SPPF", [256, 5]],
        ],
        "head": [
            [-1, 1, "SEAttention", [256, 8]],
            [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
            [[-1, 3], 1, "Concat", [1]],
            [-1, 1, "C3", [128, False]],
            [-1, 1, "SEAttention", [128]],
            [[11, 7], 1, "Detect", ["nc", "anchors"]],
        ],
    }


def _reference_output(model, size=64):
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    m = deepcopy(model).half().float().eval().fuse()
    with torch.no_grad():
        return x, m(x)[0]


@pytest.mark.parametrize("size", ["n", "s", "m", "l", "x"])
def test_every_size_with_se_loads_and_runs(tmp_path, size):
    model = DetectionModel(REPO / "models" / f"yolov5{size}-se.yaml", nc=4)
    se = [m for m in model.model if m.type.endswith("SEAttention")][0]
    width = model.yaml["width_multiple"]
    assert se.fc[0].in_features == int(1024 * width)  # the SE channel count follows width_multiple
    loaded = load_checkpoint(_save_checkpoint(model, tmp_path / f"{size}.pt"))
    x, expected = _reference_output(model)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x)[0], expected, atol=1e-3)


def test_se_in_backbone_and_head(tmp_path):
    model = DetectionModel(_se_everywhere_yaml())
    loaded = load_checkpoint(_save_checkpoint(model, tmp_path / "both.pt"))
    from se_deploy.model_info import se_blocks

    assert [(b["layer"], b["channels"], b["reduction"]) for b in se_blocks(loaded.model)] == [
        (2, 32, 16), (7, 64, 8), (11, 32, 16)]
    x, expected = _reference_output(model)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x)[0], expected, atol=1e-3)


def test_ema_is_preferred_and_fp16_loads_as_fp32(tmp_path):
    model = DetectionModel(_se_everywhere_yaml())
    other = DetectionModel(_se_everywhere_yaml())
    path = _save_checkpoint(other, tmp_path / "ema.pt", ema=deepcopy(model).half())
    loaded = load_checkpoint(path)
    assert loaded.source_format == "checkpoint-dict (ema)"
    assert next(loaded.model.parameters()).dtype == torch.float32
    x, expected = _reference_output(model)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x)[0], expected, atol=1e-3)


def test_pickled_model_and_state_dict_with_cfg(tmp_path):
    model = DetectionModel(_se_everywhere_yaml())
    torch.save(deepcopy(model).half(), tmp_path / "bare.pt")
    assert load_checkpoint(tmp_path / "bare.pt").source_format == "pickled-model"

    cfg = tmp_path / "model.yaml"
    cfg.write_text(yaml.safe_dump(_se_everywhere_yaml()))
    torch.save(deepcopy(model).half().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(SeDeployError, match="--cfg"):
        load_checkpoint(tmp_path / "sd.pt")
    loaded = load_checkpoint(tmp_path / "sd.pt", cfg=cfg)
    assert loaded.source_format == "state_dict+yaml"
    x, expected = _reference_output(model)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x)[0], expected, atol=1e-3)


def test_older_pickle_missing_attributes_gets_defaults(tmp_path):
    model = DetectionModel(_se_everywhere_yaml())
    old = deepcopy(model)
    head = old.model[-1]
    head.anchor_grid = torch.zeros(1)  # very old checkpoints stored one tensor, not a list
    del old.model[8].recompute_scale_factor  # nn.Upsample from an older torch
    head.__dict__.pop("inplace", None)
    _save_checkpoint(old, tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt")
    x, expected = _reference_output(model)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x)[0], expected, atol=1e-3)


class _Payload:
    """Pickles as a call to ``func(*args)``, as a malicious checkpoint would."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("kind", ["os.system", "builtins.open", "builtins.eval"])
def test_malicious_checkpoint_is_refused_before_it_runs(tmp_path, kind):
    import builtins
    import os

    marker = tmp_path / "pwned"
    payload = {
        "os.system": _Payload(os.system, f"touch {marker}"),
        "builtins.open": _Payload(builtins.open, str(marker), "w"),
        "builtins.eval": _Payload(builtins.eval, f"open({str(marker)!r}, 'w')"),
    }[kind]
    path = tmp_path / "evil.pt"
    torch.save({"model": payload, "epoch": 1}, path)
    result = run_cli("inspect", path)
    assert result.returncode != 0
    assert not marker.exists()
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    refused = {"os.system": os.system.__module__ + ".system", "builtins.open": "io.open", "builtins.eval": "builtins.eval"}
    assert refused[kind] in lines[0] or kind in lines[0]
    assert "refused" in lines[0]


def test_unknown_class_refused_unless_trusted(tmp_path):
    module = tmp_path / "user_blocks.py"
    module.write_text("import torch\nclass Extra(torch.nn.Identity):\n    pass\n")
    script = (
        "import sys, torch; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
        "from models.yolo import DetectionModel; import user_blocks\n"
        "m = DetectionModel(sys.argv[3]); m.extra = user_blocks.Extra()\n"
        "torch.save({'model': m}, sys.argv[4])\n"
    )
    cfg = REPO / "models" / "yolov5n-se.yaml"
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", script, str(tmp_path), str(REPO), str(cfg), str(tmp_path / "u.pt")], check=True)
    refused = run_cli("inspect", tmp_path / "u.pt")
    assert refused.returncode == 2 and "user_blocks.Extra" in refused.stderr
    trusted = run_cli("inspect", tmp_path / "u.pt", "--trust-checkpoint", "--json", env={"PYTHONPATH": str(tmp_path)})
    assert trusted.returncode == 0, trusted.stderr
    assert json.loads(trusted.stdout)["se_blocks"][0]["channels"] == 256


def _bad_files(tmp_path, fixtures):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "trunc.pt").write_bytes(CHECKPOINT.read_bytes()[:5000])
    (tmp_path / "text.pt").write_text("definitely not a pickle\n")
    (tmp_path / "nomodel.pt").write_bytes(pickle.dumps({"epoch": 3, "weights": [1, 2]}))
    return {
        "missing": tmp_path / "missing.pt",
        "empty": tmp_path / "empty.pt",
        "truncated": tmp_path / "trunc.pt",
        "not a pickle": tmp_path / "text.pt",
        "onnx": fixtures / "onnx" / "upstream-export-320.onnx",
        "no model": tmp_path / "nomodel.pt",
    }


def test_bad_files_give_one_line_errors(tmp_path, fixtures):
    for label, path in _bad_files(tmp_path, fixtures).items():
        result = run_cli("inspect", path)
        assert result.returncode == 2, label
        assert "Traceback" not in result.stderr, label
        assert len(result.stderr.strip().splitlines()) == 1, (label, result.stderr)
        assert result.stderr.startswith("error: "), label


def test_inspect_json(fixtures):
    result = run_cli("inspect", CHECKPOINT, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["names"] == {"0": "circle", "1": "rectangle", "2": "triangle"}
    assert info["stride"] == [8, 16, 32]
    assert info["parameters"] == 1776168
    assert info["se_blocks"] == [{"layer": 24, "module": "model.24", "class": "models.common.SEAttention", "form": "linear",
                                  "channels": 256, "hidden": 16, "reduction": 16, "gate": "sigmoid", "bias": False,
                                  "assumed": []}]

"""A fork's SE checkpoint loads without the fork's code: each catalogued form is rebuilt by structure,
computes what the fork's module computes, exports to canonical SE chains and passes ``check``; forms
beyond the catalogue and payloads inside a fork's class are refused in one line, with nothing run."""

from __future__ import annotations

import json
import os
import sys
from collections import OrderedDict
from copy import deepcopy

import numpy as np
import onnx
import pytest
import torch
from conftest import run_cli
from export_helpers import assert_canonical, run_main
from fork_se import (
    C3_SLOT,
    C3SE,
    SE_SLOTS,
    ChannelGate,
    ConvSE,
    DeepSE,
    HSigmoid,
    HSigmoidSELayer,
    LinearSE,
    LinearSELayer,
    LiteSEModule,
    MatchSELayer,
    MobileSELayer,
    SEBottleneck,
    TutorialSEAttention,
    fork_model,
    forked,
    reference,
    save_fork_checkpoint,
)
from torch import nn

from models.se_blocks import SqueezeExcite
from models.yolo import DetectionModel
from se_deploy.checkpoint import load_checkpoint
from se_deploy.errors import SeDeployError
from se_deploy.export.onnx_export import export_onnx
from se_deploy.model_info import describe, se_blocks

IMGSZ = 64
FUNCTIONAL = "no ReLU or gate module in the pickle (forward calls them as functions): taken as ReLU then Sigmoid"
RESIDUAL = "the SE rescales cv2's output and the residual adds x (one fork multiplies)"


def _layer_se(name: str, cls: type, make, form: str, gate: str, bias: bool, hidden, assumed=()):
    """A form that sits in the network as a layer of its own (both SE slots of fork_se.BASE_YAML)."""
    def build():
        fork = forked(name, cls)
        return fork_model(make(fork)), (fork,)

    expected = [{"layer": i, "module": f"model.{i}", "class": f"models.common.{name}", "form": form, "channels": c,
                 "hidden": h, "reduction": c // h, "gate": gate, "bias": bias, "assumed": list(assumed)}
                for i, c, h in zip(SE_SLOTS, (64, 128), hidden)]
    return build, expected


def _c3se():
    bottleneck, c3 = forked("SEBottleneck", SEBottleneck), forked("C3SE", C3SE)
    return fork_model(make_c3=lambda c1, c2, n: c3(c1, c2, n, bottleneck=bottleneck)), (bottleneck, c3)


FORMS = {
    "1-SE-linear": _layer_se("SE", LinearSE, lambda cls: lambda c: cls(c, c), "linear", "sigmoid", False, (4, 8)),
    "2-SE-conv-bias-functional": _layer_se("SE", ConvSE, lambda cls: lambda c: cls(c, 4), "conv1x1", "sigmoid", True,
                                           (16, 32), [FUNCTIONAL]),
    "3-SEAttention-c1-c2-hidden-1": _layer_se("SEAttention", TutorialSEAttention, lambda cls: lambda c: cls(c, c),
                                              "linear", "sigmoid", False, (1, 1)),
    "4-SELayer-linear": _layer_se("SELayer", LinearSELayer, lambda cls: lambda c: cls(c), "linear", "sigmoid", False,
                                  (4, 8)),
    "5-SELayer-hardsigmoid-bias": _layer_se("SELayer", MobileSELayer, lambda cls: lambda c: cls(c), "linear",
                                            "hardsigmoid", True, (16, 32)),
    "9-LC_SEModule-silu": _layer_se("LC_SEModule", LiteSEModule, lambda cls: lambda c: cls(c, 4, nn.SiLU), "conv1x1",
                                    "silu", True, (16, 32)),
    "9-ES_SEModule-hardsigmoid": _layer_se("ES_SEModule", LiteSEModule, lambda cls: lambda c: cls(c, 4, nn.Hardsigmoid),
                                           "conv1x1", "hardsigmoid", True, (16, 32)),
    "6-C3SE-SEBottleneck": (_c3se, [
        {"layer": C3_SLOT, "module": f"model.{C3_SLOT}.m.{k}", "class": "models.common.SEBottleneck",
         "form": "bottleneck-linear", "channels": 32, "hidden": 2, "reduction": 16, "gate": "sigmoid", "bias": False,
         "assumed": [RESIDUAL]} for k in range(2)]),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each form's original (fork) model and its checkpoint, saved as the fork's train.py would."""
    folder = tmp_path_factory.mktemp("forks")
    made = {}
    for name, (build, _) in FORMS.items():
        model, classes = build()
        made[name] = model, save_fork_checkpoint(model, folder / f"{name}.pt", *classes)
    return made


def _se_layers(model) -> list[tuple[int, int]]:
    """(layer index, input channels) of the original model's SE-carrying layers: the C3SE, or both SE slots."""
    if isinstance(model.model[C3_SLOT], C3SE):
        return [(C3_SLOT, model.model[C3_SLOT].cv1.conv.in_channels)]
    return list(zip(SE_SLOTS, (64, 128)))


def _importable(module: nn.Module) -> bool:
    """The module's class is what its module path names (a fork's class is not importable here)."""
    cls = type(module)
    return getattr(sys.modules.get(cls.__module__), cls.__qualname__, None) is cls


@pytest.mark.parametrize("form", FORMS)
def test_fork_checkpoint_loads_safely_and_computes_the_same(checkpoints, form):
    original, path = checkpoints[form]
    loaded = load_checkpoint(path)  # no trust: the fork's classes are not importable here
    assert se_blocks(loaded.model) == FORMS[form][1]

    assert all(_importable(m) for m in loaded.model.modules())
    fork = reference(original)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for i, channels in _se_layers(fork):  # each SE-carrying layer on its own: the fork's module vs ours
            x = torch.rand(2, channels, 8, 8, generator=generator) * 4 - 2
            assert (loaded.model.model[i](x) - fork.model[i](x)).abs().max().item() <= 1e-4, i
        images = torch.rand(2, 3, IMGSZ, IMGSZ, generator=generator)
        expected, got = fork(images)[0], loaded.model(images)[0]
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("form", FORMS)
def test_fork_checkpoint_exports_canonical_se_and_passes_check(checkpoints, tmp_path, form, dynamic):
    _, path = checkpoints[form]
    expected = FORMS[form][1]
    report = export_onnx(path, tmp_path / "model.onnx", imgsz=IMGSZ, dynamic=dynamic)
    assert report.parity.passed, report.parity.failures
    assert report.parity.detections["reference"] > 0  # the models detect: check compared boxes, not only scores
    assert report.se.found == len(expected) and report.notices == []
    model = onnx.load(report.onnx)
    assert_canonical(model, len(expected), gate=expected[0]["gate"], bias=expected[0]["bias"])


def test_cli_export_then_check(checkpoints, tmp_path, capsys):
    _, path = checkpoints["6-C3SE-SEBottleneck"]
    out = tmp_path / "c3se.onnx"
    assert run_main("export", path, "-o", out, "--imgsz", IMGSZ, "--no-check") == 0
    assert "2 found" in capsys.readouterr().out
    assert run_main("check", "-m", out, "-w", path) == 0
    assert "PASS" in capsys.readouterr().out


def test_hidden_width_comes_from_the_weights_not_the_yaml(tmp_path):
    """The tutorial's YAML says [1024] (reduction 16); a fork passing [c1, c2] made the hidden width 1."""
    fork = forked("SEAttention", TutorialSEAttention)
    model = fork_model(lambda c: fork(c, c))
    for i in SE_SLOTS:
        model.yaml["backbone"][i] = [-1, 1, "SEAttention", [1024]]
    loaded = load_checkpoint(save_fork_checkpoint(model, tmp_path / "se.pt", fork))
    assert [(b["channels"], b["hidden"]) for b in se_blocks(loaded.model)] == [(64, 1), (128, 1)]


def test_inspect_lists_every_se_block_with_its_form_and_assumptions(tmp_path):
    se, bottleneck, c3 = forked("SE", ConvSE), forked("SEBottleneck", SEBottleneck), forked("C3SE", C3SE)
    model = fork_model(lambda c: se(c, 4), lambda c1, c2, n: c3(c1, c2, n, bottleneck=bottleneck))
    path = save_fork_checkpoint(model, tmp_path / "mixed.pt", se, bottleneck, c3)

    result = run_cli("inspect", path, "--json")
    assert result.returncode == 0, result.stderr
    blocks = json.loads(result.stdout)["se_blocks"]
    assert [(b["module"], b["class"], b["form"], b["channels"], b["hidden"], b["gate"], b["bias"]) for b in blocks] == [
        ("model.2.m.0", "models.common.SEBottleneck", "bottleneck-linear", 32, 2, "sigmoid", False),
        ("model.2.m.1", "models.common.SEBottleneck", "bottleneck-linear", 32, 2, "sigmoid", False),
        ("model.4", "models.common.SE", "conv1x1", 64, 16, "sigmoid", True),
        ("model.7", "models.common.SE", "conv1x1", 128, 32, "sigmoid", True)]
    assert [b["assumed"] for b in blocks] == [[RESIDUAL], [RESIDUAL], [FUNCTIONAL], [FUNCTIONAL]]
    assert [b["type"] for b in json.loads(result.stdout)["layers"]][C3_SLOT] == "C3SE"  # the checkpoint's own name

    table = run_cli("inspect", path, env={"COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    assert "bottleneck-linear" in table.stdout and "conv1x1" in table.stdout
    assert f"assumed [1]: {RESIDUAL}" in table.stdout and f"assumed [2]: {FUNCTIONAL}" in table.stdout


# --- refused -------------------------------------------------------------------------------------------
def _refused_cases():
    cbam = forked("ChannelGate", ChannelGate)
    deep = forked("SE", DeepSE)
    match = forked("SELayer", MatchSELayer)
    h_sigmoid = forked("h_sigmoid", HSigmoid)
    mobile = forked("SELayer", HSigmoidSELayer)
    return {
        "renamed-restructured-cbam": (lambda: fork_model(lambda c: cbam(c)), (cbam,), "models.common.ChannelGate",
                                      ["avg AdaptiveAvgPool2d", "max AdaptiveMaxPool2d", "mlp Sequential(", "gate Sigmoid"]),
        "three-linear-layers": (lambda: fork_model(lambda c: deep(c)), (deep,), "models.common.SE",
                                ["pool AdaptiveAvgPool2d", "fc Sequential(Linear(64->16, bias), ReLU, Linear(16->16"]),
        "unused-conv_match": (lambda: fork_model(lambda c: match(c, c)), (match,), "models.common.SELayer",
                              ["l1 Linear(64->4)", "conv_match Conv2d(64->64, 1x1, bias)"]),
        "own-h_sigmoid-gate": (lambda: fork_model(lambda c: mobile(c, 4, h_sigmoid)), (h_sigmoid, mobile),
                               "models.common.h_sigmoid", ["relu ReLU6"]),
    }


REFUSED = _refused_cases()


@pytest.mark.parametrize("case", REFUSED)
def test_forms_beyond_the_catalogue_are_refused_in_one_line(tmp_path, case):
    build, classes, class_name, children = REFUSED[case]
    path = save_fork_checkpoint(build(), tmp_path / f"{case}.pt", *classes)
    result = run_cli("inspect", path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and f"{class_name} at model.4" in line
    assert all(child in line for child in children), line
    assert "--trust-checkpoint with the fork's models/ importable" in line


class _Layers(nn.Module):
    """A fork's block made of the given layers: only its structure reaches the loader."""

    def __init__(self, **layers):
        super().__init__()
        for name, layer in layers.items():
            setattr(self, name, layer)

    def forward(self, x):
        return x


def _pool():
    return nn.AdaptiveAvgPool2d(1)


STRUCTURES = {  # name: (layers for C channels, what the refusal says)
    "relu-without-gate": (lambda c: dict(pool=_pool(), l1=nn.Linear(c, c // 4), relu=nn.ReLU(), l2=nn.Linear(c // 4, c)),
                          "1 ReLU and 0 gate modules"),
    "silu-inside-the-excitation": (lambda c: dict(pool=_pool(), l1=nn.Linear(c, c // 4), act=nn.SiLU(),
                                                  l2=nn.Linear(c // 4, c), sig=nn.Sigmoid()), "0 ReLU and 2 gate modules"),
    "bias-on-one-layer": (lambda c: dict(pool=_pool(), l1=nn.Linear(c, c // 4), relu=nn.ReLU(),
                                         l2=nn.Linear(c // 4, c, bias=False), sig=nn.Sigmoid()), "one layer has a bias"),
    "square-layers": (lambda c: dict(pool=_pool(), l1=nn.Linear(c, c), relu=nn.ReLU(), l2=nn.Linear(c, c),
                                     sig=nn.Sigmoid()), "both layers are C x C"),
    "widths-do-not-chain": (lambda c: dict(pool=_pool(), l1=nn.Linear(c, c // 4), relu=nn.ReLU(),
                                           l2=nn.Linear(c // 8, c), sig=nn.Sigmoid()), "do not chain"),
    "grouped-conv": (lambda c: dict(pool=_pool(), c1=nn.Conv2d(c, c // 4, 1, groups=2), relu=nn.ReLU(),
                                    c2=nn.Conv2d(c // 4, c, 1, groups=2), sig=nn.Sigmoid()), "groups 2"),
    "sequential-in-another-order": (lambda c: dict(pool=_pool(), fc=nn.Sequential(nn.Linear(c, c // 4),
                                                   nn.Sigmoid(), nn.Linear(c // 4, c), nn.ReLU())), "another order"),
    "parameter-of-its-own": (lambda c: dict(pool=_pool(), l1=nn.Linear(c, c // 4), relu=nn.ReLU(),
                                            l2=nn.Linear(c // 4, c), sig=nn.Sigmoid(), scale=nn.Parameter(torch.ones(c))),
                             "parameters/buffers of its own"),
}


@pytest.mark.parametrize("structure", STRUCTURES)
def test_structures_that_cannot_be_told_are_refused(tmp_path, structure):
    layers, reason = STRUCTURES[structure]
    fork = forked("SE", _Layers)
    path = save_fork_checkpoint(fork_model(lambda c: fork(**layers(c))), tmp_path / "se.pt", fork)
    with pytest.raises(SeDeployError, match=r"models\.common\.SE at model\.4 is not an SE form") as error:
        load_checkpoint(path)
    assert reason in str(error.value)


def test_unknown_model_class_is_refused(tmp_path):
    segmentation = forked("SegmentationModel", DetectionModel, module="models.yolo")
    model = fork_model()
    model.__class__ = segmentation
    result = run_cli("inspect", save_fork_checkpoint(model, tmp_path / "seg.pt", segmentation))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {tmp_path / 'seg.pt'}: model is a models.yolo.SegmentationModel, "
                                     "not a YOLOv5 DetectionModel")


def test_se_folded_into_a_stock_block_is_refused(tmp_path):
    """An SE inside upstream's own Bottleneck: our Bottleneck's forward would silently skip it."""
    se = forked("SE", LinearSE)
    model = fork_model()
    for block in model.model[C3_SLOT].m:
        block.se = se(block.cv2.conv.out_channels, 0)
    with pytest.raises(SeDeployError, match=r"models\.common\.SE at model\.2\.m\.0\.se sits inside models\.common\.Bottleneck"):
        load_checkpoint(save_fork_checkpoint(model, tmp_path / "folded.pt", se))

    model = fork_model()
    model.model[C3_SLOT].m[0].fc = nn.Linear(32, 2)
    with pytest.raises(SeDeployError, match=r"Bottleneck at model\.2\.m\.0 carries layers .* \(fc Linear\(32->2, bias\)\)"):
        load_checkpoint(save_fork_checkpoint(model, tmp_path / "inline.pt"))


class _Payload:
    """Pickles as ``func(*args)``, as a malicious checkpoint would (and survives deepcopy unrun)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args

    def __deepcopy__(self, memo):
        return self


def test_payload_inside_an_unknown_class_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    se = forked("SE", LinearSE)

    def armed(channels):
        block = se(channels, channels)
        block.note = _Payload(os.system, f"touch {marker}")
        return block

    path = save_fork_checkpoint(fork_model(armed), tmp_path / "evil.pt", se)
    result = run_cli("inspect", path)
    assert not marker.exists()
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert f"refused to unpickle global '{os.system.__module__}.system' inside models.common.SE" in line
    assert "l1 Linear(64->4)" in line and "sig Sigmoid" in line and "nothing was run" in line
    assert "--trust-checkpoint" in line


# --- what real checkpoints hold besides network classes ------------------------------------------------
def test_numpy_values_bytes_sets_and_old_model_class_load(tmp_path):
    """numpy arrays and scalars (_reconstruct, ndarray, dtype, _codecs.encode for their bytes), sets, and
    the old ``models.yolo.Model`` name, all in one train.py-style checkpoint."""
    import zipfile

    old_model = forked("Model", DetectionModel, module="models.yolo")
    model = fork_model()
    legacy = deepcopy(model)
    legacy.__class__ = old_model
    path = save_fork_checkpoint(legacy, tmp_path / "old.pt", old_model, best_fitness=np.array([0.31]),
                                epoch=np.int64(7), opt={"hyp": {"lr0": np.float64(0.01)}, "classes": {1, 2},
                                                        "weights": b"\x00\xffyolo"})
    with zipfile.ZipFile(path) as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    assert all(name in pickled for name in (b"cmodels.yolo\nModel\n", b"c_codecs\nencode\n", b"c__builtin__\nset\n",
                                            b"multiarray\n_reconstruct\n", b"cnumpy\ndtype\n"))
    loaded = load_checkpoint(path)
    assert type(loaded.model) is DetectionModel
    assert json.loads(json.dumps(describe(loaded)["checkpoint"])) == {"best_fitness": pytest.approx(0.31), "epoch": 7,
                                                                 "date": "test"}
    images = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        assert (loaded.model(images)[0] - reference(model)(images)[0]).abs().max() <= 1e-4


def test_forward_bound_to_fuseforward_loads(tmp_path):
    """Fused YOLOv5 (<= v5.0) checkpoints pickle ``forward = getattr(conv, 'fuseforward')``."""
    from models.common import Conv

    model = fork_model().fuse()
    for m in model.modules():
        if isinstance(m, Conv):
            m.forward = m.fuseforward
    path = tmp_path / "fused.pt"
    torch.save({"model": deepcopy(model).half()}, path)
    loaded = load_checkpoint(path)
    conv = loaded.model.model[0]
    assert conv.forward.__func__ is Conv.forward_fuse and conv.forward.__self__ is conv
    images = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        assert (loaded.model(images)[0] - deepcopy(model).half().float()(images)[0]).abs().max() <= 1e-4


@pytest.mark.parametrize("payload, refused", [
    (_Payload(getattr, nn.Linear(2, 2), "register_forward_hook"), "builtins.getattr(torch.nn.modules.linear.Linear"),
    (_Payload(getattr, OrderedDict(), "fuseforward"), "builtins.getattr(collections.OrderedDict, 'fuseforward')"),
    (_Payload(getattr, nn.ReLU(), "fuseforward"), "builtins.getattr(torch.nn.modules.activation.ReLU"),
    (_Payload(getattr, nn.Linear(2, 2), "__class__"), "'__class__'"),
    (_Payload(__import__("_codecs").encode, "import os", "rot13"), "_codecs.encode(..., 'rot13')"),
])
def test_getattr_and_codecs_are_refused_beyond_what_checkpoints_need(tmp_path, payload, refused):
    path = tmp_path / "odd.pt"
    torch.save({"model": payload}, path)
    with pytest.raises(SeDeployError, match="refused") as error:
        load_checkpoint(path)
    assert refused in str(error.value)


def test_fixture_seattention_is_kept_as_it_is(fixture_model):
    from models.common import SEAttention

    se = fixture_model.model.model[24]
    assert type(se) is SEAttention and not any(isinstance(m, SqueezeExcite) for m in fixture_model.model.modules())

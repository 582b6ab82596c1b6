"""SE blocks as YOLOv5 forks write them (written here from the forms' descriptions: layer names, shapes,
gates, how parse_model passes channels), and checkpoints that pickle them under ``models.common.<Name>``
the way a fork's train.py does, without those classes being importable when the checkpoint is loaded."""

from __future__ import annotations

import contextlib
import sys
import types
from copy import deepcopy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.common import Conv
from models.yolo import DetectionModel


class LinearSE(nn.Module):
    """``SE(c1, c2, ratio=16)``: the most copied form (c2 unused)."""

    def __init__(self, c1, c2, ratio=16):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.l1 = nn.Linear(c1, c1 // ratio, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.l2 = nn.Linear(c1 // ratio, c1, bias=False)
        self.sig = nn.Sigmoid()

    def forward(self, x):
        b, c = x.shape[:2]
        y = self.sig(self.l2(self.relu(self.l1(self.avgpool(x).view(b, c))))).view(b, c, 1, 1)
        return x * y.expand_as(x)


class ConvSE(nn.Module):
    """``SE(in_chnls, ratio)``: 1x1 Conv2d squeeze/excitation with biases, ReLU and sigmoid as functions."""

    def __init__(self, in_chnls, ratio):
        super().__init__()
        self.squeeze = nn.AdaptiveAvgPool2d((1, 1))
        self.compress = nn.Conv2d(in_chnls, in_chnls // ratio, 1, 1, 0)
        self.excitation = nn.Conv2d(in_chnls // ratio, in_chnls, 1, 1, 0)

    def forward(self, x):
        out = self.excitation(F.relu(self.compress(self.squeeze(x))))
        return x * torch.sigmoid(out)


class TutorialSEAttention(nn.Module):
    """``SEAttention(channel=512, reduction=16)``, the tutorial's block (pickled as SEAttention)."""

    def __init__(self, channel=512, reduction=16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(channel, channel // reduction, bias=False), nn.ReLU(inplace=True),
                                nn.Linear(channel // reduction, channel, bias=False), nn.Sigmoid())

    def forward(self, x):
        b, c = x.shape[:2]
        return x * self.fc(self.avg_pool(x).view(b, c)).view(b, c, 1, 1).expand_as(x)


class LinearSELayer(nn.Module):
    """``SELayer(c1, r=16)``: Linear without bias; the layers registered pool, l1, l2, relu, sig."""

    def __init__(self, c1, r=16):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.l1 = nn.Linear(c1, c1 // r, bias=False)
        self.l2 = nn.Linear(c1 // r, c1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.sig = nn.Sigmoid()

    def forward(self, x):
        b, c = x.shape[:2]
        y = self.sig(self.l2(self.relu(self.l1(self.avgpool(x).view(b, c)))))
        return x * y.view(b, c, 1, 1)


class MobileSELayer(nn.Module):
    """``SELayer(channel, reduction=4)``, MobileNetV3 style: Linear with bias, Hardsigmoid gate."""

    def __init__(self, channel, reduction=4):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(channel, channel // reduction), nn.ReLU(inplace=True),
                                nn.Linear(channel // reduction, channel), nn.Hardsigmoid())

    def forward(self, x):
        b, c = x.shape[:2]
        return x * self.fc(self.avg_pool(x).view(b, c)).view(b, c, 1, 1)


class LiteSEModule(nn.Module):
    """``LC_SEModule`` / ``ES_SEModule(channel, 4)`` (YOLOv5-Lite): Conv2d with bias, SiLU or Hardsigmoid gate."""

    def __init__(self, channel, reduction=4, gate=nn.SiLU):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv1 = nn.Conv2d(channel, channel // reduction, 1, 1, 0)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channel // reduction, channel, 1, 1, 0)
        self.gate = gate()

    def forward(self, x):
        return x * self.gate(self.conv2(self.relu(self.conv1(self.avg_pool(x)))))


class SEBottleneck(nn.Module):
    """``SEBottleneck(c1, c2, shortcut, g, e=0.5, ratio=16)``: Bottleneck whose cv2 output a Linear SE rescales."""

    def __init__(self, c1, c2, shortcut=True, g=1, e=0.5, ratio=16):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(hidden, c2, 3, 1, g=g)
        self.add = shortcut and c1 == c2
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.l1 = nn.Linear(c1, c1 // ratio, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.l2 = nn.Linear(c1 // ratio, c1, bias=False)
        self.sig = nn.Sigmoid()

    def forward(self, x):
        x1 = self.cv2(self.cv1(x))
        b, c = x.shape[:2]
        y = self.sig(self.l2(self.relu(self.l1(self.avgpool(x1).view(b, c))))).view(b, c, 1, 1)
        out = x1 * y.expand_as(x1)
        return x + out if self.add else out


class C3SE(nn.Module):
    """``C3SE(c1, c2, n, shortcut, g, e)``: C3 whose bottlenecks are SEBottlenecks."""

    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5, bottleneck=SEBottleneck):
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden, 1, 1)
        self.cv2 = Conv(c1, hidden, 1, 1)
        self.cv3 = Conv(2 * hidden, c2, 1)
        self.m = nn.Sequential(*(bottleneck(hidden, hidden, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


# --- beyond the catalogue: forms that must be refused --------------------------------------------------
class ChannelGate(nn.Module):
    """CBAM-style channel attention (average and max pooling, shared MLP): renamed and restructured."""

    def __init__(self, c, r=8):
        super().__init__()
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.max = nn.AdaptiveMaxPool2d(1)
        self.mlp = nn.Sequential(nn.Linear(c, c // r), nn.ReLU(), nn.Linear(c // r, c))
        self.gate = nn.Sigmoid()

    def forward(self, x):
        b, c = x.shape[:2]
        y = self.mlp(self.avg(x).view(b, c)) + self.mlp(self.max(x).view(b, c))
        return x * self.gate(y).view(b, c, 1, 1)


class DeepSE(nn.Module):
    """SE with three Linear layers."""

    def __init__(self, c, r=4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(c, c // r), nn.ReLU(), nn.Linear(c // r, c // r), nn.ReLU(),
                                nn.Linear(c // r, c), nn.Sigmoid())

    def forward(self, x):
        b, c = x.shape[:2]
        return x * self.fc(self.pool(x).view(b, c)).view(b, c, 1, 1)


class MatchSELayer(LinearSE):
    """``SELayer(inp, oup, r)`` with a ``conv_match`` Conv2d that forward never uses (or might)."""

    def __init__(self, c1, c2, ratio=16):
        super().__init__(c1, c2, ratio)
        self.conv_match = nn.Conv2d(c1, c2, 1)


class HSigmoid(nn.Module):
    """``h_sigmoid``: ReLU6(x + 3) / 6; its structure (one ReLU6) is also h_swish's."""

    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU6(inplace=True)

    def forward(self, x):
        return self.relu(x + 3) / 6


class HSigmoidSELayer(MobileSELayer):
    """MobileNetV3 SELayer gated by a fork's own ``h_sigmoid`` class (``gate``)."""

    def __init__(self, channel, reduction=4, gate=HSigmoid):
        super().__init__(channel, reduction)
        self.fc[3] = gate()


# --- checkpoints ---------------------------------------------------------------------------------------
ANCHORS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119]]
SE_SLOTS = (4, 7)  # nn.Identity layers of BASE_YAML that take a fork's SE (64 and 128 channels)
C3_SLOT = 2  # the C3 (64 channels, 2 bottlenecks of 32) a C3SE replaces
BASE_YAML = {
    "nc": 2, "depth_multiple": 1.0, "width_multiple": 1.0, "anchors": ANCHORS,
    "backbone": [
        [-1, 1, "Conv", [16, 3, 2]],  # 0 P1/2
        [-1, 1, "Conv", [64, 3, 2]],  # 1 P2/4
        [-1, 2, "C3", [64]],  # 2 (bottlenecks of 32 channels)
        [-1, 1, "Conv", [64, 3, 2]],  # 3 P3/8
        [-1, 1, "nn.Identity", []],  # 4 SE slot, 64 channels
        [-1, 1, "Conv", [128, 3, 2]],  # 5 P4/16
        [-1, 1, "SPPF", [128, 5]],  # 6
        [-1, 1, "nn.Identity", []],  # 7 SE slot, 128 channels
    ],
    "head": [[[4, 7], 1, "Detect", ["nc", "anchors"]]],  # 8
}


def forked(name: str, cls: type, module: str = "models.common") -> type:
    """``cls`` as the fork names it: pickled as ``<module>.<name>``."""
    return type(name, (cls,), {"__module__": module, "__qualname__": name})


@contextlib.contextmanager
def fork_modules(*classes: type):
    """While saving, ``models.common`` (or ``models.yolo``) is a throwaway module holding ours plus the
    fork's classes; afterwards the fork's classes are importable nowhere."""
    real = {cls.__module__: sys.modules[cls.__module__] for cls in classes}
    for name, module in real.items():
        fork = sys.modules[name] = types.ModuleType(name)
        fork.__dict__.update(vars(module))
        fork.__dict__.update({cls.__qualname__: cls for cls in classes if cls.__module__ == name})
    try:
        yield
    finally:
        sys.modules.update(real)


def _as_layer(module: nn.Module, like: nn.Module) -> nn.Module:
    """Give ``module`` the attributes parse_model sets on the layer it replaces."""
    module.i, module.f = like.i, like.f
    module.type = f"{type(module).__module__}.{type(module).__qualname__}"
    module.np = sum(p.numel() for p in module.parameters())
    return module


def fork_model(make_se=None, make_c3=None, seed: int = 0) -> DetectionModel:
    """BASE_YAML with ``make_se(channels)`` in both SE slots and/or ``make_c3(c1, c2, n)`` in place of the C3."""
    torch.manual_seed(seed)
    model = DetectionModel(deepcopy(BASE_YAML))
    for i, channels in zip(SE_SLOTS, (64, 128)):
        if make_se is not None:
            model.model[i] = _as_layer(make_se(channels), model.model[i])
    if make_c3 is not None:
        stock = model.model[C3_SLOT]
        c1, c2 = stock.cv1.conv.in_channels, stock.cv3.conv.out_channels
        model.model[C3_SLOT] = _as_layer(make_c3(c1, c2, len(stock.m)), stock)
    _randomize(model)
    head = model.model[-1]
    with torch.no_grad():  # no low objectness prior: the models detect, so check compares their boxes too
        for conv in head.m:
            conv.bias.view(head.na, -1)[:, 4:] = 0
    return model.eval()


def _randomize(model: nn.Module) -> None:
    """Biases and BatchNorm statistics away from their init values, so every term shows in the outputs."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if tensor.is_floating_point() and "anchors" not in name:
                noise = torch.rand(tensor.shape, generator=generator)
                tensor.copy_(noise + 0.5 if name.endswith(("running_var", "bn.weight")) else tensor + 0.2 * (noise - 0.5))


def save_fork_checkpoint(model: DetectionModel, path: Path, *classes: type, **extra) -> Path:
    """A train.py-style checkpoint dict (FP16 model) pickling ``classes`` as ``models.common.<Name>``."""
    half = deepcopy(model).half()
    for p in half.parameters():
        p.requires_grad_(False)
    ckpt = {"epoch": -1, "best_fitness": None, "model": half, "ema": None, "updates": None, "optimizer": None,
            "opt": {}, "git": None, "date": "test", **extra}
    with fork_modules(*classes):
        torch.save(ckpt, path)
    return path


def reference(model: DetectionModel) -> DetectionModel:
    """What the fork itself computes from the saved checkpoint: FP16 weights in FP32, eval, fused."""
    return deepcopy(model).half().float().eval().fuse()

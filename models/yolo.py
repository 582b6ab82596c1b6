"""YOLOv5-compatible ``DetectionModel``, ``Detect`` head and ``parse_model`` (with SEAttention).

Importable as ``models.yolo`` because YOLOv5 checkpoints pickle their classes under that path.
"""

from __future__ import annotations

import ast
import math
from copy import deepcopy
from pathlib import Path

import torch
import yaml
from torch import nn

from models import common
from models.common import (
    C3,
    C3SPP,
    C3TR,
    SPP,
    SPPF,
    Bottleneck,
    BottleneckCSP,
    C3Ghost,
    C3x,
    Concat,
    Conv,
    CrossConv,
    DWConv,
    Focus,
    GhostBottleneck,
    GhostConv,
    SEAttention,
)

# Blocks whose first YAML argument is the output channel count (scaled by width_multiple).
_CHANNEL_BLOCKS = (
    Conv, GhostConv, Bottleneck, GhostBottleneck, SPP, SPPF, DWConv, Focus, CrossConv,
    BottleneckCSP, C3, C3TR, C3SPP, C3Ghost, C3x, nn.ConvTranspose2d,
)
# Blocks that take the repeat count as their third argument instead of being repeated.
_REPEAT_INSIDE = (BottleneckCSP, C3, C3TR, C3Ghost, C3x)
_ACTIVATIONS = {"SiLU": nn.SiLU, "ReLU": nn.ReLU, "LeakyReLU": nn.LeakyReLU, "Hardswish": nn.Hardswish}


class Detect(nn.Module):
    """YOLOv5 detection head: 1x1 convs per level, then (in eval) sigmoid + box decode."""

    stride = None
    dynamic = False  # rebuild grids on every call
    export = False  # return only the decoded tensor
    inplace = True

    def __init__(self, nc=80, anchors=(), ch=(), inplace=True):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.grid = [torch.empty(0) for _ in range(self.nl)]
        self.anchor_grid = [torch.empty(0) for _ in range(self.nl)]
        self.register_buffer("anchors", torch.tensor(anchors).float().view(self.nl, -1, 2))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)
        self.inplace = inplace

    def forward(self, x):
        decoded = []
        for i in range(self.nl):
            x[i] = self.m[i](x[i])
            bs, _, ny, nx = x[i].shape
            # -1 for the batch keeps a dynamic-batch ONNX export free of Shape/Gather on the batch axis.
            x[i] = x[i].view(-1, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if self.training:
                continue
            if self.dynamic or self.grid[i].shape[2:4] != x[i].shape[2:4]:
                self.grid[i], self.anchor_grid[i] = self._make_grid(nx, ny, i)
            xy, wh, conf = x[i].sigmoid().split((2, 2, self.nc + 1), 4)
            xy = (xy * 2 + self.grid[i]) * self.stride[i]
            wh = (wh * 2) ** 2 * self.anchor_grid[i]
            decoded.append(torch.cat((xy, wh, conf), 4).view(-1, self.na * ny * nx, self.no))
        if self.training:
            return x
        return (torch.cat(decoded, 1),) if self.export else (torch.cat(decoded, 1), x)

    def _make_grid(self, nx, ny, i):
        """Cell-offset grid (minus 0.5) and anchor sizes in pixels, both shaped (1, na, ny, nx, 2)."""
        anchors = self.anchors[i]
        shape = (1, self.na, ny, nx, 2)
        ys = torch.arange(ny, device=anchors.device, dtype=anchors.dtype)
        xs = torch.arange(nx, device=anchors.device, dtype=anchors.dtype)
        yv, xv = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack((xv, yv), 2).expand(shape) - 0.5
        anchor_grid = (anchors * self.stride[i]).view((1, self.na, 1, 1, 2)).expand(shape)
        return grid, anchor_grid


class DetectionModel(nn.Module):
    """A YOLOv5 detector built from a model YAML (path or dict)."""

    inplace = True

    def __init__(self, cfg="yolov5s.yaml", ch=3, nc=None, anchors=None):
        super().__init__()
        if isinstance(cfg, dict):
            self.yaml = cfg
        else:
            self.yaml_file = Path(cfg).name
            self.yaml = yaml.safe_load(Path(cfg).read_text(encoding="utf-8"))
        ch = self.yaml["ch"] = self.yaml.get("ch", ch)
        if nc is not None:
            self.yaml["nc"] = nc
        if anchors is not None:
            self.yaml["anchors"] = round(anchors)
        self.model, self.save = parse_model(deepcopy(self.yaml), ch=[ch])
        self.names = {i: str(i) for i in range(self.yaml["nc"])}
        self.inplace = self.yaml.get("inplace", True)

        head = self.model[-1]
        if isinstance(head, Detect):
            probe = 256
            head.inplace = self.inplace
            with torch.no_grad():
                self.train()
                outputs = self.forward(torch.zeros(1, ch, probe, probe))
            head.stride = torch.tensor([probe / out.shape[-2] for out in outputs])
            _order_anchors(head)
            head.anchors /= head.stride.view(-1, 1, 1)
            self.stride = head.stride
            self._initialize_biases()

    def forward(self, x):
        outputs = []
        for m in self.model:
            if m.f != -1:
                x = outputs[m.f] if isinstance(m.f, int) else [x if j == -1 else outputs[j] for j in m.f]
            x = m(x)
            outputs.append(x if m.i in self.save else None)
        return x

    def fuse(self):
        """Fold every Conv's BatchNorm into its convolution (inference only)."""
        for m in self.model.modules():
            if isinstance(m, Conv) and hasattr(m, "bn"):
                m.conv = fuse_conv_and_bn(m.conv, m.bn)
                delattr(m, "bn")
                m.forward = m.forward_fuse
        return self

    def _initialize_biases(self):
        """Objectness/class bias priors so an untrained model starts sensible (YOLOv5's scheme)."""
        head = self.model[-1]
        for conv, stride in zip(head.m, head.stride):
            bias = conv.bias.view(head.na, -1)
            bias.data[:, 4] += math.log(8 / (640 / stride) ** 2)
            bias.data[:, 5 : 5 + head.nc] += math.log(0.6 / (head.nc - 0.99999))
            conv.bias = nn.Parameter(bias.view(-1), requires_grad=True)


Model = DetectionModel  # older checkpoints pickle the class under this name


def _order_anchors(head: Detect) -> None:
    """Flip anchor order when it runs against the stride order."""
    area = head.anchors.prod(-1).mean(-1).view(-1)
    if area[-1] - area[0] and (area[-1] - area[0]).sign() != (head.stride[-1] - head.stride[0]).sign():
        head.anchors[:] = head.anchors.flip(0)


def fuse_conv_and_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A Conv2d with bias computing ``bn(conv(x))``."""
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, kernel_size=conv.kernel_size, stride=conv.stride,
        padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
    ).requires_grad_(False).to(conv.weight.device)
    scale = torch.diag(bn.weight.div(torch.sqrt(bn.eps + bn.running_var)))
    fused.weight.copy_(torch.mm(scale, conv.weight.view(conv.out_channels, -1)).view(fused.weight.shape))
    conv_bias = torch.zeros(conv.weight.shape[0], device=conv.weight.device) if conv.bias is None else conv.bias
    bn_bias = bn.bias - bn.weight.mul(bn.running_mean).div(torch.sqrt(bn.running_var + bn.eps))
    fused.bias.copy_(torch.mm(scale, conv_bias.reshape(-1, 1)).reshape(-1) + bn_bias)
    return fused


def make_divisible(x, divisor=8):
    """Smallest multiple of ``divisor`` not below ``x``."""
    return math.ceil(x / divisor) * divisor


def _resolve_module(name: str):
    """Map a YAML module name (``C3``, ``nn.Upsample``, ``Detect``...) to its class, without eval."""
    if name.startswith("nn."):
        cls = getattr(nn, name[3:], None)
    elif name == "Detect":
        cls = Detect
    else:
        cls = getattr(common, name, None)
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ValueError(f"unknown module '{name}' in model YAML")
    return cls


def _resolve_arg(arg, names: dict):
    """YAML arguments such as 'nc', 'anchors' and 'None' become values; other strings stay strings."""
    return names.get(arg, arg) if isinstance(arg, str) else arg


def _activation(spec: str) -> nn.Module:
    """Parse an ``activation:`` entry like ``nn.LeakyReLU(0.1)`` without eval."""
    call = ast.parse(spec.strip(), mode="eval").body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Attribute):
        raise ValueError(f"unsupported activation '{spec}'")
    cls = _ACTIVATIONS.get(call.func.attr)
    if cls is None:
        raise ValueError(f"unsupported activation '{spec}'")
    return cls(*[ast.literal_eval(a) for a in call.args])


def parse_model(d: dict, ch: list[int]):
    """Build the layer list and the indices whose outputs later layers read."""
    anchors, nc = d["anchors"], d["nc"]
    depth, width = d["depth_multiple"], d["width_multiple"]
    Conv.default_act = _activation(d["activation"]) if d.get("activation") else nn.SiLU()
    na = len(anchors[0]) // 2 if isinstance(anchors, list) else anchors
    no = na * (nc + 5)
    symbols = {"nc": nc, "anchors": anchors, "None": None, "True": True, "False": False}

    layers, save, c2 = [], [], ch[-1]
    for i, (f, n, name, args) in enumerate(d["backbone"] + d["head"]):
        cls = _resolve_module(name)
        args = [_resolve_arg(a, symbols) for a in args]
        n = max(round(n * depth), 1) if n > 1 else n
        if cls in _CHANNEL_BLOCKS:
            c1, c2 = ch[f], args[0]
            if c2 != no:
                c2 = make_divisible(c2 * width, 8)
            args = [c1, c2, *args[1:]]
            if cls in _REPEAT_INSIDE:
                args.insert(2, n)
                n = 1
        elif cls is SEAttention:
            # SE keeps its input's channels; the YAML's unscaled count is replaced by the real one.
            c2 = ch[f]
            args = [c2, *args[1:]]
        elif cls is nn.BatchNorm2d:
            args = [ch[f]]
        elif cls is Concat:
            c2 = sum(ch[x] for x in f)
        elif cls is Detect:
            args.append([ch[x] for x in f])
            if isinstance(args[1], int):
                args[1] = [list(range(args[1] * 2))] * len(f)
        else:
            c2 = ch[f]

        module = nn.Sequential(*(cls(*args) for _ in range(n))) if n > 1 else cls(*args)
        module.i, module.f = i, f
        module.type = f"{cls.__module__}.{cls.__qualname__}"
        module.np = sum(p.numel() for p in module.parameters())
        save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
        layers.append(module)
        if i == 0:
            ch = []
        ch.append(c2)
    return nn.Sequential(*layers), sorted(save)

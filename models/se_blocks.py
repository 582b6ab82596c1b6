"""se-deploy's own Squeeze-and-Excitation modules: the forms every recognised fork SE is rebuilt into.

Forks write SE with Linear or 1x1 Conv2d layers, with or without biases, gated by Sigmoid, Hardsigmoid
or SiLU, as a layer of their own or inside a C3 bottleneck (docs/loading.md lists them). On the pooled
1x1 map a 1x1 Conv2d is a Linear, so each computes ``x * gate(fc2(relu(fc1(mean_hw(x)))))``;
``SqueezeExcite`` computes exactly that and exports to one ONNX chain. ``se_deploy/se_forms.py`` builds
these from a checkpoint's weights and records where they came from.
"""

from __future__ import annotations

from torch import nn

GATES = {"sigmoid": nn.Sigmoid, "hardsigmoid": nn.Hardsigmoid, "silu": nn.SiLU}


def gate_name(module: nn.Module) -> str | None:
    """'sigmoid', 'hardsigmoid' or 'silu' for a gate module; None for anything else."""
    return next((name for name, cls in GATES.items() if type(module) is cls), None)


class SqueezeExcite(nn.Module):
    """Global average pool -> fc1 -> ReLU -> fc2 -> gate, then a channel-wise rescale of the input."""

    # Set when rebuilt from a checkpoint: the class the fork pickled, what its two layers were
    # ('linear' or 'conv1x1'), and what the pickle could not tell and was taken in its common form.
    source: str | None = None
    layers = "linear"
    assumed: tuple[str, ...] = ()

    def __init__(self, channels: int, hidden: int, bias: bool = False, gate: str = "sigmoid"):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(channels, hidden, bias=bias)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels, bias=bias)
        self.gate = GATES[gate]()

    def forward(self, x):
        scale = self.gate(self.fc2(self.act(self.fc1(self.pool(x).flatten(1)))))
        return x * scale.unsqueeze(-1).unsqueeze(-1)


class SqueezeExciteBottleneck(nn.Module):
    """C3 bottleneck whose second convolution's output is rescaled by an SE block: ``x + se(cv2(cv1(x)))``.

    Built around existing ``Conv`` layers (from a checkpoint), so it takes modules, not channel counts.
    """

    def __init__(self, cv1: nn.Module, cv2: nn.Module, se: SqueezeExcite, add: bool):
        super().__init__()
        self.cv1, self.cv2, self.se = cv1, cv2, se
        self.add = add

    def forward(self, x):
        out = self.se(self.cv2(self.cv1(x)))
        return x + out if self.add else out

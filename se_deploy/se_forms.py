"""Recognise a fork's SE blocks in a checkpoint by their structure and rebuild them as se-deploy's modules.

A class the pickle names under ``models.common`` / ``models.yolo`` that se-deploy does not have is
unpickled into a ``Placeholder``: an inert object that keeps the pickled state (child modules,
parameters, buffers, plain attributes) and runs nothing from the pickle. ``rebuild_placeholders`` then
walks the model and replaces each placeholder by one of our modules when its fingerprint (child-module
types, weight shapes, biases, gate) is a known SE form, copying the weights:

- an SE layer: one AdaptiveAvgPool2d(1), two Linear or 1x1 Conv2d layers (C -> hidden -> C, both with
  or both without bias), a ReLU and a Sigmoid/Hardsigmoid/SiLU gate -> ``SqueezeExcite``;
- a bottleneck: ``cv1``/``cv2`` Conv plus such an SE (inline or as a child) -> ``SqueezeExciteBottleneck``;
- a C3 (``cv1``/``cv2``/``cv3`` Conv, ``m``) whose bottlenecks are those -> our ``C3``.

What the pickle cannot show is taken in the form the catalogue calls common and recorded in the
module's ``assumed`` (``inspect`` reports it). Anything else is refused with the class and its children.
The hidden width always comes from the weights. Torch is imported inside the functions that need it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from se_deploy.errors import SeDeployError

TRUST_HINT = ("if you trust this file, pass --trust-checkpoint with the fork's models/ importable "
              "(its folder on PYTHONPATH)")
ASSUMED_FUNCTIONAL = "no ReLU or gate module in the pickle (forward calls them as functions): taken as ReLU then Sigmoid"
ASSUMED_RESIDUAL = "the SE rescales cv2's output and the residual adds x (one fork multiplies)"
ASSUMED_NO_RESIDUAL = "the SE rescales cv2's output (no residual: add is False)"
_LAYER_ATTRS = ("i", "f", "type", "np")  # what parse_model sets on every layer; DetectionModel.forward reads i, f
_C3_CHILDREN = {"cv1", "cv2", "cv3", "m"}


class Placeholder:
    """Stands in for a class the pickle names and se-deploy lacks: keeps the pickled state, runs nothing.

    Pickle makes it with ``__new__`` (or calls it: the arguments are ignored) and hands it the object's
    state, for an nn.Module its ``__dict__``; that state holds only what the allowlist let through.
    """

    pickled_name = "?"  # e.g. 'models.common.SE', set on each subclass
    _reading: list | None = None  # the unpickler's placeholders whose state is still being read

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        self.state = {}
        if cls._reading is not None:
            cls._reading.append(self)
        return self

    def __init__(self, *args, **kwargs):
        """Nothing: a placeholder never acts on what the pickle passes it."""

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {"": state}
        if self._reading is not None and any(p is self for p in self._reading):
            self._reading[:] = [p for p in self._reading if p is not self]


def placeholder_class(qualified_name: str, reading: list | None = None) -> type:
    """A Placeholder subclass for ``qualified_name``; ``reading`` tracks whose state is being unpickled."""
    return type(qualified_name.rsplit(".", 1)[-1], (Placeholder,), {"pickled_name": qualified_name,
                                                                     "_reading": reading})


def class_name(obj) -> str:
    """The qualified class name the checkpoint gave ``obj`` (``models.common.SE``)."""
    if isinstance(obj, Placeholder):
        return obj.pickled_name
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


@dataclass
class _Node:
    """A placeholder's or a module's pickled state, seen the same way."""

    cls: str
    children: dict  # the live dict: assigning an entry replaces that child
    params: dict
    buffers: dict
    attrs: dict  # plain attributes (not nn.Module bookkeeping)


def _node(obj) -> _Node:
    state = obj.state if isinstance(obj, Placeholder) else vars(obj)

    def entry(key):
        value = state.get(key)
        return value if isinstance(value, dict) else {}

    attrs = {k: v for k, v in state.items() if isinstance(k, str) and not k.startswith("_") and k != "training"}
    return _Node(class_name(obj), entry("_modules"), entry("_parameters"), entry("_buffers"), attrs)


def _summary(module) -> str:
    """``Linear(64->4, bias)``, ``Conv2d(64->4, 1x1)``, ``Sigmoid``, ``SEBottleneck``... for messages."""
    from torch import nn

    if isinstance(module, Placeholder):
        return module.pickled_name.rsplit(".", 1)[-1]
    if type(module) is nn.Sequential:
        return f"Sequential({', '.join(_summary(c) for c in module._modules.values() if c is not None)})"
    weight = getattr(module, "weight", None) if isinstance(module, (nn.Linear, nn.Conv2d)) else None
    if weight is None:
        return type(module).__name__
    bias = ", bias" if getattr(module, "bias", None) is not None else ""
    kernel = f", {'x'.join(map(str, weight.shape[2:]))}" if weight.dim() == 4 else ""
    return f"{type(module).__name__}({weight.shape[1]}->{weight.shape[0]}{kernel}{bias})"


def describe_children(obj) -> str:
    """One line listing ``obj``'s child layers (and any parameter of its own)."""
    node = _node(obj)
    parts = [f"{name} {_summary(child)}" for name, child in node.children.items() if child is not None]
    parts += [f"{name} parameter {tuple(p.shape)}" for name, p in node.params.items() if hasattr(p, "shape")]
    return ", ".join(parts) or "no child layers"


# --- recognising an SE block ---------------------------------------------------------------------------
@dataclass
class _SEMatch:
    fc1: object  # nn.Linear or 1x1 nn.Conv2d, C -> hidden
    fc2: object  # hidden -> C
    gate: str
    layers: str  # 'linear' or 'conv1x1'
    assumed: list[str] = field(default_factory=list)


def _leaves(children: dict, prefix: str = "", group: int | None = None, numbers=None) -> list:
    """(path, module, number of the nn.Sequential holding it or None) for each child, looking into Sequentials."""
    from torch import nn

    out, numbers = [], numbers or itertools.count()
    for name, child in children.items():
        if type(child) is nn.Sequential:
            out += _leaves(child._modules, f"{prefix}{name}.", next(numbers), numbers)
        elif child is not None:
            out.append((f"{prefix}{name}", child, group))
    return out


def _role(module) -> str | None:
    from torch import nn

    from models.se_blocks import gate_name

    if type(module) is nn.AdaptiveAvgPool2d:
        return "pool"
    if type(module) in (nn.Linear, nn.Conv2d):
        return "fc"
    if type(module) is nn.ReLU:
        return "relu"
    return "gate" if gate_name(module) else None


def _fc_problem(module) -> str | None:
    """Why a Linear/Conv2d cannot be a fully connected layer on the pooled 1x1 map (None if it can)."""
    from torch import nn

    if isinstance(module, nn.Linear):
        return None if module.weight.dim() == 2 else "a Linear without a 2-D weight"
    kernel, padding, groups = tuple(module.kernel_size), module.padding, module.groups
    if kernel != (1, 1) or groups != 1 or padding not in ((0, 0), "valid"):
        return f"Conv2d with kernel {kernel}, padding {padding}, groups {groups} (an SE needs 1x1, no padding, 1 group)"
    return None


def _match_se(leaves: list) -> _SEMatch | str:
    """The SE block these leaf modules make, or why they make none."""
    from torch import nn

    from models.se_blocks import gate_name

    roles: dict[str, list] = {"pool": [], "fc": [], "relu": [], "gate": []}
    for path, module, _ in leaves:
        role = _role(module)
        if role is None:
            return f"{path} ({_summary(module)}) has no place in an SE block"
        roles[role].append(module)
    pools, fcs = roles["pool"], roles["fc"]
    if len(pools) != 1 or pools[0].output_size not in (1, (1, 1), [1, 1]):
        return "an SE block pools with exactly one AdaptiveAvgPool2d(1)"
    if len(fcs) != 2 or type(fcs[0]) is not type(fcs[1]):
        return f"an SE block has two Linear or two 1x1 Conv2d layers, not {', '.join(_summary(m) for m in fcs) or 'none'}"
    if problem := _fc_problem(fcs[0]) or _fc_problem(fcs[1]):
        return problem
    (out_a, in_a), (out_b, in_b) = (tuple(m.weight.shape[:2]) for m in fcs)
    if (out_a, in_a) != (in_b, out_b):
        return f"layer widths {in_a}->{out_a} and {in_b}->{out_b} do not chain C -> hidden -> C"
    if out_a == in_a:
        return "both layers are C x C, so which one squeezes cannot be told"
    fc1, fc2 = fcs if out_a < in_a else fcs[::-1]
    if (fc1.bias is None) != (fc2.bias is None):
        return "one layer has a bias and the other none"
    relus, gates = roles["relu"], roles["gate"]
    if (len(relus), len(gates)) == (1, 1):
        match = _SEMatch(fc1, fc2, gate_name(gates[0]), "linear" if isinstance(fc1, nn.Linear) else "conv1x1")
    elif not relus and not gates:
        match = _SEMatch(fc1, fc2, "sigmoid", "linear" if isinstance(fc1, nn.Linear) else "conv1x1",
                         [ASSUMED_FUNCTIONAL])
    else:
        return (f"{len(relus)} ReLU and {len(gates)} gate modules: an SE block has one of each "
                "(or none, when forward calls both as functions)")
    # An nn.Sequential runs its layers back to back: they must be a stretch of pool, fc1, ReLU, fc2, gate.
    step = {id(pools[0]): 0, id(fc1): 1, id(fc2): 3, **{id(m): 2 for m in relus}, **{id(m): 4 for m in gates}}
    for group in {g for _, _, g in leaves if g is not None}:
        steps = [step[id(m)] for _, m, g in leaves if g == group]
        if steps != list(range(steps[0], steps[0] + len(steps))):
            return "an nn.Sequential in it runs its layers in another order than pool, fc, ReLU, fc, gate"
    return match


def _build_se(match: _SEMatch, source: str) -> object:
    """A SqueezeExcite holding ``match``'s weights (a 1x1 Conv2d's weight becomes the Linear's)."""
    from models.se_blocks import SqueezeExcite

    w1, w2 = (m.weight.detach().reshape(m.weight.shape[0], -1) for m in (match.fc1, match.fc2))
    bias = match.fc1.bias is not None
    se = SqueezeExcite(w1.shape[1], w1.shape[0], bias=bias, gate=match.gate)
    state = {"fc1.weight": w1, "fc2.weight": w2}
    if bias:
        state.update({"fc1.bias": match.fc1.bias.detach(), "fc2.bias": match.fc2.bias.detach()})
    se.load_state_dict(state)
    se.source, se.layers, se.assumed = source, match.layers, tuple(match.assumed)
    return se


# --- rebuilding placeholders ---------------------------------------------------------------------------
def _is_conv(module) -> bool:
    from models.common import Conv

    return type(module) is Conv


def _assemble(cls, children: dict):
    """An instance of ``cls`` made of existing layers (its __init__ would make new ones)."""
    from torch import nn

    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for name, child in children.items():
        setattr(module, name, child)
    return module


def _rebuild_c3(node: _Node):
    """A C3 whose bottlenecks carry SE (C3SE and the like) -> our C3 with those bottlenecks."""
    from torch import nn

    from models.common import C3
    from models.se_blocks import SqueezeExciteBottleneck

    convs_ok = all(_is_conv(node.children[k]) for k in ("cv1", "cv2", "cv3"))
    m = node.children["m"]
    if not convs_ok or type(m) is not nn.Sequential or not len(m):
        return "a C3-like block needs Conv cv1, cv2, cv3 and an nn.Sequential m of bottlenecks"
    if not all(isinstance(b, SqueezeExciteBottleneck) for b in m):
        return f"its bottlenecks are {', '.join(sorted({_summary(b) for b in m}))}, not SE bottlenecks"
    return _assemble(C3, {k: node.children[k] for k in ("cv1", "cv2", "cv3", "m")})


def _rebuild_bottleneck(node: _Node):
    """cv1, cv2 and an SE (inline layers, or one child already rebuilt) -> SqueezeExciteBottleneck."""
    from models.se_blocks import SqueezeExcite, SqueezeExciteBottleneck

    rest = {k: v for k, v in node.children.items() if k not in ("cv1", "cv2") and v is not None}
    if len(rest) == 1 and isinstance(next(iter(rest.values())), SqueezeExcite):
        se = next(iter(rest.values()))
    else:
        match = _match_se(_leaves(rest))
        if isinstance(match, str):
            return match
        se = _build_se(match, node.cls)
    add = node.attrs.get("add")
    if not isinstance(add, bool):
        return "a bottleneck without its 'add' flag (whether it has a residual)"
    channels = node.children["cv2"].conv.weight.shape[0]
    if se.fc1.in_features != channels:
        return f"its SE has {se.fc1.in_features} channels, cv2 gives {channels}"
    se.assumed = (*se.assumed, ASSUMED_RESIDUAL if add else ASSUMED_NO_RESIDUAL)
    block = SqueezeExciteBottleneck(node.children["cv1"], node.children["cv2"], se, add)
    block.source = node.cls
    return block


def _rebuild_se(node: _Node):
    match = _match_se(_leaves(node.children))
    return match if isinstance(match, str) else _build_se(match, node.cls)


def _rebuild(obj, path: str):
    """Our module for the placeholder (or mismatched SEAttention) ``obj``; SeDeployError if none fits."""
    node = _node(obj)
    if node.params or node.buffers:
        result = f"{len(node.params) + len(node.buffers)} parameters/buffers of its own that no known form has"
    elif set(node.children) == _C3_CHILDREN:
        result = _rebuild_c3(node)
    elif _is_conv(node.children.get("cv1")) and _is_conv(node.children.get("cv2")):
        result = _rebuild_bottleneck(node)
    else:
        result = _rebuild_se(node)
    if isinstance(result, str):
        raise SeDeployError(f"{node.cls} at {path or 'the top'} is not an SE form se-deploy can rebuild: {result} "
                            f"(children: {describe_children(obj)}); {TRUST_HINT}")
    for key in _LAYER_ATTRS:
        if key in node.attrs:
            setattr(result, key, node.attrs[key])
    return result


def _check_known(module, path: str):
    """A module of one of our classes: itself, or (SEAttention laid out otherwise) its rebuild; refuse
    stock blocks carrying layers our forward would not run (SE folded into Bottleneck/C3)."""
    from models.common import C3, Bottleneck, SEAttention

    if isinstance(module, SEAttention):
        leaves = _leaves(_node(module).children)
        match = _match_se(leaves)
        tutorial = [p for p, _, _ in leaves] == ["avg_pool", "fc.0", "fc.1", "fc.2", "fc.3"]
        if isinstance(match, _SEMatch) and tutorial and match.layers == "linear" and not match.assumed:
            return module
        return _rebuild(module, path)
    for cls, expected in ((Bottleneck, {"cv1", "cv2"}), (C3, _C3_CHILDREN)):  # the stock blocks forks fold SE into
        extra = sorted(set(_node(module).children) - expected) if isinstance(module, cls) else []
        if extra:
            layers = ", ".join(f"{k} {_summary(getattr(module, k))}" for k in extra)
            raise SeDeployError(f"{class_name(module)} at {path} carries layers se-deploy's {cls.__name__} would not "
                                f"run ({layers}): an SE folded into a stock block is not a supported form; {TRUST_HINT}")
    return module


def _walk(obj, path: str):
    from torch import nn

    if not isinstance(obj, (Placeholder, nn.Module)):
        return obj
    children = _node(obj).children
    for name, child in list(children.items()):
        child_path = f"{path}.{name}" if path else name
        new = _walk(child, child_path)
        if new is child:
            continue
        if not isinstance(obj, Placeholder) and type(obj) is not nn.Sequential:
            raise SeDeployError(f"{class_name(child)} at {child_path} sits inside {class_name(obj)}, whose forward "
                                f"se-deploy runs without it; {TRUST_HINT}")
        children[name] = new
    return _rebuild(obj, path) if isinstance(obj, Placeholder) else _check_known(obj, path)


def rebuild_placeholders(model) -> None:
    """Replace every placeholder (and mis-laid SEAttention) in ``model`` by our module for its SE form.

    Raises SeDeployError naming the class, where it sits and its child layers when no known form fits.
    """
    _walk(model, "")

"""Architecture summary of a loaded model: what ``se-deploy inspect`` shows."""

from __future__ import annotations

from se_deploy.checkpoint import LoadedModel


def _se_entry(path: str, source: str, fc1, fc2, gate, layers: str, placement: str, assumed) -> dict:
    from models.se_blocks import gate_name

    layer = int(path.split(".")[1]) if path.startswith("model.") else None
    channels, hidden = fc1.in_features, fc1.out_features
    form = layers if placement == "layer" else f"bottleneck-{layers}"
    return {"layer": layer, "module": path, "class": source, "form": form, "channels": channels, "hidden": hidden,
            "reduction": channels // hidden, "gate": gate_name(gate), "bias": fc1.bias is not None,
            "assumed": list(assumed)}


def se_blocks(model) -> list[dict]:
    """One entry per SE block: where it sits, the class the checkpoint named, its form, channels, hidden width
    (from the weights), gate, bias, and what was assumed where the pickle could not tell."""
    from models.common import SEAttention
    from models.se_blocks import SqueezeExcite, SqueezeExciteBottleneck
    from se_deploy.se_forms import class_name

    blocks, inside = [], set()
    for name, m in model.named_modules():
        if isinstance(m, SEAttention):
            blocks.append(_se_entry(name, class_name(m), m.fc[0], m.fc[2], m.fc[3], "linear", "layer", ()))
        elif isinstance(m, SqueezeExciteBottleneck):
            inside.add(id(m.se))
            blocks.append(_se_entry(name, m.source or class_name(m), m.se.fc1, m.se.fc2, m.se.gate, m.se.layers,
                                    "bottleneck", m.se.assumed))
        elif isinstance(m, SqueezeExcite) and id(m) not in inside:
            blocks.append(_se_entry(name, m.source or class_name(m), m.fc1, m.fc2, m.gate, m.layers, "layer",
                                    m.assumed))
    return blocks


def _plain(value):
    """A checkpoint fact (a float, a numpy scalar, a 1-element array as train.py stores best_fitness) for JSON."""
    if hasattr(value, "item") and getattr(value, "size", 1) == 1:
        return float(value.item())
    return value.tolist() if hasattr(value, "tolist") else value


def describe(loaded: LoadedModel) -> dict:
    """Everything ``inspect`` reports, as plain JSON-ready data."""
    model = loaded.model
    head = model.model[-1]
    layers = [
        {"index": m.i, "from": m.f, "type": m.type.rsplit(".", 1)[-1], "parameters": int(m.np),
         "repeats": len(m) if m.type.endswith("Sequential") else 1}
        for m in model.model
    ]
    return {
        "path": str(loaded.path),
        "source_format": loaded.source_format,
        "nc": int(head.nc),
        "names": {str(k): v for k, v in loaded.names.items()},
        "stride": loaded.stride,
        "anchors": (head.anchors * head.stride.view(-1, 1, 1)).tolist(),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "fused": not any(hasattr(m, "bn") for m in model.modules() if type(m).__name__ == "Conv"),
        "layers": layers,
        "se_blocks": se_blocks(model),
        "checkpoint": {k: _plain(v) for k, v in loaded.extras.items()},
    }

"""Architecture summary of a loaded model: what ``se-deploy inspect`` shows."""

from __future__ import annotations

from se_deploy.checkpoint import LoadedModel


def se_blocks(model) -> list[dict]:
    """One entry per SEAttention block: layer index, channels and reduction ratio."""
    from models.common import SEAttention

    blocks = []
    for name, m in model.named_modules():
        if isinstance(m, SEAttention):
            channels, hidden = m.fc[0].in_features, m.fc[0].out_features
            layer = getattr(m, "i", None)
            if layer is None:  # SE nested inside another block: take the enclosing top-level layer
                layer = int(name.split(".")[1]) if name.startswith("model.") else None
            blocks.append({"layer": layer, "module": name, "channels": channels, "hidden": hidden,
                           "reduction": channels // hidden})
    return blocks


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
        "checkpoint": {k: (float(v) if hasattr(v, "item") else v) for k, v in loaded.extras.items()},
    }

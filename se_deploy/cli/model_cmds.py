"""``inspect``: what a checkpoint holds."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from se_deploy.cli import app
from se_deploy.cli.options import CfgOpt, JsonFlag, TrustOpt
from se_deploy.cli.output import finish


@app.command()
def inspect(
    weights: Path = typer.Argument(..., help="YOLOv5 checkpoint (.pt)", show_default=False),
    cfg: Path = CfgOpt,
    trust_checkpoint: bool = TrustOpt,
    as_json: bool = JsonFlag,
) -> None:
    """Summarise a checkpoint: classes, strides, anchors, layers and every SE block."""
    from se_deploy.checkpoint import load_checkpoint
    from se_deploy.model_info import describe

    info = describe(load_checkpoint(weights, cfg=cfg, trust=trust_checkpoint, fuse=False))
    finish(info, as_json, None, lambda: _print_info(info))


def _print_info(info: dict) -> None:
    console = Console()
    console.print(f"[bold]{info['path']}[/bold]  ({info['source_format']})")
    console.print(f"classes ({info['nc']}): {', '.join(info['names'].values())}")
    console.print(f"strides: {info['stride']}   parameters: {info['parameters']:,}")
    console.print(f"anchors (px): {info['anchors']}")
    layers = Table("#", "from", "n", "module", "params", title="layers")
    for layer in info["layers"]:
        layers.add_row(str(layer["index"]), str(layer["from"]), str(layer["repeats"]), layer["type"],
                       f"{layer['parameters']:,}")
    console.print(layers)
    se = Table(title=f"SE blocks ({len(info['se_blocks'])}; C channels, hidden from the weights)",
               box=None, padding=(0, 1, 0, 0))
    for header in ("module", "class", "form", "C", "hidden", "gate", "bias", "assumed"):
        se.add_column(header, overflow="fold")
    notes: list[str] = []
    for block in info["se_blocks"]:
        marks = []
        for text in block["assumed"]:
            notes += [text] if text not in notes else []
            marks.append(f"\\[{notes.index(text) + 1}]")
        se.add_row(block["module"], block["class"].rsplit(".", 1)[-1], block["form"], str(block["channels"]),
                   str(block["hidden"]), block["gate"], "yes" if block["bias"] else "no", " ".join(marks) or "-")
    console.print(se)
    for i, text in enumerate(notes, 1):
        console.print(f"  assumed [{i}]: {text}", markup=False)

"""The consoles the commands print to, and how a check's figures, failures and notes are printed."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

EXIT_CHECK_FAILED = 1  # the command ran, but a check it made failed
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def print_check(figure_lines: list[str], failures: list[str], notes: list[str], indent: str = "  ") -> None:
    """A check's figures (indented), its failures in red, and its notes on stderr."""
    for line in figure_lines:
        out.print(f"{indent}{line}")
    for line in failures:
        out.print(f"  [red]{line}[/red]")
    for line in notes:
        err.print(f"note: {line}")


def deprecated(old: str, new: str) -> None:
    """Say on stderr that an old spelling still works but has a new name (docs/cli.md lists them)."""
    err.print(f"deprecated: {old} still works but is now {new} (see docs/cli.md)")


def finish(data: dict | list, as_json: bool, json_file: Path | None, human: Callable[[], None]) -> None:
    """A command's result: JSON on stdout with ``--json``, else the human report (and, for the old
    ``--json FILE`` spelling, the JSON written to FILE as well)."""
    if as_json and json_file is None:
        print(json.dumps(data, indent=2))
        return
    human()
    if json_file is not None:
        from se_deploy.artifacts import write_text_atomic

        write_text_atomic(json_file, json.dumps(data, indent=2) + "\n")

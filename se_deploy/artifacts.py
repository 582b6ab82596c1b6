"""Artifact files: atomic writes, checksums, the default workspace and newest-artifact lookup."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from se_deploy.errors import SeDeployError

ENGINES_DIR = Path("engines")  # default workspace, relative to the working directory
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEMO_WEIGHTS = ASSETS_DIR / "se-yolov5n-shapes.pt"
DEMO_VIDEO = ASSETS_DIR / "synth_shapes_60f.mp4"
DEMO_IMAGES = ASSETS_DIR / "images"


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the final suffix, so writers that pick a format by suffix still work.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=path.parent)
    except OSError as e:
        raise SeDeployError(f"{path}: cannot write here ({e.strerror or e})") from None
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the artifact gets the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def newest(directory: str | Path, patterns: list[str]) -> Path | None:
    """The most recently modified file in ``directory`` matching any glob in ``patterns``."""
    directory = Path(directory)
    found = [p for pattern in patterns for p in directory.glob(pattern) if p.is_file() and ".partial" not in p.name]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)

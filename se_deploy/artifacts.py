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


def check_output_path(path: str | Path) -> Path:
    """Refuse, before any work, an output file path that can never be written: a directory, or a
    folder beside it that is a file or not writable. Returns the path."""
    path = Path(path)
    if path.is_dir():
        raise SeDeployError(f"{path}: is a directory; give a file name for the output")
    folder = next((p for p in (path.parent, *path.parent.parents) if p.exists()), Path("."))
    if not folder.is_dir():
        raise SeDeployError(f"{path}: cannot write here ({folder} is a file, not a folder)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SeDeployError(f"{path}: cannot write here ({folder} is not writable)")
    return path


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the final suffix, so writers that pick a format by suffix still work.
    """
    path = check_output_path(path)
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
        try:
            os.replace(tmp, path)
        except OSError as e:  # e.g. a directory created at the final name meanwhile
            raise SeDeployError(f"{path}: cannot write here ({e.strerror or e})") from None
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

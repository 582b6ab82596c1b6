"""Each run its own results folder: ``exp``, else the next free ``exp2``, ``exp3``, ... (YOLOv5 detect.py's rule).

A folder is free when it does not exist or is empty. A run claims one by creating a marker file in it
with O_EXCL, which only one process can do, so two runs started at the same moment never share a folder;
the marker is removed when the run ends, and the folder too if the run left it empty.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from se_deploy.errors import SeDeployError

CLAIM_MARKER = ".se-deploy-run"  # holds the process id of the run using the folder
MAX_SIBLINGS = 9999


@contextlib.contextmanager
def claim_run_dir(path: str | Path) -> Iterator[Path]:
    """Yield ``path``, or its first free sibling ``<path>2``, ``<path>3``, ..., claimed for this run."""
    path = Path(path)
    if not path.name:  # ".", "..": siblings are named after the folder itself
        path = path.resolve()
        if not path.name:
            raise SeDeployError(f"{path}: --out-dir needs a folder with a name")
    if path.exists() and not path.is_dir():
        raise SeDeployError(f"{path}: is a file; --out-dir takes a folder")
    for n in range(1, MAX_SIBLINGS + 1):
        candidate = path if n == 1 else path.with_name(f"{path.name}{n}")
        created = _claim(candidate)
        if created is not None:
            break
    else:
        raise SeDeployError(f"{path}: it and {path.name}2 ... {path.name}{MAX_SIBLINGS} are all in use")
    try:
        yield candidate
    finally:
        (candidate / CLAIM_MARKER).unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):  # not empty: the run wrote results
                candidate.rmdir()


def _claim(folder: Path) -> bool | None:
    """Claim ``folder``: True if this made it, False if it was there (empty), None if it is not free."""
    try:
        folder.mkdir(parents=True)
        created = True
    except FileExistsError:
        created = False
        if not folder.is_dir():
            return None
    except OSError as e:
        raise SeDeployError(f"{folder}: cannot create this folder ({e.strerror or e})") from None
    try:
        if not created and any(folder.iterdir()):
            return None
        fd = os.open(folder / CLAIM_MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except (FileExistsError, FileNotFoundError):  # another run claimed it, or removed it, just now
        return None
    except OSError as e:
        raise SeDeployError(f"{folder}: cannot write here ({e.strerror or e})") from None
    with os.fdopen(fd, "w") as marker:
        marker.write(f"{os.getpid()}\n")
    return created

"""YOLOv5 datasets: the DATA.yaml file and YOLO label files, validated line by line.

A DATA.yaml names a root (``path``, relative paths resolve against the YAML's own folder), a split
(``val``: folder(s) of images or a .txt list of image paths, relative to the root), ``names`` and
optionally ``nc``. Labels live beside the images with ``/images/`` replaced by ``/labels/`` and the
suffix by ``.txt``; each line is ``class cx cy w h`` normalised to [0, 1] (or ``class x1 y1 x2 y2 ...``,
a polygon, turned into its bounding box), as YOLOv5 reads them.

An image without a label file has no objects (YOLOv5's rule); a split where no image has one is
refused, since that is a layout mistake, not a background-only set. A label line that is malformed,
has a class id outside ``names`` or coordinates outside [0, 1] is a ``LabelProblem`` with its file and
line: ``load_dataset`` refuses the set, or with ``skip_bad=True`` leaves those images out (as YOLOv5
ignores an image with a corrupt label) and lists them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from se_deploy.errors import SeDeployError, first_line
from se_deploy.inference.preprocess import IMAGE_SUFFIXES



@dataclass(frozen=True)
class LabelProblem:
    """One reason a label file cannot be trusted; ``line`` is 1-based, 0 when it concerns the whole file."""

    file: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}" if self.line else f"{self.file}: {self.message}"


@dataclass
class Dataset:
    """One split of a YOLOv5 dataset, with labels as (K, 5) arrays of ``class cx cy w h`` (normalised)."""

    yaml_path: Path
    split: str
    root: Path
    names: dict[int, str]
    images: list[Path]
    labels: list[np.ndarray]
    missing_labels: list[Path] = field(default_factory=list)  # images without a label file: no objects
    skipped: list[Path] = field(default_factory=list)  # images left out because their label file was bad
    problems: list[LabelProblem] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)  # repairs made the way YOLOv5 makes them

    @property
    def nc(self) -> int:
        return len(self.names)

    @property
    def instances(self) -> int:
        return int(sum(len(lb) for lb in self.labels))


def read_data_yaml(path: str | Path, split: str = "val") -> dict:
    """Parse and check a DATA.yaml for ``split``; returns it with ``path`` absolute and ``names`` as {int: str}."""
    path = Path(path)
    if not path.is_file():
        raise SeDeployError(f"{path}: dataset YAML not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SeDeployError(f"{path}: not valid YAML ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise SeDeployError(f"{path}: expected a mapping with path, val, nc, names")
    missing = [k for k in (split, "names") if data.get(k) in (None, "", [], {})]
    if missing:
        raise SeDeployError(f"{path}: missing key(s) {', '.join(missing)} (YOLOv5 DATA.yaml needs path, val, nc, names)")
    names = data["names"]
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict):
        raise SeDeployError(f"{path}: 'names' must be a list or an {{id: name}} mapping")
    try:
        names = {int(k): str(v) for k, v in names.items()}
    except (TypeError, ValueError):
        raise SeDeployError(f"{path}: 'names' keys must be class ids 0..nc-1") from None
    if sorted(names) != list(range(len(names))):
        raise SeDeployError(f"{path}: 'names' ids must be 0..{len(names) - 1} without gaps, got {sorted(names)}")
    if "nc" in data and data["nc"] != len(names):
        raise SeDeployError(f"{path}: nc is {data['nc']} but 'names' lists {len(names)} classes")
    root = Path(os.path.expanduser(str(data.get("path") or ".")))
    if not root.is_absolute():
        root = path.resolve().parent / root
    return {**data, "path": root.resolve(), "names": names, "nc": len(names)}


def split_images(data: dict, split: str, yaml_path: Path) -> list[Path]:
    """Image files of ``split``: folders (searched recursively), .txt lists of image paths, or single images."""
    entries = data[split] if isinstance(data[split], list) else [data[split]]
    root = data["path"]
    files: list[Path] = []
    for entry in entries:
        p = Path(os.path.expanduser(str(entry)))
        p = p if p.is_absolute() else root / p
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        elif p.is_file() and p.suffix == ".txt":
            for line in p.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    f = Path(line.strip())
                    files.append(f if f.is_absolute() else p.parent / f)
        elif p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            files.append(p)
        else:
            raise SeDeployError(f"{yaml_path}: {split}: {p} does not exist (relative paths start at {root})")
    if not files:
        raise SeDeployError(f"{yaml_path}: {split}: no images found in {', '.join(map(str, entries))}")
    return files


def label_path(image: Path) -> Path:
    """YOLOv5's label location: the last ``/images/`` in the path becomes ``/labels/``, the suffix ``.txt``."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    text = str(image)
    if sa in text:
        head, tail = text.rsplit(sa, 1)
        text = head + sb + tail
    return Path(os.path.splitext(text)[0] + ".txt")


def parse_label_file(path: Path, nc: int) -> tuple[np.ndarray, list[LabelProblem], list[str]]:
    """Rows ``class cx cy w h`` of one label file, the problems found and the notices (duplicates dropped)."""
    problems: list[LabelProblem] = []
    rows: list[list[float]] = []
    lines: list[int] = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return np.zeros((0, 5), np.float32), [LabelProblem(path, 0, f"cannot be read ({e})")], []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        problem = _check_line(fields, nc)
        if problem:
            problems.append(LabelProblem(path, number, problem))
            continue
        values = [float(v) for v in fields]
        if len(values) > 5:  # polygon: its bounding box, as centre and size
            xy = np.asarray(values[1:]).reshape(-1, 2)
            (x1, y1), (x2, y2) = xy.min(0), xy.max(0)
            values = [values[0], (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
        rows.append(values)
        lines.append(number)
    labels = np.asarray(rows, np.float32).reshape(-1, 5)
    notices = []
    if len(labels):
        _, first = np.unique(labels, axis=0, return_index=True)
        if len(first) < len(labels):
            dropped = sorted(set(range(len(labels))) - set(first.tolist()))
            notices = [f"{path}:{lines[i]}: duplicate of an earlier line, dropped" for i in dropped]
            labels = labels[np.sort(first)]
    return labels, problems, notices


def _check_line(fields: list[str], nc: int) -> str | None:
    """Why a split label line is unusable, or None."""
    if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
        return f"expected 'class cx cy w h' (5 values) or a polygon 'class x1 y1 x2 y2 x3 y3 ...', got {len(fields)} values"
    try:
        values = [float(v) for v in fields]
    except ValueError:
        return f"not a number in {' '.join(fields)!r}"
    if not all(np.isfinite(values)):
        return "non-finite value"
    cls = values[0]
    if cls != int(cls):
        return f"class id {fields[0]} is not an integer"
    if not 0 <= cls < nc:
        return f"class id {int(cls)} out of range 0..{nc - 1} (nc {nc})"
    coords = values[1:]
    if min(coords) < 0 or max(coords) > 1:
        return "coordinates must be normalised to [0, 1]"
    if len(fields) == 5 and (coords[2] <= 0 or coords[3] <= 0):
        return "box width and height must be > 0"
    return None


def load_dataset(data_yaml: str | Path, split: str = "val", skip_bad: bool = False) -> Dataset:
    """Images and validated labels of one split of a YOLOv5 dataset.

    Bad label lines raise a SeDeployError naming the first of them (and how many more), unless
    ``skip_bad``: then the images they belong to are left out and recorded in ``skipped``/``problems``.
    """
    yaml_path = Path(data_yaml)
    data = read_data_yaml(yaml_path, split)
    nc = data["nc"]
    images = split_images(data, split, yaml_path)
    dataset = Dataset(yaml_path, split, data["path"], data["names"], [], [])
    for image in images:
        lbl = label_path(image)
        if not lbl.is_file():
            dataset.missing_labels.append(image)
            dataset.images.append(image)
            dataset.labels.append(np.zeros((0, 5), np.float32))
            continue
        labels, problems, notices = parse_label_file(lbl, nc)
        dataset.notices += notices
        if problems:
            dataset.problems += problems
            dataset.skipped.append(image)
            continue
        dataset.images.append(image)
        dataset.labels.append(labels)
    if len(dataset.missing_labels) == len(images):
        raise SeDeployError(
            f"{yaml_path}: {split}: none of the {len(images)} images has a label file "
            f"(looked for e.g. {label_path(images[0])})"
        )
    if dataset.problems and not skip_bad:
        first, more = dataset.problems[0], len(dataset.problems) - 1
        extra = f" (and {more} more problem{'s' * (more > 1)} in {len(dataset.skipped)} label files)" if more else ""
        raise SeDeployError(f"bad label: {first}{extra}; fix it or pass --skip-bad-labels to leave those images out")
    if not dataset.images:
        raise SeDeployError(f"{yaml_path}: {split}: every image was left out for bad labels")
    return dataset

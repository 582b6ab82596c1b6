"""DATA.yaml and YOLO label parsing: what is accepted, and every bad input reported with file and line."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import run_cli

from se_deploy.evaluation.dataset import label_path, load_dataset
from se_deploy.errors import SeDeployError

NAMES = {0: "circle", 1: "rectangle", 2: "triangle"}


def make_set(tmp_path: Path, fixtures: Path, n: int = 4, data: dict | None = None) -> Path:
    """A copy of the first ``n`` fixture val images and labels, with a DATA.yaml using a relative path."""
    src = fixtures / "dataset"
    root = tmp_path / "set"
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    for image in sorted((src / "images" / "val").glob("*.jpg"))[:n]:
        shutil.copy(image, root / "images" / "val" / image.name)
        shutil.copy(src / "labels" / "val" / f"{image.stem}.txt", root / "labels" / "val" / f"{image.stem}.txt")
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    yaml_path = cfg / "data.yaml"
    yaml_path.write_text(yaml.safe_dump(data if data is not None else
                                        {"path": "../set", "val": "images/val", "nc": 3, "names": NAMES}))
    return yaml_path


def label_file(yaml_path: Path, index: int = 0) -> Path:
    return sorted((yaml_path.parent.parent / "set" / "labels" / "val").glob("*.txt"))[index]


def test_fixture_dataset_loads_with_path_relative_to_the_yaml(fixtures, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the yaml's 'path: .' must not depend on the working directory
    ds = load_dataset(fixtures / "dataset" / "synth_shapes.yaml")
    assert ds.root == (fixtures / "dataset").resolve()
    assert len(ds.images) == 60 and ds.instances == 199
    assert ds.names == NAMES
    assert not ds.missing_labels and not ds.problems and not ds.skipped
    first = np.loadtxt(fixtures / "dataset" / "labels" / "val" / "val_000000.txt", ndmin=2)
    np.testing.assert_allclose(ds.labels[0], first, atol=1e-6)


def test_label_path_replaces_the_last_images_folder():
    assert label_path(Path("/d/images/x/images/val/a.b.jpg")) == Path("/d/images/x/labels/val/a.b.txt")


@pytest.mark.parametrize("drop, word", [("names", "names"), ("val", "val")])
def test_missing_keys_are_named(fixtures, tmp_path, drop, word):
    data = {"path": "../set", "val": "images/val", "nc": 3, "names": NAMES}
    del data[drop]
    yaml_path = make_set(tmp_path, fixtures, data=data)
    with pytest.raises(SeDeployError, match=f"missing key.*{word}"):
        load_dataset(yaml_path)


def test_inconsistent_yaml_is_refused(fixtures, tmp_path):
    yaml_path = make_set(tmp_path, fixtures, data={"path": "../set", "val": "images/val", "nc": 4, "names": NAMES})
    with pytest.raises(SeDeployError, match="nc is 4 but 'names' lists 3"):
        load_dataset(yaml_path)
    yaml_path.write_text(yaml.safe_dump({"path": "../set", "val": "images/nowhere", "names": NAMES}))
    with pytest.raises(SeDeployError, match="does not exist"):
        load_dataset(yaml_path)
    yaml_path.write_text("path: [unclosed\n")
    with pytest.raises(SeDeployError, match="not valid YAML"):
        load_dataset(yaml_path)


def test_names_as_list_and_nc_optional(fixtures, tmp_path):
    yaml_path = make_set(tmp_path, fixtures, data={"path": "../set", "val": "images/val",
                                                   "names": ["circle", "rectangle", "triangle"]})
    assert load_dataset(yaml_path).names == NAMES


def test_image_folder_without_any_labels_is_refused(fixtures, tmp_path):
    yaml_path = make_set(tmp_path, fixtures)
    shutil.rmtree(yaml_path.parent.parent / "set" / "labels")
    with pytest.raises(SeDeployError, match="none of the 4 images has a label file"):
        load_dataset(yaml_path)


def test_some_images_without_labels_count_as_background(fixtures, tmp_path):
    yaml_path = make_set(tmp_path, fixtures)
    label_file(yaml_path, 1).unlink()
    ds = load_dataset(yaml_path)
    assert len(ds.images) == 4 and len(ds.missing_labels) == 1
    assert ds.labels[1].shape == (0, 5)


@pytest.mark.parametrize("line, message", [
    ("3 0.5 0.5 0.1 0.1", "class id 3 out of range 0..2"),
    ("-1 0.5 0.5 0.1 0.1", "class id -1 out of range"),
    ("1.5 0.5 0.5 0.1 0.1", "class id 1.5 is not an integer"),
    ("0 0.5 0.5 0.1", "expected 'class cx cy w h'"),
    ("0 0.5 0.5 0.1 0.1 0.2", "got 6 values"),
    ("0 0.5 abc 0.1 0.1", "not a number"),
    ("0 0.5 0.5 1.2 0.1", "normalised"),
    ("0 0.5 0.5 0.0 0.1", "width and height must be > 0"),
])
def test_bad_label_lines_are_refused_with_file_and_line(fixtures, tmp_path, line, message):
    yaml_path = make_set(tmp_path, fixtures)
    bad = label_file(yaml_path, 2)
    lines = bad.read_text().splitlines()
    bad.write_text("\n".join([lines[0], line, *lines[1:]]) + "\n")
    with pytest.raises(SeDeployError, match=re.escape(f"{bad}:2: ") + ".*" + re.escape(message)):
        load_dataset(yaml_path)


def test_skip_bad_labels_leaves_the_image_out_and_lists_every_problem(fixtures, tmp_path):
    yaml_path = make_set(tmp_path, fixtures)
    bad = label_file(yaml_path, 2)
    bad.write_text(bad.read_text() + "7 0.5 0.5 0.1 0.1\nnonsense\n")
    with pytest.raises(SeDeployError, match=r"and 1 more problem in 1 label files"):
        load_dataset(yaml_path)
    ds = load_dataset(yaml_path, skip_bad=True)
    assert len(ds.images) == 3 and [p.stem for p in ds.skipped] == [bad.stem]
    assert [(p.file, p.line) for p in ds.problems] == [(bad, len(bad.read_text().splitlines()) - 1),
                                                       (bad, len(bad.read_text().splitlines()))]


def test_polygon_lines_become_boxes_and_duplicates_are_dropped_with_a_notice(fixtures, tmp_path):
    yaml_path = make_set(tmp_path, fixtures)
    f = label_file(yaml_path, 0)
    f.write_text("1 0.1 0.2 0.5 0.2 0.5 0.6 0.1 0.6\n0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2\n")
    ds = load_dataset(yaml_path)
    np.testing.assert_allclose(ds.labels[0], [[1, 0.3, 0.4, 0.4, 0.4], [0, 0.5, 0.5, 0.2, 0.2]], atol=1e-6)
    assert ds.notices == [f"{f}:3: duplicate of an earlier line, dropped"]


def test_cli_reports_bad_data_as_one_line_exit_2(fixtures, tmp_path):
    yaml_path = make_set(tmp_path, fixtures)
    bad = label_file(yaml_path, 0)
    bad.write_text("5 0.5 0.5 0.1 0.1\n")
    r = run_cli("val", "--model", fixtures / "onnx" / "upstream-export-320.onnx", "--data", yaml_path)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: bad label: {bad}:1: class id 5 out of range 0..2 (nc 3); "
                                "fix it or pass --skip-bad-labels to leave those images out")

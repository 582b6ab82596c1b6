"""Pre-processing, NMS and runners against what upstream YOLOv5 computed on the fixtures."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import cv2
import numpy as np
import pytest
from conftest import CLIP, REFS, REPO, ref_input

from se_deploy.inference.annotate import Annotator, class_colour
from se_deploy.errors import SeDeployError
from se_deploy.inference.postprocess import box_iou, detection_agreement, non_max_suppression, scale_boxes
from se_deploy.inference.preprocess import Letterboxer, letterbox, to_input
from se_deploy.runners import load_runner
from se_deploy.inference.video_pipeline import BufferPool


def _video_frames(fixtures, indices):
    cap = cv2.VideoCapture(str(CLIP))
    frames = []
    for i in range(max(indices) + 1):
        ok, frame = cap.read()
        assert ok
        if i in indices:
            frames.append(frame)
    return frames


def test_letterbox_matches_upstream_inputs(fixtures):
    images = [cv2.imread(str(fixtures / "dataset/images/val" / f"val_00000{i}.jpg")) for i in range(3)]
    batch, _ = Letterboxer((320, 320), max_batch=3).prepare(images)
    assert np.array_equal(batch, ref_input("input_val3"))

    frames = _video_frames(fixtures, [0, 30])
    expected = ref_input("input_video_f0_f30")
    boxer = Letterboxer((320, 320), max_batch=2)
    batch, infos = boxer.prepare(frames)
    assert np.array_equal(batch, expected)
    assert infos[0].ratio == 0.5 and infos[0].pad == (0.0, 40.0) and infos[0].orig_hw == (480, 640)
    # the buffer is reused: a second call writes into the same memory and stays correct
    again, _ = boxer.prepare(frames)
    assert again.base is batch.base or np.shares_memory(again, batch)
    assert np.array_equal(again, expected)
    # the one-image reference path agrees with the buffered one
    assert np.array_equal(to_input(letterbox(frames[0], (320, 320))[0]), expected[0])


def test_letterboxer_writes_any_frame_shape_into_the_given_buffer():
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, shape, np.uint8) for shape in
              [(480, 640, 3), (640, 480, 3), (320, 320, 3), (100, 700, 3), (480, 640, 3)]]  # wide, tall, exact, ...
    boxer = Letterboxer((320, 320))
    out = np.full((len(frames), 3, 320, 320), -1, np.float32)
    batch, infos = boxer.prepare(frames, out)
    assert batch is out
    for frame, image, info in zip(frames, out, infos):
        reference, ratio, pad = letterbox(frame, (320, 320))
        assert np.array_equal(image, to_input(reference)) and (info.ratio, info.pad) == (ratio, pad)


def test_letterbox_minimal_padding_like_detect_py():
    img = np.zeros((480, 640, 3), np.uint8)
    out, ratio, pad = letterbox(img, (320, 320), auto=True, stride=32)
    assert out.shape == (256, 320, 3) and ratio == 0.5 and pad == (0.0, 8.0)


@pytest.mark.parametrize("name", ["input_val3", "input_video_f0_f30", "input_rand_seed0"])
def test_nms_matches_upstream(name):
    pred = np.load(REFS / "se-yolov5n-shapes" / f"raw_{name}.npy")
    ref = json.loads((REFS / "se-yolov5n-shapes" / f"nms_{name}.json").read_text())
    ours = non_max_suppression(pred, ref["conf_thres"], ref["iou_thres"], max_det=ref["max_det"])
    expected = {d["index"]: np.array(d["xyxy_conf_cls_input_space"], np.float32).reshape(-1, 6) for d in ref["detections"]}
    for i, dets in enumerate(ours):
        want = expected.get(i, np.zeros((0, 6), np.float32))
        assert dets.shape == want.shape
        assert np.allclose(dets, want, atol=1e-3)


def test_scale_boxes_to_original_frame():
    pred = np.load(REFS / "se-yolov5n-shapes" / "raw_input_video_f0_f30.npy")
    ref = json.loads((REFS / "se-yolov5n-shapes" / "nms_input_video_f0_f30.json").read_text())
    from se_deploy.inference.preprocess import LetterboxInfo

    info = LetterboxInfo((480, 640), 0.5, (0.0, 40.0))
    for dets, entry in zip(non_max_suppression(pred), ref["detections"]):
        scaled = scale_boxes(dets, info)
        assert np.allclose(scaled[:, :4].round(), np.array(entry["xyxy_conf_cls_original_image_rounded"])[:, :4], atol=1)


def _greedy_nms(boxes, scores, iou_thres):
    order = list(np.argsort(-scores, kind="stable"))
    keep = []
    while order:
        best = order.pop(0)
        keep.append(best)
        order = [j for j in order if box_iou(boxes[best : best + 1], boxes[j : j + 1])[0, 0] <= iou_thres]
    return keep


def test_nms_is_class_aware_and_greedy():
    rng = np.random.default_rng(0)
    n, nc = 200, 3
    pred = np.zeros((1, n, 5 + nc), np.float32)
    pred[0, :, :2] = rng.uniform(40, 120, (n, 2))
    pred[0, :, 2:4] = rng.uniform(10, 60, (n, 2))
    pred[0, :, 4] = rng.uniform(0.3, 1.0, n)
    pred[0, :, 5:] = rng.uniform(0, 1, (n, nc))
    dets = non_max_suppression(pred, 0.25, 0.45, max_det=1000)[0]
    # reference: plain greedy NMS run separately per class
    scores = pred[0, :, 5:] * pred[0, :, 4:5]
    cls = scores.argmax(1)
    conf = scores.max(1)
    xy, half = pred[0, :, :2], pred[0, :, 2:4] / 2
    boxes = np.concatenate((xy - half, xy + half), 1)
    expected = 0
    for c in range(nc):
        idx = np.nonzero((cls == c) & (conf > 0.25))[0]
        kept = _greedy_nms(boxes[idx], conf[idx], 0.45)
        expected += len(kept)
        ours = dets[dets[:, 5] == c]
        assert np.allclose(np.sort(ours[:, 4]), np.sort(conf[idx][kept]), atol=1e-6)
    assert len(dets) == expected
    assert np.all(np.diff(dets[:, 4]) <= 0)  # sorted by confidence
    assert len(non_max_suppression(pred, 0.25, 0.45, max_det=5)[0]) == 5
    assert set(non_max_suppression(pred, 0.25, 0.45, classes=[1])[0][:, 5]) == {1.0}


def test_max_det_keeps_the_same_first_boxes_as_nms_over_everything():
    """At mAP's conf 0.001 a detector sends ~100 near-copies of each object to NMS, the most confident
    objects' copies first; stopping once max_det boxes survive must not change which survive."""
    rng = np.random.default_rng(1)
    objects, copies, nc = 60, 100, 3
    centre, size = rng.uniform(20, 300, (objects, 2)), rng.uniform(15, 40, (objects, 2))
    objectness, class_scores = rng.uniform(0.01, 1.0, objects), rng.uniform(0.05, 1.0, (objects, nc))
    of = np.repeat(np.arange(objects), copies)  # the object each prediction is a copy of
    pred = np.zeros((1, objects * copies, 5 + nc), np.float32)
    pred[0, :, :2] = centre[of] + rng.uniform(-1, 1, (len(of), 2))
    pred[0, :, 2:4] = size[of] + rng.uniform(-1, 1, (len(of), 2))
    pred[0, :, 4] = objectness[of] * rng.uniform(0.9, 1.0, len(of))
    pred[0, :, 5:] = class_scores[of] * rng.uniform(0.9, 1.0, (len(of), nc))
    everything = non_max_suppression(pred, 0.001, 0.6, max_det=len(of) * nc, multi_label=True)[0]
    assert len(everything) == objects * nc  # one box per object and class survives
    for max_det in (1, 50, 100, 150):
        dets = non_max_suppression(pred, 0.001, 0.6, max_det=max_det, multi_label=True)[0]
        assert np.array_equal(dets, everything[:max_det])


def test_detection_agreement():
    a = [np.array([[0, 0, 10, 10, 0.9, 0], [20, 20, 30, 30, 0.8, 1]], np.float32)]
    assert detection_agreement(a, a) == 1.0
    other_class = [a[0].copy()]
    other_class[0][1, 5] = 2
    assert detection_agreement(a, other_class) == 0.5
    assert detection_agreement([np.zeros((0, 6))], [np.zeros((0, 6))]) == 1.0


def test_onnx_runner_runs_upstream_export(fixtures):
    x = ref_input("input_val3")
    with load_runner(fixtures / "onnx" / "upstream-export-320.onnx", device="cpu") as runner:
        assert runner.backend == "onnxruntime" and runner.device == "cpu"
        assert runner.names == {0: "circle", 1: "rectangle", 2: "triangle"} and runner.stride == 32
        assert runner.imgsz == (320, 320) and runner.static_batch == 1 and runner.precision == "fp32"
        out = runner.infer(x)  # batch 3 through a static batch-1 model: run in chunks
        ref = np.load(REFS / "se-yolov5n-shapes" / "raw_input_val3.npy")
        assert np.abs(out[..., 4:] - ref[..., 4:]).max() < 1e-4
        assert np.abs(out[..., :4] - ref[..., :4]).max() < 1e-2
        with pytest.raises(SeDeployError, match="320x320"):
            runner.infer(np.zeros((1, 3, 256, 320), np.float32))


def test_runner_refusals(tmp_path):
    (tmp_path / "model.xyz").write_text("x")
    with pytest.raises(SeDeployError, match="unknown model type"):
        load_runner(tmp_path / "model.xyz")
    with pytest.raises(SeDeployError, match="not found"):
        load_runner(tmp_path / "missing.onnx")
    (tmp_path / "bad.onnx").write_text("not a protobuf")
    with pytest.raises(SeDeployError, match="cannot load"):
        load_runner(tmp_path / "bad.onnx").activate()


def test_onnx_path_does_not_import_torch(fixtures):
    code = (
        "import sys, numpy as np\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from se_deploy.runners import load_runner\n"
        "from se_deploy.inference.postprocess import non_max_suppression\n"
        f"r = load_runner({str(fixtures / 'onnx' / 'upstream-export-320.onnx')!r}).activate()\n"
        "non_max_suppression(r.infer(np.zeros((1, 3, 320, 320), np.float32)))\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_buffer_pool_bounds_memory_and_waits_for_a_release():
    stop = threading.Event()
    pool = BufferPool(2, np.float32, stop)
    a, b = pool.acquire((1, 3, 4, 4)), pool.acquire((1, 3, 4, 4))
    assert a is not b and a.dtype == np.float32 and a.shape == (1, 3, 4, 4)
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire((1, 3, 4, 4))))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and not got  # both arrays of that shape are in use: it waits
    pool.release(a)
    waiter.join(2)
    assert got and got[0] is a  # handed the released array, nothing new made
    assert pool.acquire((2, 3, 4, 4)) is not None  # another shape has its own allowance
    stopper = threading.Timer(0.2, stop.set)
    stopper.start()
    assert pool.acquire((1, 3, 4, 4)) is None  # a stopping run is not kept waiting
    stopper.join()


def test_buffer_pool_keeps_free_arrays_of_recent_shapes_only():
    pool = BufferPool(3, np.uint8, threading.Event())
    first = pool.acquire((8, 8, 3))
    pool.release(first)
    for side in range(9, 9 + BufferPool.MAX_SHAPES):  # a run of other shapes pushes (8, 8, 3) out
        pool.release(pool.acquire((side, side, 3)))
    assert pool.acquire((8, 8, 3)) is not first


def test_annotator_draws_box_and_label_in_the_class_colour():
    frame = np.zeros((480, 640, 3), np.uint8)
    Annotator({2: "triangle"}, (480, 640)).draw(frame, np.array([[100, 150, 300, 400, 0.87, 2]], np.float32))
    colour = class_colour(2)
    for y, x in [(275, 100), (275, 300), (150, 200), (400, 200)]:  # the four sides
        assert tuple(frame[y, x]) == colour
    assert not frame[155:395, 105:295].any()  # inside the box: untouched
    label = frame[125:150, 100:300]  # the label band above the box: class colour with white text
    assert (label == colour).all(axis=2).sum() > 500 and (label == 255).all(axis=2).sum() > 50
    assert not frame[:120].any() and not frame[:, 310:].any() and not frame[405:].any()  # nothing elsewhere

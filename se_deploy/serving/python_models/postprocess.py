"""End-to-end post-processing (written by ``se-deploy triton --e2e``): raw YOLOv5 predictions -> NMS ->
boxes on the original image, with se-deploy's own non_max_suppression and scale_boxes, copied beside
this file, and the class names from labels.txt.

Per image: ``detections`` rows (x1, y1, x2, y2, conf, class), ``names`` the class name of each row and
``count`` how many rows are real (images of one request are padded to the same number of rows).
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the se_deploy modules copied beside this file
from se_deploy.inference.postprocess import non_max_suppression, scale_boxes  # noqa: E402
from se_deploy.inference.preprocess import LetterboxInfo  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.conf = float(params["se_deploy.conf"])
        self.iou = float(params["se_deploy.iou"])
        self.max_det = int(params["se_deploy.max_det"])
        with open(os.path.join(args["model_repository"], "labels.txt"), encoding="utf-8") as f:
            self.names = [line.rstrip("\n") for line in f]

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _one(self, request):
        pred = pb_utils.get_input_tensor_by_name(request, "predictions").as_numpy()
        geometry = pb_utils.get_input_tensor_by_name(request, "letterbox").as_numpy()
        found = non_max_suppression(pred, self.conf, self.iou, max_det=self.max_det)
        dets = [scale_boxes(d, LetterboxInfo((int(g[0]), int(g[1])), float(g[2]), (float(g[3]), float(g[4]))))
                for d, g in zip(found, geometry)]
        rows = max([len(d) for d in dets] + [0])
        boxes = np.zeros((len(dets), rows, 6), np.float32)
        names = np.full((len(dets), rows), b"", dtype=object)
        for i, d in enumerate(dets):
            boxes[i, : len(d)] = d
            names[i, : len(d)] = [self._name(int(c)).encode() for c in d[:, 5]]
        count = np.array([[len(d)] for d in dets], np.int32)
        return pb_utils.InferenceResponse([pb_utils.Tensor("detections", boxes), pb_utils.Tensor("names", names),
                                           pb_utils.Tensor("count", count)])

    def _name(self, cls: int) -> str:
        return self.names[cls] if 0 <= cls < len(self.names) else str(cls)

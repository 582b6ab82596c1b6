"""End-to-end pre-processing (written by ``se-deploy triton --e2e``): encoded image bytes -> decoded BGR
-> YOLOv5 letterbox, with se-deploy's own Letterboxer, copied beside this file.

Outputs the detector's input and the letterbox geometry (original h, w, ratio, pad w, pad h) the
post-processing needs to map boxes back onto the original image.
"""

import json
import os
import sys

import cv2
import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the se_deploy modules copied beside this file
from se_deploy.inference.preprocess import Letterboxer  # noqa: E402

IMAGE, LETTERBOX = "image", "letterbox"


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        imgsz = json.loads(config["parameters"]["se_deploy.imgsz"]["string_value"])
        self.output_name = next(o["name"] for o in config["output"] if o["name"] != LETTERBOX)
        output = pb_utils.get_output_config_by_name(config, self.output_name)
        self.dtype = pb_utils.triton_string_to_numpy(output["data_type"])
        self.letterboxer = Letterboxer(tuple(imgsz))

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _one(self, request):
        encoded = pb_utils.get_input_tensor_by_name(request, IMAGE).as_numpy().reshape(-1)
        images = []
        for i, data in enumerate(encoded):
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if len(data) else None
            if image is None:
                return pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"image {i} of the request ({len(data)} bytes) cannot be decoded as an image"))
            images.append(image)
        batch = np.empty((len(images), 3, *self.letterboxer.imgsz), np.float32)
        _, infos = self.letterboxer.prepare(images, batch)
        geometry = np.array([[*info.orig_hw, info.ratio, *info.pad] for info in infos], np.float64)
        return pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, batch.astype(self.dtype, copy=False)),
                                           pb_utils.Tensor(LETTERBOX, geometry)])

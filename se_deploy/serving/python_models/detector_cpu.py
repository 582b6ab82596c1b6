"""The detector's ONNX on ONNX Runtime's CPU provider (written by ``se-deploy triton --cpu``).

The requests the dynamic batcher hands over together run as one batch, then are split back per request.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # idle ORT threads sleep rather than spin: other instances and the pre/post models need the cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        inputs = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        try:
            if len({x.shape[1:] for x in inputs}) == 1:  # one batch for all requests
                pred = self.session.run([self.output_name], {self.input_name: np.concatenate(inputs)})[0]
                outputs = np.split(pred, np.cumsum([len(x) for x in inputs])[:-1])
            else:
                outputs = [self.session.run([self.output_name], {self.input_name: x})[0] for x in inputs]
        except Exception as e:  # ONNX Runtime's own exception types; each request gets the message
            error = pb_utils.TritonError(f"ONNX Runtime: {str(e).splitlines()[0][:300]}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        return [pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, np.ascontiguousarray(out))])
                for out in outputs]

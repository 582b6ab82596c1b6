"""The --max-map-drop search: Q/DQ bypass per block, greedy order by sensitivity, confirmation by the quantizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from se_deploy.precision import precision_budget
from se_deploy.precision.precision_budget import fit_map_budget, keep_in_high_precision, quantized_blocks

BLOCKS = ["model.0", "model.1", "model.2"]


def qdq(name: str, nodes: list, inits: list) -> str:
    """Append Q -> DQ for tensor ``name``; return the DQ output."""
    inits += [numpy_helper.from_array(np.array(0.1, np.float32), f"{name}_s"),
              numpy_helper.from_array(np.array(0, np.int8), f"{name}_z")]
    nodes += [helper.make_node("QuantizeLinear", [name, f"{name}_s", f"{name}_z"], [f"{name}_q"], name=f"{name}_Q"),
              helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"],
                               name=f"{name}_DQ")]
    return f"{name}_dq"


def tiny_qdq_model() -> onnx.ModelProto:
    """images -> three 1x1 convs (/model.N/conv/Conv), every input and weight behind Q/DQ."""
    nodes, inits, x = [], [], "images"
    for i, block in enumerate(BLOCKS):
        w = f"{block}.weight"
        inits.append(numpy_helper.from_array(np.full((1, 1, 1, 1), 0.5 + i, np.float32), w))
        out = f"/{block}/conv/Conv_output_0" if i < 2 else "output0"
        nodes.append(helper.make_node("Conv", [qdq(x, nodes, inits), qdq(w, nodes, inits)], [out],
                                      name=f"/{block}/conv/Conv"))
        x = out
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 1, 2, 2])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 1, 2, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def still_quantized(path: Path) -> set[str]:
    return set(quantized_blocks(onnx.load(str(path))))


def test_blocks_and_bypass():
    model = tiny_qdq_model()
    assert quantized_blocks(model) == {b: [f"/{b}/conv/Conv"] for b in BLOCKS}
    kept = keep_in_high_precision(model, {"/model.1/conv/Conv"})
    onnx.checker.check_model(kept)
    assert set(quantized_blocks(kept)) == {"model.0", "model.2"}
    conv1 = next(n for n in kept.graph.node if n.name == "/model.1/conv/Conv")
    assert list(conv1.input) == ["/model.0/conv/Conv_output_0", "model.1.weight"]
    names = {n.name for n in kept.graph.node}
    assert "model.1.weight_Q" not in names and "/model.0/conv/Conv_output_0_Q" not in names  # dead Q/DQ removed
    assert "model.1.weight_s" not in {i.name for i in kept.graph.initializer}
    x = np.random.default_rng(0).random((1, 1, 2, 2), dtype=np.float32)
    import onnxruntime as ort

    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]  # noqa: E731
    everything = keep_in_high_precision(model, {f"/{b}/conv/Conv" for b in BLOCKS})
    np.testing.assert_allclose(run(everything), x * 0.5 * 1.5 * 2.5, rtol=1e-6)  # no rounding left at all
    assert not np.allclose(run(model), run(everything), rtol=1e-6)


LOSS = {"model.0": 0.001, "model.1": 0.03, "model.2": 0.01}  # mAP each block loses while quantized


@pytest.fixture
def fake_map(monkeypatch):
    """evaluate() stand-in: 0.5 minus the loss of every block still quantized in the file (plus a 'penalty' prop)."""
    calls = []

    def evaluate(path, dataset, **kw):
        model = onnx.load(str(path))
        penalty = float({p.key: p.value for p in model.metadata_props}.get("penalty", 0))
        calls.append(path)
        return {"map50_95": 0.5 - sum(LOSS[b] for b in quantized_blocks(model)) - penalty}

    import se_deploy.evaluation.evaluate

    monkeypatch.setattr(se_deploy.evaluation.evaluate, "evaluate", evaluate)
    return calls


def requantizer(model: onnx.ModelProto, penalty_while: str | None = None):
    """Quantizer stand-in: the model with ``nodes`` left out; a penalty while ``penalty_while`` stays INT8."""

    def requantize(nodes, out):
        result = keep_in_high_precision(model, set(nodes))
        if penalty_while and penalty_while in quantized_blocks(result):
            result.metadata_props.add(key="penalty", value="0.02")
        onnx.save(result, out)
        return Path(out)

    return requantize


def test_greedy_keeps_the_most_sensitive_block_first(fake_map, tmp_path):
    model = tiny_qdq_model()
    onnx.save(model, tmp_path / "int8.onnx")
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(keep_in_high_precision(model, {f"/{b}/conv/Conv" for b in BLOCKS}), fp32)
    result = fit_map_budget(fp32, tmp_path / "int8.onnx", None, 1.5, requantizer(model), tmp_path / "out.onnx")
    assert result.sensitivity == pytest.approx({"model.0": 0.1, "model.1": 3.0, "model.2": 1.0})
    assert result.kept_blocks == ["model.1"] and result.kept_nodes == ["/model.1/conv/Conv"]
    assert result.met and result.drop == pytest.approx(1.1)
    assert still_quantized(result.model) == {"model.0", "model.2"}

    tight = fit_map_budget(fp32, tmp_path / "int8.onnx", None, 0.05, requantizer(model), tmp_path / "out2.onnx")
    assert tight.kept_blocks == ["model.1", "model.2", "model.0"] and tight.met and tight.drop == pytest.approx(0)


def test_quantizer_result_is_confirmed_and_widened(fake_map, tmp_path):
    model = tiny_qdq_model()
    onnx.save(model, tmp_path / "int8.onnx")
    # the real quantizer loses 2 more points while model.2 stays INT8: the trial said model.1 was enough
    result = fit_map_budget(tmp_path / "int8.onnx", tmp_path / "int8.onnx", None, 1.5,
                            requantizer(model, penalty_while="model.2"), tmp_path / "out.onnx", fp32_map=0.5)
    assert [s["kept"] for s in result.steps if s["quantizer"]] == [["model.1"], ["model.1", "model.2"]]
    assert result.kept_blocks == ["model.1", "model.2"] and result.met
    assert result.drop == pytest.approx(0.1)


def test_within_budget_keeps_everything_int8(fake_map, tmp_path):
    model = tiny_qdq_model()
    onnx.save(model, tmp_path / "int8.onnx")
    result = fit_map_budget(tmp_path / "int8.onnx", tmp_path / "int8.onnx", None, 5.0, requantizer(model),
                            tmp_path / "out.onnx", fp32_map=0.5)
    assert result.met and result.kept_blocks == [] and result.model == tmp_path / "int8.onnx"
    assert not (tmp_path / "out.onnx").exists()
    with pytest.raises(precision_budget.SeDeployError, match="must be >= 0"):
        fit_map_budget(tmp_path / "int8.onnx", tmp_path / "int8.onnx", None, -1, requantizer(model), tmp_path / "x")


def test_summary_names_the_kept_blocks():
    result = precision_budget.BudgetResult(0.2, 0.14, 0.135, 0.142, True, ["model.6"], ["a", "b"], Path("m.onnx"))
    assert result.summary() == ("INT8 drops mAP@0.5:0.95 by 0.50 points against FP32; with model.6 kept out of "
                                "INT8 (most sensitive first, 2 nodes) by -0.20: within --max-map-drop 0.2")


def test_quantize_cli_needs_int8_and_data_for_a_budget(fixtures):
    from conftest import FIXTURES, run_cli

    model = FIXTURES / "onnx" / "upstream-export-320.onnx"
    for args in (["--precision", "fp16", "--data", "d.yaml"], ["--precision", "int8", "--calib", "."]):
        r = run_cli("quantize", model, *args, "--max-map-drop", "1")
        assert r.returncode == 2 and r.stderr.strip() == "error: --max-map-drop needs --precision int8 and --data DATA.yaml"


def test_int8_stored_weights_are_restored_from_the_fp32_model():
    nodes, inits = [], []
    w = numpy_helper.from_array(np.array([[[[5]]]], np.int8), "model.0.weight")  # 0.5 stored as 5 * 0.1
    inits += [w, numpy_helper.from_array(np.array(0.1, np.float32), "w_s"),
              numpy_helper.from_array(np.array(0, np.int8), "w_z")]
    nodes.append(helper.make_node("DequantizeLinear", ["model.0.weight", "w_s", "w_z"], ["w_dq"], name="w_DQ"))
    nodes.append(helper.make_node("Conv", [qdq("images", nodes, inits), "w_dq"], ["output0"], name="/model.0/conv/Conv"))
    graph = helper.make_graph(nodes, "dq-only", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 1, 2, 2])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 1, 2, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    original = numpy_helper.from_array(np.full((1, 1, 1, 1), 0.53, np.float32), "model.0.weight")

    kept = keep_in_high_precision(model, {"/model.0/conv/Conv"}, {"model.0.weight": original})
    onnx.checker.check_model(kept)
    assert [n.op_type for n in kept.graph.node] == ["Conv"]
    assert list(kept.graph.node[0].input) == ["images", "model.0.weight_float"]
    assert numpy_helper.to_array(kept.graph.initializer[0]).item() == pytest.approx(0.53)
    assert [i.name for i in kept.graph.initializer] == ["model.0.weight_float"]
    # without the FP32 weights the INT8 weight stays (its activations still leave INT8)
    assert [n.op_type for n in keep_in_high_precision(model, {"/model.0/conv/Conv"}).graph.node] == ["DequantizeLinear", "Conv"]

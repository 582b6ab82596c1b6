"""Figures for every SE form se-deploy rebuilds from a fork's checkpoint (docs/loading.md).

For each form (the test suite's fork classes, tests/fork_se.py, pickled as the fork names them): the max
abs difference between the fork's own module / model and what se-deploy loads (PyTorch, FP32), the ONNX
node counts (exported, simplified, final) for a static and a dynamic batch, the SE op chains, ONNX
Runtime vs PyTorch, and, with --int8, which SE Gemms (and other SE nodes) ModelOpt's INT8 PTQ quantizes.

    .venv/bin/python benchmarks/se_forms.py [--imgsz 64] [--int8 [--calib-images 16]]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def forms():
    """name -> (model, fork classes), one per catalogued form, built as tests/test_se_forms.py does."""
    from fork_se import (
        C3SE,
        ConvSE,
        LinearSE,
        LinearSELayer,
        LiteSEModule,
        MobileSELayer,
        SEBottleneck,
        TutorialSEAttention,
        fork_model,
        forked,
    )
    from torch import nn

    def layer(name, cls, make):
        fork = forked(name, cls)
        return lambda: (fork_model(make(fork)), (fork,))

    def c3se():
        bottleneck, c3 = forked("SEBottleneck", SEBottleneck), forked("C3SE", C3SE)
        return fork_model(make_c3=lambda c1, c2, n: c3(c1, c2, n, bottleneck=bottleneck)), (bottleneck, c3)

    return {
        "1 SE (Linear)": layer("SE", LinearSE, lambda cls: lambda c: cls(c, c)),
        "2 SE (Conv2d, bias, functional)": layer("SE", ConvSE, lambda cls: lambda c: cls(c, 4)),
        "3 SEAttention [c1, c2]": layer("SEAttention", TutorialSEAttention, lambda cls: lambda c: cls(c, c)),
        "4 SELayer (Linear)": layer("SELayer", LinearSELayer, lambda cls: lambda c: cls(c)),
        "5 SELayer (bias, Hardsigmoid)": layer("SELayer", MobileSELayer, lambda cls: lambda c: cls(c)),
        "6 C3SE / SEBottleneck": c3se,
        "9 LC_SEModule (SiLU)": layer("LC_SEModule", LiteSEModule, lambda cls: lambda c: cls(c, 4, nn.SiLU)),
        "9 ES_SEModule (Hardsigmoid)": layer("ES_SEModule", LiteSEModule,
                                             lambda cls: lambda c: cls(c, 4, nn.Hardsigmoid)),
    }


def torch_differences(model, loaded, imgsz: int) -> tuple[float, float]:
    """Max abs difference, fork vs loaded: over the SE-carrying layers alone, and over the whole model."""
    import torch
    from fork_se import C3_SLOT, SE_SLOTS, reference

    fork = reference(model)
    is_c3se = type(fork.model[C3_SLOT]).__name__ == "C3SE"
    layers = [(C3_SLOT, fork.model[C3_SLOT].cv1.conv.in_channels)] if is_c3se else list(zip(SE_SLOTS, (64, 128)))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        block = max((loaded.model[i](x) - fork.model[i](x)).abs().max().item()
                    for i, c in layers for x in [torch.rand(4, c, 8, 8, generator=generator) * 4 - 2])
        images = torch.rand(4, 3, imgsz, imgsz, generator=generator)
        whole = (loaded(images)[0] - fork(images)[0]).abs().max().item()
    return block, whole


def _check_figures(result) -> str:
    check = result.check
    return (f"check {'PASS' if result.passed else 'FAIL'}, boxes max {check.max_abs_error['boxes']:.2g} px, scores max "
            f"{check.max_abs_error['scores']:.2g}, detections agree {check.detection_agreement:.1%} "
            f"({check.detections['reference']} FP32 boxes)")


def int8_facts(onnx_path: Path, calib: Path, out: Path) -> str:
    """Which SE nodes ModelOpt's INT8 model of ``onnx_path`` quantizes, and its check with and without
    the SE branch kept FP32."""
    import onnx

    from se_deploy.export.se_graph_pass import find_se_blocks
    from se_deploy.precision.quantize import QuantizeCheckFailed, quantize_onnx

    results = {}
    for keep in (("detect",), ("detect", "se")):
        try:
            results[keep] = quantize_onnx(onnx_path, "int8", calib=calib, out=out, keep_fp32=keep)
        except QuantizeCheckFailed as e:
            results[keep] = e.result
        if keep == ("detect",):
            model = onnx.load(str(out)) if results[keep].passed else None
    if model is None:
        return f"default INT8 rejected ({'; '.join(results[('detect',)].failures)})"
    producer = {o: n for n in model.graph.node for o in n.output}
    pools = {n.input[0]: n for n in model.graph.node if n.op_type == "GlobalAveragePool"}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    gemms, quantized, readers = 0, 0, set()
    for x, pool in pools.items():  # walk each SE branch from its pool to the Mul by x
        pending, seen = [pool], set()
        while pending:
            node = pending.pop()
            if node.name in seen:
                continue
            seen.add(node.name)
            reads_int8 = any(getattr(producer.get(i), "op_type", None) == "DequantizeLinear" for i in node.input)
            if node.op_type == "Gemm":
                gemms, quantized = gemms + 1, quantized + reads_int8
            elif reads_int8 and node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                readers.add(node.op_type + (" (rescale)" if node.op_type == "Mul" and x in node.input else ""))
            if not (node.op_type == "Mul" and x in node.input):
                pending += [c for out in node.output for c in consumers.get(out, [])]
    assert len(find_se_blocks(onnx.load(str(onnx_path)))) * 2 == gemms
    return (f"{quantized}/{gemms} SE Gemms quantized; SE nodes reading INT8: {', '.join(sorted(readers)) or 'none'}\n"
            f"    --keep-fp32 detect:    {_check_figures(results[('detect',)])}\n"
            f"    --keep-fp32 detect,se: {_check_figures(results[('detect', 'se')])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imgsz", type=int, default=64)
    parser.add_argument("--int8", action="store_true", help="also quantize each static export to INT8 (ModelOpt)")
    parser.add_argument("--calib-images", type=int, default=16)
    args = parser.parse_args()

    import onnx
    from fork_se import save_fork_checkpoint

    from se_deploy.checkpoint import load_checkpoint
    from se_deploy.export.onnx_export import export_onnx
    from se_deploy.export.se_graph_pass import find_se_blocks

    with tempfile.TemporaryDirectory(prefix="se-forms-") as tmp:
        tmp = Path(tmp)
        calib = tmp / "synth" / "images" / "train"
        if args.int8:
            subprocess.run([sys.executable, str(REPO / "tests" / "fixtures" / "make_synth_data.py"), "dataset", "--out",
                            str(tmp / "synth"), "--train", str(args.calib_images), "--val", "0"], check=True,
                           capture_output=True)
        for name, build in forms().items():
            model, classes = build()
            path = save_fork_checkpoint(model, tmp / "fork.pt", *classes)
            block, whole = torch_differences(model, load_checkpoint(path).model, args.imgsz)
            print(f"{name}\n  PyTorch, fork vs se-deploy: SE layers max abs {block:.2e}, model outputs max abs {whole:.2e}")
            for dynamic in (False, True):
                onnx_path = tmp / f"fork{'-dynamic' if dynamic else ''}.onnx"
                report = export_onnx(path, onnx_path, imgsz=args.imgsz, dynamic=dynamic)
                chains = sorted({" -> ".join(b.ops) for b in find_se_blocks(onnx.load(str(onnx_path)))})
                errors = report.parity.max_abs_error
                print(f"  {'dynamic' if dynamic else 'static '} nodes {report.nodes['exported']} exported -> "
                      f"{report.nodes['simplified']} simplified -> {report.nodes['final']} final; "
                      f"{report.se.found} SE, {report.se.rewritten} rewritten; ONNX Runtime vs PyTorch: boxes "
                      f"{errors['boxes']:.1e} px, scores {errors['scores']:.1e}; check "
                      f"{'PASS' if report.parity.passed else 'FAIL'} ({report.parity.detection_agreement:.1%} of "
                      f"{report.parity.detections['reference']} boxes agree)")
                if not dynamic:
                    print(f"  SE chain: {' | '.join(chains)}")
            if args.int8:
                print(f"  INT8: {int8_facts(tmp / 'fork.onnx', calib, tmp / 'fork.int8.onnx')}")


if __name__ == "__main__":
    main()

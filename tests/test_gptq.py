"""`quantize ... gptq`: GPTQ rounding onto MatMulNBits' grid (surgery.analysis.gptq), calibrated layer by
layer (surgery.analysis.calibrated_quantization), written by the exporter or over the quantize pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import run_cli
from surgery.analysis.gptq import gptq_blocks
from surgery.analysis.quantization import dequantize, initializer_arrays, quantize_blocks_nk

CASES = [  # (N, K, bits, block, symmetric); K=100 and block 128 of 576 pad K
    (64, 576, 4, 32, False),
    (64, 576, 4, 32, True),
    (48, 576, 8, 32, False),
    (40, 576, 4, 128, True),
    (33, 100, 4, 32, False),
    (20, 96, 8, 64, True),
]


@pytest.mark.parametrize(("n", "k", "bits", "block", "symmetric"), CASES)
def test_with_a_diagonal_hessian_gptq_is_round_to_nearest(n, k, bits, block, symmetric):
    """No input informs another: no error moves, and every block is onnxruntime's own rounding,
    byte for byte (int8 may differ on an exact tie, at most once in a thousand)."""
    torch.manual_seed(0)
    weight = torch.randn(n, k)
    ours = gptq_blocks(weight, torch.eye(k) * 3, bits, block, symmetric)
    theirs = quantize_blocks_nk(weight, bits, block, symmetric)
    assert ours.packed.shape == theirs.packed.shape
    assert (ours.packed != theirs.packed).mean() <= (1e-3 if bits == 8 else 0)
    np.testing.assert_array_equal(ours.scales, theirs.scales)
    if symmetric:
        assert ours.zero_points is None
    else:
        np.testing.assert_array_equal(ours.zero_points, theirs.zero_points)


@pytest.mark.parametrize(("bits", "block", "symmetric"), [(4, 32, False), (4, 64, True), (8, 32, True)])
def test_gptq_lowers_the_output_error_on_correlated_inputs(bits, block, symmetric):
    """What GPTQ minimizes: |X W_q^T - X W^T|^2 on the calibration inputs, against rounding to nearest."""
    torch.manual_seed(1)
    k, n = 256, 96
    inputs = torch.randn(2048, k) @ torch.randn(k, k) * 0.2 + torch.randn(2048, k)
    weight = torch.randn(n, k) * 0.05
    gptq = gptq_blocks(weight, inputs.T @ inputs, bits, block, symmetric)
    rtn = quantize_blocks_nk(weight, bits, block, symmetric)

    def error(blocks) -> float:
        rounded = torch.from_numpy(blocks.dequantize(k, bits, block)).T
        return float(((inputs @ rounded.T - inputs @ weight.T) ** 2).mean())

    assert error(gptq) < 0.8 * error(rtn)


def _apply(folder: Path, lines: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    recipe = folder / "r.surg"
    recipe.write_text(
        f'model "tiny-llama"\ncalibrate on "wikitext-2-valid" samples 8 length 64\n{lines}\nexport onnx\n'
    )
    result = run_cli("apply", str(recipe), "-o", str(folder / "out"))
    assert result.code == 0, result.err
    return folder / "out"


def _kl_to(reference: Path, candidate: Path) -> float:
    """Mean KL(reference || candidate) per token on WikiText-2 valid (the calibration's text)."""
    from surgery.backend.evaluate import compare, eval_tokens, onnx_logits
    from surgery.data import resolve_text
    from surgery.models.builtin import byte_tokenizer

    tokens = eval_tokens(byte_tokenizer(), resolve_text("wikitext-2-valid"), 1024, 256)
    return compare(onnx_logits(str(candidate), 1), onnx_logits(str(reference), 1), tokens).mean_kl


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama in fp32, and its layers and head at int4 rounded to nearest and by GPTQ;
    also with the embedding quantized (the path that quantizes after export)."""
    root = tmp_path_factory.mktemp("gptq")
    widths = {"rtn": "int4", "gptq": "int4 gptq"}
    out = {"fp32": _apply(root / "fp32", "")}
    for name, width in widths.items():
        out[name] = _apply(root / name, f"quantize layers to {width}\nquantize head to {width}")
        out[f"{name}-embedding"] = _apply(
            root / f"{name}-embedding",
            f"quantize layers to {width}\nquantize head to {width}\nquantize embedding to int4",
        )
    return out


def test_gptq_is_closer_to_the_float_model_than_rounding_to_nearest(outputs):
    """Streamed (written by the exporter) and after export (over the quantize pass), GPTQ's model
    is nearer the fp32 one on the calibration text than the round-to-nearest model of the same size."""
    for suffix in ("", "-embedding"):
        rtn, gptq = outputs[f"rtn{suffix}"], outputs[f"gptq{suffix}"]
        assert _kl_to(outputs["fp32"], gptq) < 0.9 * _kl_to(outputs["fp32"], rtn)
        sizes = [(folder / "model.onnx.data").stat().st_size for folder in (rtn, gptq)]
        assert sizes[0] == sizes[1]


def test_gptq_writes_other_codes_in_the_same_tensors(outputs):
    """Same MatMulNBits nodes and tensor shapes; other codes in every one of them."""
    for suffix in ("", "-embedding"):
        models = {name: onnx.load(str(outputs[f"{name}{suffix}"] / "model.onnx")) for name in ("rtn", "gptq")}
        nodes = {name: {n.name: n for n in m.graph.node if n.op_type == "MatMulNBits"} for name, m in models.items()}
        fp32 = onnx.load(str(outputs["fp32"] / "model.onnx"), load_external_data=False)
        matmuls = {f"{n.name}_Q4" for n in fp32.graph.node if n.op_type == "MatMul"}
        assert nodes["rtn"].keys() == nodes["gptq"].keys() == matmuls  # every linear and the head
        differ = 0
        for node_name, node in nodes["gptq"].items():
            weights = {name: initializer_arrays(models[name], set(nodes[name][node_name].input[1:])) for name in models}
            for tensor in node.input[1:]:
                assert weights["gptq"][tensor].shape == weights["rtn"][tensor].shape
            rounded = {name: dequantize(nodes[name][node_name], weights[name]) for name in models}
            differ += not np.array_equal(rounded["gptq"], rounded["rtn"])
        assert differ == len(nodes["gptq"])


def test_the_report_and_plan_say_gptq(outputs, tmp_path):
    import json

    report = json.loads((outputs["gptq"] / "surgery.json").read_text())
    assert "calibrated rounding" in report["timings_s"]
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert report["calibration_walk"]["forwards"] == ("bf16" if bf16 else "as the weights are stored")
    recipe = tmp_path / "r.surg"
    recipe.write_text('model "tiny-llama"\nquantize layers 0..1 to int4 symmetric gptq\n')
    result = run_cli("plan", str(recipe))
    assert result.code == 0, result.err
    assert "GPTQ on the calibration data" in result.out

"""Grids chosen in torch: onnxruntime's own range grid, the activation-weighted search, GPTQ's
act-order, and the per-tensor mixed-precision choice under a bits-per-weight budget."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from surgery.analysis.gptq import gptq_blocks
from surgery.analysis.mixed_precision import FORMATS, TensorShape, _hull, bounds, choose
from surgery.analysis.quantization import quantize_blocks_nk
from surgery.analysis.rounding import encode, padded_blocks, quantize_searched, range_grid, searched_grid, to_blocks
from surgery.formats.names import EMBEDDING, HEAD
from surgery.formats.weights import WeightFormat

CASES = [(4, 32, False), (4, 32, True), (8, 32, False), (8, 64, True), (4, 128, False)]


def _weight(n: int = 96, k: int = 200) -> torch.Tensor:
    torch.manual_seed(0)
    weight = torch.randn(n, k) * torch.rand(n, 1)
    weight[:4, :32] = weight[:4, :32].abs()  # blocks of one sign: the range must still hold zero
    weight[4, 40] = 9.0  # an outlier
    return weight


@pytest.mark.parametrize(("bits", "block", "symmetric"), CASES)
def test_the_range_grid_is_onnxruntimes_own(bits, block, symmetric):
    """Scales, zero points and codes byte for byte what onnxruntime's quantizer kernel writes
    (K = 200 is not a multiple of the block: the padding is onnxruntime's too)."""
    weight = _weight()
    theirs = quantize_blocks_nk(weight, bits, block, symmetric)
    blocks = padded_blocks(weight, block)
    scale, zero = range_grid(blocks, bits, symmetric)
    codes = encode(blocks, scale, zero, bits)
    codes.view(weight.shape[0], -1)[:, weight.shape[1] :] = 0
    ours = to_blocks(codes, scale, zero, bits, symmetric)
    np.testing.assert_array_equal(ours.scales, theirs.scales)
    if symmetric:
        assert ours.zero_points is None
    else:
        np.testing.assert_array_equal(ours.zero_points, theirs.zero_points)
    assert (ours.packed != theirs.packed).mean() <= (1e-3 if bits == 8 else 0)  # int8: an exact tie, rarely


@pytest.mark.parametrize(("bits", "block", "symmetric"), CASES)
def test_fp16_scales_hold_the_grid_the_codes_were_chosen_on(bits, block, symmetric):
    """`half`: every block's scale is an fp16 value, stored as fp16, and the codes are the
    range grid's codes on that scale, so the stored blocks dequantize to exactly what the codes
    stand for on it; without it, `quantize_range` writes onnxruntime's packer's bytes."""
    from surgery.analysis.rounding import quantize_range, rounded

    weight = _weight()
    n, k = weight.shape
    half = quantize_range(weight, bits, block, symmetric, half=True)
    assert half.scales.dtype == np.float16
    blocks = padded_blocks(weight, block)
    scale, zero = range_grid(blocks, bits, symmetric, half=True)
    assert torch.equal(scale, scale.half().float()) and np.array_equal(scale.half().numpy(), half.scales)
    expected = rounded(blocks, scale, zero, bits).reshape(n, -1)[:, :k]
    np.testing.assert_array_equal(half.dequantize(k, bits, block).T, expected.numpy())
    plain = quantize_range(weight, bits, block, symmetric)
    theirs = quantize_blocks_nk(weight, bits, block, symmetric)
    np.testing.assert_array_equal(plain.scales, theirs.scales)
    assert (plain.packed != theirs.packed).mean() <= (1e-3 if bits == 8 else 0)  # int8: an exact tie, rarely
    gptq = gptq_blocks(weight, torch.eye(k) + 0.1, bits, block, symmetric, searched=True, half=True)
    assert gptq.scales.dtype == np.float16 and np.all(np.isfinite(gptq.scales))


def _weighted_error(weight, blocks, importance, bits, block) -> float:
    rounded = torch.from_numpy(blocks.dequantize(weight.shape[1], bits, block)).T
    return float(((weight - rounded) ** 2 * importance).sum())


@pytest.mark.parametrize(("bits", "block", "symmetric"), CASES)
def test_the_searched_grid_is_never_worse_and_usually_better(bits, block, symmetric):
    """Per block, the range grid is a candidate of the search: the weighted error can only drop;
    on heavy-tailed activations it drops by a fifth or more at int4 (a tenth at int8)."""
    weight = _weight()
    importance = torch.rand(weight.shape[1]) ** 4
    searched = quantize_searched(weight, importance, bits, block, symmetric)
    nearest = quantize_blocks_nk(weight, bits, block, symmetric)
    assert _weighted_error(weight, searched, importance, bits, block) < (0.8 if bits == 4 else 0.9) * _weighted_error(
        weight, nearest, importance, bits, block
    )
    blocks = padded_blocks(weight, block)
    weights = torch.nn.functional.pad(importance, (0, blocks.shape[1] * block - weight.shape[1]))
    weights = weights.reshape(blocks.shape[1], block)
    base = range_grid(blocks, bits, symmetric)
    best = searched_grid(blocks, weights, bits, symmetric)

    def per_block(grid):
        rounded = (encode(blocks, *grid, bits) - grid[1][..., None]) * grid[0][..., None]
        return (weights * (blocks - rounded) ** 2).sum(-1)

    assert bool((per_block(best) <= per_block(base) + 1e-9).all())


def _matmul_nbits(blocks, n: int, k: int, bits: int, block: int, x: np.ndarray) -> np.ndarray:
    """x @ W^T through onnxruntime's MatMulNBits over these blocks."""
    inputs = ["x", "B", "scales"] + (["zero_points"] if blocks.zero_points is not None else [])
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block)  # fmt: skip
    initializers = [numpy_helper.from_array(blocks.packed, "B")]
    initializers.append(numpy_helper.from_array(blocks.scales.reshape(-1), "scales"))
    if blocks.zero_points is not None:
        initializers.append(numpy_helper.from_array(blocks.zero_points.reshape(-1), "zero_points"))
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], initializers,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize(("bits", "block", "symmetric"), CASES)
def test_searched_and_act_order_blocks_run_in_onnxruntime_as_they_dequantize(bits, block, symmetric):
    """What onnxruntime's MatMulNBits computes from the blocks is what verification dequantizes."""
    weight = _weight()
    n, k = weight.shape
    x = np.random.default_rng(0).standard_normal((5, k)).astype(np.float32)
    hessian = torch.from_numpy(x.T @ x) + torch.eye(k)
    for blocks in (
        quantize_searched(weight, torch.rand(k), bits, block, symmetric),
        gptq_blocks(weight, hessian, bits, block, symmetric, searched=True, act_order=True),
    ):
        expected = x @ blocks.dequantize(k, bits, block)
        np.testing.assert_allclose(_matmul_nbits(blocks, n, k, bits, block, x), expected, rtol=1e-4, atol=1e-4)


def test_act_order_and_weighted_grids_lower_gptqs_output_error():
    """On inputs whose columns differ in energy, each refinement lowers |X W_q^T - X W^T|^2."""
    torch.manual_seed(1)
    k, n = 256, 128
    energy = torch.rand(k) ** 3 * 4 + 0.1
    inputs = (torch.randn(2048, k) @ torch.randn(k, k) * 0.2 + torch.randn(2048, k)) * energy
    weight = torch.randn(n, k) * 0.05
    hessian = inputs.T @ inputs

    def error(blocks) -> float:
        rounded = torch.from_numpy(blocks.dequantize(k, 4, 32)).T
        return float(((inputs @ rounded.T - inputs @ weight.T) ** 2).mean())

    plain = error(gptq_blocks(weight, hessian, 4, 32, False))
    assert error(gptq_blocks(weight, hessian, 4, 32, False, act_order=True)) < 0.9 * plain
    assert error(gptq_blocks(weight, hessian, 4, 32, False, searched=True)) < 0.9 * plain
    both = error(gptq_blocks(weight, hessian, 4, 32, False, searched=True, act_order=True))
    assert both < 0.8 * plain
    assert error(quantize_searched(weight, torch.diagonal(hessian), 4, 32, False)) > both


# The per-tensor choice -----------------------------------------------------------------------


def _shapes() -> list[TensorShape]:
    return [TensorShape("a", 64, 256), TensorShape("b", 64, 256), TensorShape(HEAD, 512, 256),
            TensorShape(EMBEDDING, 512, 256)]  # fmt: skip


def _errors(sensitive: str) -> dict:
    """Errors that halve with each step up in size; `sensitive` loses ten times more."""
    errors = {}
    for shape in _shapes():
        factor = 10.0 if shape.name == sensitive else 1.0
        ranked = sorted(FORMATS, key=lambda f: f.storage_bytes(shape.rows, shape.columns))
        errors[shape.name] = {f: factor * 0.5**i for i, f in enumerate(ranked)}
    return errors


def _bits(chosen, shapes=None, tied=True) -> float:
    tensors = [s for s in (shapes or _shapes()) if not (tied and s.name == EMBEDDING)]
    spent = sum(chosen[s.name].storage_bytes(s.rows, s.columns) for s in tensors)
    return 8 * spent / sum(s.weights for s in tensors)


@pytest.mark.parametrize(("block", "act_order"), [(16, False), (128, False), (32, True)])
def test_gptq_rounds_rows_a_chunk_at_a_time_as_it_rounds_them_whole(monkeypatch, block, act_order):
    """Rows never exchange errors: chunks of rows (what bounds a large head's memory) write the
    whole weight's blocks, byte for byte, for blocks smaller and larger than GPTQ's lazy batch."""
    import surgery.analysis.gptq as gptq

    weight, x = _weight(96, 200), torch.randn(1024, 200) * torch.rand(200) * 3
    hessian = x.T @ x
    hessian[7], hessian[:, 7] = 0, 0  # an input never seen
    whole = gptq_blocks(weight, hessian, 4, block, False, searched=True, act_order=act_order)
    monkeypatch.setattr(gptq, "_chunk_values", lambda device: 40 * 256)
    chunked = gptq_blocks(weight, hessian, 4, block, False, searched=True, act_order=act_order)
    assert np.array_equal(whole.packed, chunked.packed) and np.array_equal(whole.zero_points, chunked.zero_points)
    assert np.array_equal(whole.scales, chunked.scales)


def test_the_inverse_hessians_factor_is_the_upper_cholesky_factor_of_the_dampened_inverse():
    from surgery.analysis.gptq import _inverse_hessian_factor

    x = torch.randn(300, 64, dtype=torch.float64) * torch.rand(64, dtype=torch.float64)
    hessian = x.T @ x
    factor = _inverse_hessian_factor(hessian.float(), 0.01).double()
    dampened = hessian + 0.01 * hessian.diagonal().mean() * torch.eye(64, dtype=torch.float64)
    assert torch.equal(factor, factor.triu())
    torch.testing.assert_close(factor.T @ factor, torch.linalg.inv(dampened), rtol=1e-3, atol=1e-4)


def test_the_choice_stays_within_the_budget_and_upgrades_the_most_sensitive_first():
    low, high = bounds(_shapes(), True, 4)
    # fp16 scales: int4 block 128 is 4 + 16/128 + 4/128 bits, int8 block 32 8 + 16/32 + 8/32
    assert low == pytest.approx(4.15625) and high == pytest.approx(8.75)
    smallest = choose(_shapes(), _errors("a"), low, True, 4)
    assert {f for f in smallest.values()} == {WeightFormat(4, 128, half_scales=True)}
    chosen = choose(_shapes(), _errors("a"), 5.0, True, 4)
    assert _bits(chosen) <= 5.0
    assert chosen["a"].storage_bytes(64, 256) > chosen["b"].storage_bytes(64, 256)  # the sensitive one first
    assert chosen[EMBEDDING] == chosen[HEAD]  # tied: the lookup reads the head's tensors
    assert set(choose(_shapes(), _errors("a"), high, True, 4).values()) == {WeightFormat(8, 32, half_scales=True)}


def test_an_untied_embedding_is_counted_and_keeps_its_format():
    chosen = choose(_shapes(), _errors("b"), 6.0, False, 4)
    assert chosen[EMBEDDING] == WeightFormat(4, 32, half_scales=True)
    assert _bits(chosen, tied=False) <= 6.0


def test_the_hull_skips_formats_that_are_larger_and_no_better_or_never_the_best_step():
    f = [WeightFormat(4, 128), WeightFormat(4, 64), WeightFormat(4, 32), WeightFormat(8, 32)]
    # 4/64 is barely better than 4/128 for its bytes: the step 4/128 -> 4/32 beats it.
    hull = _hull([(100, 10.0, f[0]), (110, 9.9, f[1]), (120, 2.0, f[2]), (200, 3.0, f[3])])
    assert [option[2] for option in hull] == [f[0], f[2]]


@pytest.mark.parametrize(("model", "options"), [("tiny-llama", ""), ("tiny-qwen2", " gptq")])
def test_a_preset_recipe_writes_its_choice_and_keeps_its_budget(tmp_path, model, options):
    """End to end (untied and tied, weighted and GPTQ): the report's choice, the written formats
    and bits per weight of the quantized tensors within the budget, every linear and the
    embedding quantized as they were written, and verified exactly against PyTorch with the
    written weights (the lookup's rows included)."""
    import json

    from conftest import run_cli
    from surgery.analysis.quantization import bits_summary, quantized_linears

    recipe = tmp_path / "r.surg"
    recipe.write_text(f'model "{model}"\ncalibrate on "wikitext-2-valid" samples 8 length 64\n'
                      f"quantize model to 5.5 bits per weight{options}\n")  # fmt: skip
    result = run_cli("apply", str(recipe), "-o", str(tmp_path / "out"))
    assert result.code == 0, result.err
    report = json.loads((tmp_path / "out" / "surgery.json").read_text())
    section = report["mixed_precision"]
    assert section["bits_per_weight"] <= 5.5
    assert report["quantization"]["quantized_while_writing"]  # streamed: no whole-model load
    assert report["verification"]["quantized_weights"] and report["verification"]["passed"]
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    linears = {q.linear: q for q in quantized_linears(model)}
    assert len(linears) == len(section["tensors"])  # every linear and the head
    for name, entry in section["tensors"].items():
        bits, _, block = entry["format"].removeprefix("int").partition(" block ")
        assert (linears[name].bits, linears[name].block) == (int(bits), int(block))
    assert len({entry["format"] for entry in section["tensors"].values()}) > 1  # mixed
    embedding = bits_summary(model)["embedding"]
    tied = section["embedding"] == "reads the head's tensors"
    assert embedding["shared_with_head"] == tied
    stored = sum(8 * q.storage_bytes for q in linears.values()) + (0 if tied else 8 * embedding["storage_bytes"])
    weights = sum(q.parameters for q in linears.values()) + (0 if tied else embedding["parameters"])
    assert stored / weights == pytest.approx(section["bits_per_weight"], abs=1e-3)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")


@CUDA
def test_gptq_and_the_searched_grid_on_the_gpu_write_the_cpus_blocks():
    """`--device cuda`: the same rounding on the GPU (the Hessian's device), to float rounding."""
    weight = _weight(256, 512)
    x = torch.randn(4096, 512)
    hessian = x.T @ x
    for searched, act_order in ((False, False), (True, True)):
        cpu = gptq_blocks(weight, hessian, 4, 32, False, searched=searched, act_order=act_order)
        gpu = gptq_blocks(weight.cuda(), hessian.cuda(), 4, 32, False, searched=searched, act_order=act_order)
        assert (cpu.packed != gpu.packed).mean() < 0.01
        np.testing.assert_allclose(cpu.scales, gpu.scales, rtol=1e-3, atol=1e-6)
    importance = torch.rand(512)
    cpu = quantize_searched(weight, importance, 4, 32, False)
    gpu = quantize_searched(weight.cuda(), importance.cuda(), 4, 32, False)
    assert (cpu.packed != gpu.packed).mean() < 0.001


@CUDA
def test_gptqs_cuda_graphs_write_the_blocks_of_its_steps_run_one_by_one(monkeypatch):
    """On the GPU a lazy batch's column steps are one replayed CUDA graph: the same kernels as
    launching them one by one, so the same bytes; and a layer's rounded weights, dequantized on
    the device for the next layer's calibration, are the CPU's."""
    import surgery.analysis.gptq as gptq

    weight = _weight(256, 512).cuda()
    x = torch.randn(4096, 512, device="cuda")
    hessian = x.T @ x
    for block, act_order in ((16, False), (32, True), (128, False), (128, True)):
        graphed = gptq_blocks(weight, hessian, 4, block, False, searched=True, act_order=act_order)
        monkeypatch.setattr(gptq._ColumnSteps, "graphs", False)
        eager = gptq_blocks(weight, hessian, 4, block, False, searched=True, act_order=act_order)
        monkeypatch.undo()
        np.testing.assert_array_equal(graphed.packed, eager.packed)
        np.testing.assert_array_equal(graphed.scales, eager.scales)
        np.testing.assert_array_equal(graphed.zero_points, eager.zero_points)
        on_gpu = graphed.dequantize_rows(512, 4, block, 0, 256, "cuda")
        assert on_gpu.is_cuda
        torch.testing.assert_close(on_gpu.cpu(), graphed.dequantize_rows(512, 4, block, 0, 256), rtol=0, atol=0)


def test_the_device_flag_reaches_the_calibrated_rounding(tmp_path, monkeypatch):
    """`apply --device` is where GPTQ, the weighted grids and the sensitivity walk run (the CPU
    is None: nothing moves); on a CUDA machine the same recipe runs them there."""
    import surgery.analysis.calibrated_quantization as calibrated
    from conftest import run_cli

    seen = []
    original = calibrated.calibrated_blocks

    def spy(*args, **kwargs):
        seen.append(kwargs.get("device", args[4] if len(args) > 4 else None))
        return original(*args, **kwargs)

    monkeypatch.setattr(calibrated, "calibrated_blocks", spy)
    recipe = tmp_path / "r.surg"
    recipe.write_text('model "tiny-llama"\ncalibrate on "wikitext-2-valid" samples 4 length 32\n'
                      "quantize layers to int4 weighted\n")  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = run_cli("apply", str(recipe), "-o", str(tmp_path / "out"), "--device", device)
    assert result.code == 0, result.err
    assert seen == [None if device == "cpu" else device]


def test_the_measuring_search_stands_for_the_blocks_a_search_would_write():
    """`rounded_searched` (no packing, for measuring) is the weight `quantize_searched` writes."""
    import surgery.analysis.rounding as rounding

    weight = _weight()
    importance = torch.rand(weight.shape[1])
    for bits, block, symmetric in CASES:
        blocks = quantize_searched(weight, importance, bits, block, symmetric)
        written = torch.from_numpy(blocks.dequantize(weight.shape[1], bits, block)).T
        measured = rounding.rounded_searched(weight, importance, bits, block, symmetric, rounding.SEARCH_FACTORS)
        torch.testing.assert_close(measured, written, rtol=0, atol=1e-6)


@CUDA
def test_a_gptq_preset_on_the_gpu_chooses_and_verifies_as_on_the_cpu(tmp_path):
    """`apply --device cuda` of `quantize model to ... gptq`: the sensitivity walk, the head's KL
    and GPTQ on the GPU; the output verifies against PyTorch, and the formats chosen are the
    CPU's but for the odd near-tie (float rounding differs between the devices)."""
    import json

    from conftest import run_cli

    recipe = tmp_path / "r.surg"
    recipe.write_text('model "tiny-qwen2"\ncalibrate on "wikitext-2-valid" samples 8 length 64\n'
                      "quantize model to 5.5 bits per weight gptq\n")  # fmt: skip
    sections = []
    for device in ("cuda", "cpu"):
        out = tmp_path / f"out-{device}"
        result = run_cli("apply", str(recipe), "-o", str(out), "--device", device)
        assert result.code == 0, result.err
        report = json.loads((out / "surgery.json").read_text())
        assert report["verification"]["passed"]
        sections.append(report["mixed_precision"])
    gpu, cpu = ({name: t["format"] for name, t in s["tensors"].items()} for s in sections)
    assert sum(gpu[name] != cpu[name] for name in cpu) <= max(1, len(cpu) // 10)

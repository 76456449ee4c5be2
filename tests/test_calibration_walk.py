"""The calibration walk's shortcuts compute what the plain forms compute: X^T X summed in upper
strips, the triangular inverse by halves, GPTQ's errors pushed a span at a time, a GPTQ pass that
stops once every input is summed, and bf16 forwards on a CPU with bf16 units."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_graph
from surgery.analysis import calibrated_quantization, gptq
from surgery.analysis.calibrated_quantization import calibrated_blocks, fast_float32_matmuls
from surgery.analysis.input_sums import AllInputsSeen, InputSums, mirror_upper, upper_gram
from surgery.formats.names import layer_linear
from surgery.formats.weights import QuantizedTarget, WeightFormat
from surgery.ir.inputs import in_dtype


@pytest.mark.parametrize("columns", [1, 7, 64, 100, 1539])
def test_upper_strips_mirrored_are_the_whole_gram(columns):
    torch.manual_seed(columns)
    first, second = torch.randn(50, columns), torch.randn(30, columns)
    total = upper_gram(second, upper_gram(first, None))
    mirror_upper(total)
    expected = first.T @ first + second.T @ second
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-4)


def test_input_sums_read_between_batches_stay_whole():
    torch.manual_seed(0)
    linear = torch.nn.Linear(40, 3)
    sums = InputSums({"a": linear}, {"a"})
    batches = [torch.randn(6, 40) for _ in range(3)]
    with sums.installed():
        linear(batches[0])
        sums.next_batch()
        sums.sum("a")  # mirrored here, then summed into again
        linear(batches[1])
        sums.next_batch()
        linear(batches[2])
    expected = sum(b.T @ b for b in batches)
    torch.testing.assert_close(sums.sum("a"), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("size", [37, 100])
def test_the_triangular_inverse_by_halves_is_the_inverse(size, monkeypatch):
    monkeypatch.setattr(gptq, "_SOLVED_SIZE", 8)  # several levels of halves
    torch.manual_seed(size)
    x = torch.randn(3 * size, size)
    lower = torch.linalg.cholesky(x.T @ x + torch.eye(size))
    inverse = gptq._inverse_lower(lower)
    torch.testing.assert_close(inverse @ lower, torch.eye(size), rtol=0, atol=1e-4)
    assert torch.count_nonzero(torch.triu(inverse, 1)) == 0


@pytest.mark.parametrize("act_order", [False, True])
def test_errors_pushed_a_span_at_a_time_round_as_column_by_column(act_order, monkeypatch):
    torch.manual_seed(1)
    k = 256
    x = torch.randn(2048, k) @ (torch.eye(k) + 0.3 * torch.randn(k, k) / k**0.5)  # correlated inputs
    hessian, weight = x.T @ x, torch.randn(64, k) * 0.02
    monkeypatch.setattr(gptq, "_SPAN_COLUMNS", 1 << 20)  # one span: every batch's errors onto every later column
    whole = gptq.gptq_blocks(weight, hessian, 4, 32, False, act_order=act_order)
    monkeypatch.setattr(gptq, "_SPAN_COLUMNS", 64)
    spans = gptq.gptq_blocks(weight, hessian, 4, 32, False, act_order=act_order)
    assert np.mean(whole.packed == spans.packed) > 0.999
    np.testing.assert_allclose(whole.scales, spans.scales, rtol=1e-5)


def test_a_gptq_pass_stops_once_every_input_is_summed():
    torch.manual_seed(2)
    first, second, last = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    calls = []
    last.register_forward_pre_hook(lambda *_: calls.append("last"))
    model = torch.nn.Sequential(first, torch.nn.ReLU(), second, last)
    x = torch.randn(5, 8)
    sums = InputSums({"first": first, "second": second}, {"first", "second"})
    sums.stop_when_all_seen = True
    with sums.installed(), pytest.raises(AllInputsSeen):
        model(x)
    assert calls == []  # the linear after the last summed input never ran
    middle = torch.relu(first(x))
    torch.testing.assert_close(sums.sum("second"), middle.T @ middle, rtol=1e-5, atol=1e-5)


def test_a_pass_that_calls_a_linear_twice_is_never_stopped_early():
    first, second = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    sums = InputSums({"first": first, "second": second}, {"first", "second"})
    with sums.installed():
        second(first(torch.randn(5, 8)))
        assert sums.each_called_once()
        sums.next_batch()
        second(second(first(torch.randn(5, 8))))  # the second linear's second input would be lost
        assert not sums.each_called_once()


def test_in_dtype_computes_in_bf16_and_gives_the_weights_back():
    linear = torch.nn.Linear(4, 4)
    original = linear.weight.detach().clone()
    where = linear.weight.data_ptr()
    with in_dtype([linear], torch.bfloat16):
        assert linear.weight.dtype == torch.bfloat16
        assert linear(torch.randn(2, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16
        linear.weight.data.zero_()  # nothing written to the copy survives
    assert linear.weight.dtype == torch.float32 and linear.weight.data_ptr() == where
    torch.testing.assert_close(linear.weight.detach(), original, rtol=0, atol=0)


def test_bf16_forwards_round_like_float32_forwards(monkeypatch):
    """The same GPTQ on tiny-llama with its calibration forwards in bf16 and in float32: most
    codes agree (GPTQ's path moves with any change to the Hessian: 79% of the bytes of a
    layer-1 down projection agree; activations gone wrong would leave about 1/256), and the
    float32 matmul precision is restored after."""
    tokens = np.random.default_rng(0).integers(0, 256, size=(8, 32))
    targets = {layer_linear(layer, kind): QuantizedTarget(WeightFormat(4, 32), gptq=True)
               for layer in (0, 1) for kind in ("qkv_proj", "down_proj")}  # fmt: skip
    blocks = {}
    for dtype in (None, torch.bfloat16):
        monkeypatch.setattr(calibrated_quantization, "calibration_dtype", lambda _device, dtype=dtype: dtype)
        blocks[dtype] = calibrated_blocks(tiny_graph("tiny-llama"), targets, tokens).blocks
    assert torch.get_float32_matmul_precision() == "highest"
    for name in targets:
        agree = np.mean(blocks[None][name].packed == blocks[torch.bfloat16][name].packed)
        assert agree > 0.7, (name, agree)


def test_fast_float32_matmuls_are_scoped():
    with fast_float32_matmuls(torch.bfloat16):
        assert torch.get_float32_matmul_precision() == "medium"
    with fast_float32_matmuls(None):
        assert torch.get_float32_matmul_precision() == "highest"
    assert torch.get_float32_matmul_precision() == "highest"

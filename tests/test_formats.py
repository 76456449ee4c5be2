"""The records that own their facts: each fact checked against the library it stands for."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from surgery.formats.precision import DEFAULT_FOR_TARGET, PRECISIONS, from_ort_type
from surgery.formats.weights import BLOCKS, WIDTHS, WeightFormat


@pytest.mark.parametrize("name", PRECISIONS)
def test_a_precision_names_the_same_type_in_every_library(name):
    record = PRECISIONS[name]
    assert onnx.helper.tensor_dtype_to_np_dtype(record.onnx_type).itemsize == record.itemsize
    assert torch.empty(0, dtype=record.torch_dtype()).element_size() == record.itemsize
    assert np.dtype(record.numpy_dtype()).itemsize == record.itemsize
    assert from_ort_type(record.ort_type) is record
    # The padding bias is finite in the type, and exp() of it underflows to exactly 0.
    bias = np.array(record.mask_value, dtype=record.numpy_dtype())
    assert np.isfinite(bias.astype(np.float32)) and np.exp(bias.astype(np.float32)) == 0
    assert all(DEFAULT_FOR_TARGET[target].runs_on(target) for target in DEFAULT_FOR_TARGET)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("block", [b for b in BLOCKS if b <= 128])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("half_scales", [False, True])
def test_a_weight_format_knows_its_stored_size(bits, block, symmetric, half_scales):
    stored = WeightFormat(bits, block, symmetric, half_scales)
    weight = torch.randn(24, 256, generator=torch.Generator().manual_seed(0))
    blocks = stored.quantize(weight)
    zero_points = 0 if blocks.zero_points is None else blocks.zero_points.nbytes
    written = blocks.packed.nbytes + blocks.scales.nbytes + zero_points
    assert stored.storage_bytes(24, 256) == written
    assert (blocks.zero_points is None) == symmetric
    assert stored.name == f"int{bits}" and f"block {block}" in stored.describe()
    assert ("fp16 scales" in stored.describe()) == half_scales
    assert WeightFormat.from_json(stored.to_json()) == stored

"""Mixed precision per tensor under a bits-per-weight budget: which linear takes which format.

`quantize model to <bits> bits per weight` gives every linear, the head and the embedding one of
`FORMATS` (int4 or int8, blocks of 128, 64 or 32, with zero points, scales in fp16). What a tensor loses in a
format is measured on the calibration data (surgery.analysis.calibrated_quantization): for a
layer's linear, the squared error its rounded weight adds to its output,
`sum_j a_j * sum_i (W_ij - Q(W)_ij)^2` with `a_j` the mean over tokens of input column j's
squared activation over the energy of the token's residual stream (the diagonal of GPTQ's
Hessian, llama.cpp's importance matrix, token by token relative to what the output perturbs),
turned into KL divergence at the output by a probe (surgery.analysis.sensitivity_probe); for
the head, the KL divergence measured with it rounded. The choice is a multiple-choice knapsack, solved the way
rate-distortion allocators solve it: every tensor starts in the smallest format, and the
upgrade with the most error removed per byte added, along each tensor's lower convex hull of
(bytes, error), is taken until the next one no longer fits the budget.

The budget counts the quantized tensors' bytes (packed weights, fp16 scales and zero points; a tied
embedding that reads the head's tensors once): `bits_per_weight = 8 * bytes / weights`. Float
norms and biases are not counted (well under 0.1% of a model's weights). `check` and the run
share `tensor_shapes` and `bounds`, so a budget `check` accepts always has a choice.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from surgery.formats.names import EMBEDDING, HEAD, layer_linear
from surgery.formats.weights import WeightFormat

# Scales in fp16 whatever the export's type (as llama.cpp's K-quants keep theirs): in an fp32
# export they would otherwise take a fifth of an int4 block-32 weight's bytes, which the budget
# spends better on int8 for the tensors that need it.
FORMATS = tuple(WeightFormat(bits, block, half_scales=True) for bits in (4, 8) for block in (128, 64, 32))
UNTIED_EMBEDDING = WeightFormat(4, 32, half_scales=True)  # a lookup table: its rows are read, not multiplied


@dataclass(frozen=True)
class TensorShape:
    """A quantized tensor: its exported name and (rows, columns), blocks along the columns."""

    name: str
    rows: int
    columns: int

    @property
    def weights(self) -> int:
        """How many weights it holds."""
        return self.rows * self.columns


def tensor_shapes(index, layers: dict[str, tuple[int, ...]]) -> list[TensorShape]:
    """Every tensor the preset quantizes, from the model index: the linears of the layers that keep
    their attention (`layers["attention"]`) and MLP (`layers["mlp"]`), the projections of the
    convolution layers kept (`layers["blocks"]`: every layer by default), the head, the embedding."""
    hidden, heads, kv, head_dim = index.hidden_size, index.num_heads, index.num_kv_heads, index.head_dim
    shapes: list[TensorShape] = []
    blocks = set(layers.get("blocks", range(index.num_layers)))
    convs = blocks & set(index.conv_layers)
    for layer in sorted(set(layers["attention"]) | set(layers["mlp"]) | convs):
        if layer in convs:
            shapes.append(TensorShape(layer_linear(layer, "in_proj"), 3 * hidden, hidden))
            shapes.append(TensorShape(layer_linear(layer, "out_proj"), hidden, hidden))
        if layer in layers["attention"]:
            shapes.append(TensorShape(layer_linear(layer, "qkv_proj"), (heads + 2 * kv) * head_dim, hidden))
            shapes.append(TensorShape(layer_linear(layer, "o_proj"), hidden, heads * head_dim))
        if layer in layers["mlp"]:
            if index.mlp_gated:
                shapes.append(TensorShape(layer_linear(layer, "gate_proj"), index.intermediate_size, hidden))
            shapes.append(TensorShape(layer_linear(layer, "up_proj"), index.intermediate_size, hidden))
            shapes.append(TensorShape(layer_linear(layer, "down_proj"), hidden, index.intermediate_size))
    shapes.append(TensorShape(HEAD, index.vocab_size, hidden))
    shapes.append(TensorShape(EMBEDDING, index.vocab_size, hidden))
    return shapes


def allowed(shape: TensorShape, tied: bool) -> tuple[WeightFormat, ...]:
    """The formats a tensor may take: a tied head's block must divide the hidden size (the
    embedding's lookup reads its tensors row by row); an untied embedding is fixed."""
    if shape.name == EMBEDDING:
        return (UNTIED_EMBEDDING,)
    if shape.name == HEAD and tied:
        return tuple(f for f in FORMATS if shape.columns % f.block == 0)
    return FORMATS


def _bytes(shape: TensorShape, stored: WeightFormat, element_bytes: int) -> int:
    return stored.storage_bytes(shape.rows, shape.columns, element_bytes)


def counted(shapes: list[TensorShape], tied: bool) -> list[TensorShape]:
    """The tensors whose bytes count: a tied embedding reads the head's, and adds none."""
    return [s for s in shapes if not (tied and s.name == EMBEDDING)]


def bounds(shapes: list[TensorShape], tied: bool, element_bytes: int) -> tuple[float, float]:
    """The fewest and the most bits per weight the preset can reach on these tensors."""
    weights = sum(s.weights for s in counted(shapes, tied))
    low = sum(min(_bytes(s, f, element_bytes) for f in allowed(s, tied)) for s in counted(shapes, tied))
    high = sum(max(_bytes(s, f, element_bytes) for f in allowed(s, tied)) for s in counted(shapes, tied))
    return 8 * low / weights, 8 * high / weights


def _hull(options: list[tuple[int, float, WeightFormat]]) -> list[tuple[int, float, WeightFormat]]:
    """The lower convex hull of (bytes, error), from the smallest: the formats worth upgrading to."""
    options = sorted(options, key=lambda o: (o[0], o[1]))
    hull: list[tuple[int, float, WeightFormat]] = []
    for option in options:
        if hull and option[1] >= hull[-1][1]:
            continue  # larger and no better
        while len(hull) >= 2:
            (b0, e0, _), (b1, e1, _) = hull[-2], hull[-1]
            # hull[-1] is above the segment from hull[-2] to option: never the best step
            if (e0 - e1) * (option[0] - b0) <= (e0 - option[1]) * (b1 - b0):
                hull.pop()
            else:
                break
        hull.append(option)
    return hull


def choose(
    shapes: list[TensorShape],
    errors: dict[str, dict[WeightFormat, float]],
    bits_per_weight: float,
    tied: bool,
    element_bytes: int,
) -> dict[str, WeightFormat]:
    """Each tensor's format: the least total error within `bits_per_weight` (see the module
    docstring). `errors[name][format]` is what the tensor loses in that format."""
    tensors = counted(shapes, tied)
    budget = bits_per_weight * sum(s.weights for s in tensors) / 8
    hulls = {}
    for s in tensors:
        formats = allowed(s, tied)
        hulls[s.name] = _hull([(_bytes(s, f, element_bytes), errors.get(s.name, {}).get(f, 0.0), f) for f in formats])
    position = {name: 0 for name in hulls}
    spent = sum(hull[0][0] for hull in hulls.values())
    queue: list[tuple[float, str]] = []

    def push(name: str) -> None:
        hull, i = hulls[name], position[name]
        if i + 1 < len(hull):
            gain = (hull[i][1] - hull[i + 1][1]) / max(1, hull[i + 1][0] - hull[i][0])
            heapq.heappush(queue, (-gain, name))

    for name in hulls:
        push(name)
    while queue:
        _, name = heapq.heappop(queue)
        hull, i = hulls[name], position[name]
        extra = hull[i + 1][0] - hull[i][0]
        if spent + extra > budget:
            continue  # this tensor's next step does not fit; smaller steps of others may
        spent += extra
        position[name] = i + 1
        push(name)
    chosen = {name: hulls[name][position[name]][2] for name in hulls}
    if tied:
        chosen[EMBEDDING] = chosen[HEAD]
    return chosen


def _label(stored: WeightFormat) -> str:
    return f"{stored.name} block {stored.block}"


def section(
    shapes: list[TensorShape],
    chosen: dict[str, WeightFormat],
    errors: dict[str, dict[WeightFormat, float]],
    bits_per_weight: float,
    tied: bool,
    element_bytes: int,
) -> dict:
    """The report's account of the choice: the budget, the bits per weight reached, how many
    tensors took each format, and per tensor its format and measured relative error in each."""
    tensors = counted(shapes, tied)
    weights = sum(s.weights for s in tensors)
    spent = sum(_bytes(s, chosen[s.name], element_bytes) for s in tensors)
    formats: dict[str, int] = {}
    for s in tensors:
        formats[_label(chosen[s.name])] = formats.get(_label(chosen[s.name]), 0) + 1
    return {
        "bits_per_weight_budget": bits_per_weight,
        "bits_per_weight": round(8 * spent / weights, 4),
        "bytes": spent,
        "formats": dict(sorted(formats.items())),
        "embedding": "reads the head's tensors" if tied else _label(chosen[EMBEDDING]),
        "tensors": {
            s.name: {
                "format": _label(chosen[s.name]),
                "relative_error": {_label(f): float(f"{e:.4g}") for f, e in errors.get(s.name, {}).items()},
            }
            for s in tensors
            if s.name != EMBEDDING
        },
    }

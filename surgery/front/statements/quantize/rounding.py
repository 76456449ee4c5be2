"""The checks of `quantize` that are about rounding and the `quantize model` preset: rules its
check shares with the run (surgery.analysis.mixed_precision), kept apart from the statement's
selection and planning (__init__.py beside this file)."""

from __future__ import annotations

from surgery.front.statements.quantize.refusals import unquantizable
from surgery.front.statements.quantize.syntax import QuantizeModelStmt


def rounding_holds(c, item) -> bool:
    """`act-order` is an option of GPTQ; whether the item's rounding options hold together."""
    if item.act_order and not item.gptq:
        c.error(
            "`act-order` is an order of GPTQ's rounding",
            item.act_order_span or item.span,
            "add `gptq` before it, or drop `act-order`",
        )
        return False
    return True


def element_bytes(c) -> int:
    """Bytes of one element of the recipe's export (its precision, or its target's default)."""
    from surgery.formats.precision import DEFAULT_FOR_TARGET
    from surgery.formats.precision import precision as precision_record
    from surgery.front.statements.export import ExportStmt

    export = next((s for s in c.recipe.statements if isinstance(s, ExportStmt)), None)
    if export is None:
        return DEFAULT_FOR_TARGET["cpu"].itemsize
    return (precision_record(export.precision) if export.precision else DEFAULT_FOR_TARGET[export.target]).itemsize


def check_preset(c, statement: QuantizeModelStmt, index, others: list) -> bool:
    """`quantize model to <bits> bits per weight`: alone among quantize statements (`others` are
    the rest), on a dense model, without a block or symmetry, with a budget the formats can meet
    (`surgery.analysis.mixed_precision.bounds`, which the run's choice shares). Reports every
    problem; whether there were none."""
    from surgery.analysis.mixed_precision import bounds, tensor_shapes

    fine = rounding_holds(c, statement)
    if others:
        fine = False
        c.error(
            "`quantize model` chooses the format of every linear, the head and the embedding",
            others[0].span,
            "remove the other quantize statements, or quantize part by part without `quantize model`",
        )
    refusal = unquantizable(index, "model")
    if refusal is not None:
        fine = False
        c.error(refusal[0], statement.span, refusal[1])
    if statement.block is not None or statement.symmetric:
        fine = False
        c.error(
            "`quantize model` chooses each tensor's block itself, with zero points",
            statement.block_span or statement.span,
            "drop `block` and `symmetric`; for one format everywhere, write `quantize layers to int4 block 64` "
            "and `quantize head to ...`",
        )
    every = tuple(range(index.num_layers))
    shapes = tensor_shapes(index, {"attention": every, "mlp": every})
    low, high = bounds(shapes, index.tied_embeddings, element_bytes(c))
    if statement.bits_per_weight < low:
        fine = False
        c.error(
            f"{statement.bits_per_weight:g} bits per weight is below what the formats reach on this model "
            f"({low:.2f}: every tensor at int4 in the largest block it allows)",
            statement.budget_span or statement.span,
            f"ask for at least {low:.2f}; {min(high, low + 0.6):.1f} keeps the most sensitive tensors at int8",
        )
    return fine

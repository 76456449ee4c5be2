"""`fuse layer N|auto|dynamic into head [weight A] [candidates a..b]`: Layer Fused Decoding
(docs/fusion.md). Grammar: `fuse_stmt`. Pass: passes/fuse.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from surgery.diagnostics import Diagnostic, RecipeError
from surgery.front.plan_step import GraphPassStep, PlanStep
from surgery.front.selectors import (
    LayerIndex,
    LayerRange,
    number_text,
    span_field,
)
from surgery.layers import format_layers
from surgery.source import Span

if TYPE_CHECKING:
    from surgery.front.statements.base import Checker, PlanState
    from surgery.models.index import ModelIndex


DEFAULT_FUSE_WEIGHT = 0.02  # chosen by measurement on smollm2-135m: docs/fusion.md


@dataclass(frozen=True)
class FuseStmt:
    """`fuse layer N|auto|dynamic into head [weight A] [candidates a..b]`."""

    mode: Literal["static", "auto", "dynamic"]
    layer: LayerIndex | None = None
    weight: float | None = None
    candidates: LayerRange | None = None
    span: Span = span_field()
    weight_span: Span | None = span_field()


@dataclass(frozen=True)
class ResolvedFuse:
    """A fuse statement: the layer (static), or the candidates (auto, dynamic), and the weight."""

    mode: str  # "static", "auto" or "dynamic"
    weight: float
    layer: int | None
    candidates: tuple[int, ...]
    statement: FuseStmt


NODES = (FuseStmt,)
GRAMMAR = ("fuse_stmt",)

SYNTAX = """
// fuse layer N|auto|dynamic into head [weight A] [candidates a..b]
fuse_stmt: "fuse" "layer" fuse_layer "into" "head" fuse_option*
?fuse_layer: layer_index  -> fuse_static
           | "auto"       -> fuse_auto
           | "dynamic"    -> fuse_dynamic
?fuse_option: "weight" NUMBER                           -> weight_option
            | "candidates" layer_index ".." layer_index -> candidates_option
"""

def _fuse_stmt(ast, meta, children) -> FuseStmt:
    (mode, layer), *options = children
    return FuseStmt(mode=mode, layer=layer, span=ast.span(meta), **ast.options(options))


BUILDERS = {
    "fuse_stmt": _fuse_stmt,
    "fuse_static": lambda ast, meta, children: ("static", children[0]),
    "fuse_auto": lambda ast, meta, children: ("auto", None),
    "fuse_dynamic": lambda ast, meta, children: ("dynamic", None),
    "weight_option": lambda ast, meta, children: {"weight": float(children[0]), "weight_span": ast.tok(children[0])},
    "candidates_option": lambda ast, meta, children: {
        "candidates": LayerRange(start=children[0], end=children[1], span=ast.span(meta))
    },
}


def default_fuse_candidates(layers: int) -> tuple[int, ...]:
    """Even layers of the latter half, never the last (fusing the last layer changes nothing)."""
    return tuple(layer for layer in range(layers // 2, layers - 1) if layer % 2 == 0)


def unparse(statement: FuseStmt) -> str:
    """Canonical text."""
    layer = str(statement.layer.value) if statement.mode == "static" else statement.mode
    text = f"fuse layer {layer} into head"
    if statement.weight is not None:
        text += f" weight {number_text(statement.weight)}"
    if statement.candidates is not None:
        text += f" candidates {statement.candidates.start.value}..{statement.candidates.end.value}"
    return text


def check(c: Checker, index: ModelIndex, done: dict) -> ResolvedFuse | None:
    """The fuse statement: its layer or candidates in range and kept, a weight in 0..1."""
    statements = c.single(FuseStmt, "fuse")
    if not statements:
        return None
    statement = statements[0]
    if index.final_logit_softcap is not None:
        c.error(
            f"cannot fuse layers into {index.architecture}'s head: its logits are soft-capped "
            f"(final_logit_softcapping {index.final_logit_softcap:g}), so readouts do not mix linearly",
            statement.span,
        )
        return None
    n = index.num_layers
    hint = f"model has {n} layers; valid indices 0..{n - 1} (or -{n}..-1 counting from the end)"
    weight = statement.weight if statement.weight is not None else DEFAULT_FUSE_WEIGHT
    ok = True
    if not 0 <= weight <= 1:
        c.error(f"weight {weight:g} is not in 0..1", statement.weight_span, "0 = the unfused model, 1 = layer only")
        ok = False
    # Drops by explicit layer numbers are known now; drops by importance are checked by the plan.
    dropped = {layer for d in done["drop"] if d.part == "block" and d.query is None for layer in d.layers}
    layer = None
    candidates: tuple[int, ...] = ()
    if statement.mode == "static":
        layer = c.layer_number(statement.layer, n, hint)
        if layer is None:
            return None
        if layer == n - 1:
            c.error(
                f"layer {statement.layer.value} is the last layer: fusing it into the head changes nothing",
                statement.layer.span,
                f"fuse an intermediate layer, e.g. one of {format_layers(default_fuse_candidates(n))}",
            )
            ok = False
        elif layer in dropped:
            c.error(
                f"layer {layer} cannot be fused: its block is dropped",
                statement.layer.span,
                "layer numbers are the original model's; fuse a layer that is kept",
            )
            ok = False
    elif statement.candidates is not None:
        item = statement.candidates
        start, end = c.layer_number(item.start, n, hint), c.layer_number(item.end, n, hint)
        if start is None or end is None:
            return None
        if start > end:
            c.error(f"reversed range {item.start.value}..{item.end.value}", item.span, "write low..high")
            return None
        if end == n - 1:
            c.error("the candidates include the last layer, which cannot be fused", item.span, f"end at {n - 2}")
            return None
        candidates = tuple(range(start, end + 1))
    else:
        candidates = default_fuse_candidates(n)
    if statement.mode != "static" and not [c for c in candidates if c not in dropped]:
        c.error("every candidate layer is dropped", statement.span, "give candidates that are kept")
        ok = False
    return ResolvedFuse(statement.mode, weight, layer, candidates, statement) if ok else None


def metrics(resolved: ResolvedFuse | None) -> set[str]:
    """The computed metrics the fuse ranks by: iks when its layer is chosen (`auto`)."""
    return {"iks"} if resolved is not None and resolved.mode == "auto" else set()


def plan(state: PlanState) -> list[PlanStep]:
    """The fuse step: a static layer (given, or chosen by lowest calibration IKS) or dynamic candidates."""
    checked = state.checked
    fuse = checked.of("fuse")
    if fuse is None:
        return []
    blocks, mlp, warnings = state.blocks, state.mlp, state.warnings
    span = fuse.statement.span
    parameters: dict[str, Any] = {"mode": "dynamic" if fuse.mode == "dynamic" else "static", "weight": fuse.weight}
    if fuse.mode == "static":
        if fuse.layer not in blocks:
            raise RecipeError(
                [Diagnostic("error", f"layer {fuse.layer} cannot be fused: its block is dropped", span,
                            "layer numbers are the original model's; fuse a layer that is kept")]
            )  # fmt: skip
        layers: tuple[int, ...] = (fuse.layer,)
    else:
        # A dynamic candidate needs its MLP (IKS compares before and after it); auto only a kept block.
        usable = blocks & mlp if fuse.mode == "dynamic" else blocks
        layers = tuple(c for c in fuse.candidates if c in usable)
        gone = [c for c in fuse.candidates if c not in usable]
        if gone:
            warnings.append(
                Diagnostic("warning", f"candidate layer(s) {format_layers(gone)} are dropped and not considered", span)
            )
        if not layers:
            raise RecipeError([Diagnostic("error", "no candidate layer is left after the drops", span)])
        parameters["candidates"] = list(fuse.candidates)
        if fuse.mode == "auto":
            iks = state.computed_scores("iks").scores["block"]
            ranked = sorted(layers, key=lambda layer: (iks[layer], layer))
            parameters["selected_by"] = f"lowest mean IKS (calibration) among candidates {format_layers(layers)}"
            parameters["scores"] = {layer: round(iks[layer], 6) for layer in ranked}
            layers = (ranked[0],)
    note = "weight 0: the head is unchanged" if fuse.weight == 0 else ""
    step = FuseStep(
        action="fuse",
        phase="graph",
        parameters={**parameters, "layers": list(layers)},
        layers=layers,
        targets=("lm_head",),
        source=span,
        note=note,
    )
    return [step]


@dataclass(frozen=True)
class FuseStep(GraphPassStep):
    """A `fuse layer ... into head` step."""

    @property
    def needs_whole_model(self) -> bool:
        """The fused head reads a layer's weights beside the head's."""
        return True

    def describe(self) -> str:
        """One line for `surgery plan`."""
        p = self.parameters
        if p["mode"] == "dynamic":
            return (
                f"fuse into the head, per token, the layer with the lowest IKS among {format_layers(self.layers)}, "
                f"weight {p['weight']:g}"
            )
        return f"fuse layer {self.layers[0]} into the head, weight {p['weight']:g}"


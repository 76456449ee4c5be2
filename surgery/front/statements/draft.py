"""`draft [tokens K] { <statements> }` and `draft ngram N [tokens K]`: speculative decoding.

A draft is a second, faster model built from the same checkpoint by the statements in its
block (quantize, drop, fuse: any that shrink a model), written beside the target as
`draft.onnx` and wired into the target's genai_config.json, so onnxruntime-genai drafts `K`
tokens with it and the target checks them in one pass: with greedy search the tokens are the
target's own, only sooner. `draft ngram N` asks genai to draft from the text so far (n-grams of
N tokens) with no model. The block's statements mean what they mean at the top of a recipe
(layer numbers are the original model's) and apply to the checkpoint, not to the target.

Grammar: `draft_stmt`. Check: the block is checked as a recipe of its own (the recipe's model,
calibration and export with the block's statements), its errors reported where they are.
Step: `DraftStep`, run by surgery/executor/draft.py after the target is final.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from surgery.formats.speculation import DEFAULT_NGRAM_TOKENS, MAX_DRAFT_TOKENS, MIN_NGRAM
from surgery.front.plan_step import PlanStep, Run
from surgery.front.selectors import span_field
from surgery.layers import format_layers
from surgery.source import Span

if TYPE_CHECKING:
    from surgery.front.checked import CheckedRecipe
    from surgery.front.recipe import Recipe
    from surgery.front.statements.base import Checker, PlanState
    from surgery.models.index import ModelIndex


@dataclass(frozen=True)
class DraftStmt:
    """`draft [tokens K] { statements }`, or `draft ngram N [tokens K]` (`statements` empty)."""

    statements: tuple[Any, ...] = ()
    tokens: int | None = None  # genai's max_draft_tokens; None: chosen by measurement
    ngram: int | None = None  # n-gram drafting, no model
    fastest: bool = False  # `draft as fast as possible`: candidates built and measured
    span: Span = span_field()
    tokens_span: Span | None = span_field()
    ngram_span: Span | None = span_field()


@dataclass(frozen=True)
class ResolvedDraft:
    """A checked draft: its own recipe (None for n-gram drafting), checked, and its options."""

    recipe: Recipe | None
    checked: CheckedRecipe | None
    tokens: int | None
    ngram: int | None
    span: Span
    candidates: tuple[tuple[str, Recipe | None], ...] = ()  # `as fast as possible`: (name, recipe)


NODES = (DraftStmt,)
GRAMMAR = ("draft_stmt",)

SYNTAX = """
// draft [tokens K] { <statements> }: a second model from the same checkpoint drafts K tokens
// draft ngram N [tokens K]: onnxruntime-genai drafts from n-grams of the text so far (no model)
// draft as fast as possible [tokens K]: candidate drafts built and measured, the fastest kept
draft_stmt: "draft" draft_tokens? "{" draft_item* "}"
          | "draft" "ngram" INT draft_tokens? -> draft_ngram_stmt
          | "draft" "as" "fast" "as" "possible" draft_tokens? -> draft_fastest_stmt
draft_tokens: "tokens" INT
?draft_item: quantize_stmt
           | quantize_group_stmt
           | quantize_model_stmt
           | drop_stmt
           | drop_heads_stmt
           | fuse_stmt
"""


def _draft_stmt(ast, meta, children) -> DraftStmt:
    options = [c for c in children if isinstance(c, dict)]
    statements = tuple(c for c in children if not isinstance(c, dict))
    return DraftStmt(statements=statements, span=ast.span(meta), **ast.options(options))


def _draft_ngram_stmt(ast, meta, children) -> DraftStmt:
    size, *options = children
    return DraftStmt(ngram=int(size), ngram_span=ast.tok(size), span=ast.span(meta), **ast.options(options))


BUILDERS = {
    "draft_stmt": _draft_stmt,
    "draft_ngram_stmt": _draft_ngram_stmt,
    "draft_fastest_stmt": lambda ast, meta, children: DraftStmt(fastest=True, span=ast.span(meta),
                                                                **ast.options(children)),
    "draft_tokens": lambda ast, meta, children: {"tokens": int(children[0]), "tokens_span": ast.tok(children[0])},
}


def unparse(statement: DraftStmt) -> str:
    """Canonical text (the block one statement per line, indented)."""
    from surgery.front.statements import for_node

    tokens = f" tokens {statement.tokens}" if statement.tokens is not None else ""
    if statement.ngram is not None:
        return f"draft ngram {statement.ngram}{tokens}"
    if statement.fastest:
        return f"draft as fast as possible{tokens}"
    body = "".join(
        "".join(f"    {line}\n" for line in for_node(s).unparse(s).split("\n")) for s in statement.statements
    )
    return f"draft{tokens} {{\n{body}}}"


def draft_recipe(recipe: Recipe, statement: DraftStmt) -> Recipe:
    """The draft's own recipe: the recipe's model, calibration and export statements around the
    block's statements, in the same source (so its diagnostics point into the recipe)."""
    from dataclasses import replace

    from surgery.front.statements.calibrate import CalibrateStmt
    from surgery.front.statements.export import ExportStmt
    from surgery.front.statements.model import ModelStmt

    shared = (ModelStmt, CalibrateStmt, ExportStmt)
    around = [s for s in recipe.statements if isinstance(s, shared)]
    heads = [s for s in around if not isinstance(s, ExportStmt)]
    tails = [s for s in around if isinstance(s, ExportStmt)]
    return replace(recipe, statements=(*heads, *statement.statements, *tails))


FASTEST_NGRAM = 3


def candidate_blocks(layers: int) -> list[tuple[str, tuple[Any, ...]]]:
    """`draft as fast as possible`'s model candidates for a model of `layers` layers: int8 and
    int4 (layers, head, embedding), attention dropped in the least important fifth of the
    layers by similarity with int4, the least important eighth of the blocks dropped with int8,
    and an early exit (the last quarter of the blocks dropped, the middle layer fused into the
    head) with int8: issue 27's measured kinds of draft, and their combinations."""
    from surgery.front.selectors import (
        ImportanceRank,
        ImportanceSelector,
        ImportanceSource,
        LayerIndex,
        LayerList,
        LayerRange,
    )
    from surgery.front.statements.drop import DropStmt
    from surgery.front.statements.fuse import FuseStmt
    from surgery.front.statements.quantize.syntax import QuantizeStmt

    def everything(bits: int) -> tuple[Any, ...]:
        return tuple(QuantizeStmt(part=part, selector=None, bits=bits) for part in ("layers", "head", "embedding"))

    def least(part: str, count: int) -> DropStmt:
        rank = ImportanceRank("least", count=count)
        return DropStmt(part=part, selector=ImportanceSelector(rank, ImportanceSource(metric="similarity")))

    def plural(count: int) -> str:
        return f"{count} layer{'s' if count > 1 else ''}"

    fifth, eighth = max(1, layers // 5), max(1, layers // 8)
    candidates = [
        ("int8 layers, head and embedding", everything(8)),
        ("int4 layers, head and embedding", everything(4)),
        (f"attention dropped in {plural(fifth)} by similarity, int4", (least("attention", fifth), *everything(4))),
        (f"{plural(eighth)} dropped by similarity, int8", (least("block", eighth), *everything(8))),
    ]
    # An early exit: the last quarter of the blocks dropped, the middle layer fused into the head.
    first, middle = layers - max(1, layers // 4), layers // 2
    if 0 < middle < first - 1:
        dropped = LayerList((LayerRange(LayerIndex(first), LayerIndex(layers - 1)),))
        exit_blocks = DropStmt(part="block", selector=dropped)
        fused = FuseStmt(mode="static", layer=LayerIndex(middle))
        blocks = f"block {first}" if first == layers - 1 else f"blocks {first}..{layers - 1}"
        candidates.append((f"{blocks} dropped, layer {middle} fused into the head, int8",
                           (exit_blocks, fused, *everything(8))))  # fmt: skip
    return candidates


def _within(span: Span | None, outer: Span) -> bool:
    return span is not None and outer.start <= span.start and span.end <= outer.end


def check(c: Checker, index: ModelIndex, done: dict) -> ResolvedDraft | None:
    """The draft: genai's bounds on K and n-grams, an export with a KV cache, and the block checked
    as a recipe of its own against the same model (its errors and warnings inside the block)."""
    statements = c.single(DraftStmt, "draft")
    if not statements:
        return None
    statement = statements[0]
    ok = True
    if statement.tokens is not None and not 1 <= statement.tokens <= MAX_DRAFT_TOKENS:
        c.error(f"onnxruntime-genai drafts 1 to {MAX_DRAFT_TOKENS} tokens at a time", statement.tokens_span,
                "drop `tokens` to have K chosen by measurement")  # fmt: skip
        ok = False
    if index.conv_layers:
        c.error("speculative decoding rewinds the cache past rejected drafts, and a short convolution's state "
                "cannot be rewound", statement.span,
                f"layers {format_layers(index.conv_layers)} of this model are short convolutions (onnxruntime-genai "
                "does not rewind them either)")  # fmt: skip
        return None
    export = done["export"][0]
    if not export.kv_cache:
        c.error("speculative decoding needs the KV cache: the target verifies drafted tokens against it",
                statement.span, "drop `without kv-cache` from the export")  # fmt: skip
        ok = False
    from surgery.diagnostics import RecipeError

    if statement.fastest:
        candidates: list[tuple[str, Recipe | None]] = []
        for name, block in candidate_blocks(index.num_layers):
            try:  # a candidate this model cannot take (a MoE's experts at int4) is left out
                candidates.append((name, c.check_recipe(draft_recipe(c.recipe, DraftStmt(block))).recipe))
            except RecipeError:
                continue
        candidates.append((f"n-grams of {FASTEST_NGRAM} tokens", None))
        return ResolvedDraft(None, None, statement.tokens, None, statement.span, tuple(candidates)) if ok else None
    if statement.ngram is not None:
        if statement.ngram < MIN_NGRAM:
            c.error(f"an n-gram of {statement.ngram} token predicts nothing", statement.ngram_span,
                    f"use {MIN_NGRAM} or more (3 is genai's usual)")  # fmt: skip
            ok = False
        return ResolvedDraft(None, None, statement.tokens, statement.ngram, statement.span) if ok else None
    if not statement.statements:
        c.error(
            "an empty draft is the target itself: every token is accepted and nothing is saved",
            statement.span,
            "add what makes it faster, e.g. `quantize layers to int8`, `quantize head to int8` and `quantize "
            "embedding to int8`, or use `draft ngram 3`",
        )
        return None
    recipe = draft_recipe(c.recipe, statement)
    try:
        checked = c.check_recipe(recipe)
    except RecipeError as error:
        # Problems of the shared statements are the recipe's own, reported once by its check.
        c.diagnostics.extend(d for d in error.diagnostics if _within(d.span, statement.span))
        return None
    c.diagnostics.extend(d for d in checked.warnings if _within(d.span, statement.span))
    return ResolvedDraft(recipe, checked, statement.tokens, None, statement.span) if ok else None


def plan(state: PlanState) -> list[PlanStep]:
    """The draft step, built and checked once the target is final."""
    resolved: ResolvedDraft | None = state.checked.of("draft") or None
    if resolved is None:
        return []
    from surgery.front.statements import for_node

    def block(recipe: Recipe | None) -> list[str]:
        texts = [for_node(s).unparse(s) for s in recipe.statements] if recipe else []
        return [text for text in texts if text.split(" ", 1)[0] not in ("model", "calibrate", "export")]

    parameters: dict[str, Any] = {"statements": block(resolved.recipe), "max_draft_tokens": resolved.tokens,
                                  "ngram_size": resolved.ngram}  # fmt: skip
    if resolved.candidates:
        parameters["candidates"] = [
            {"name": name, "statements": block(recipe)} if recipe else {"name": name, "ngram_size": FASTEST_NGRAM}
            for name, recipe in resolved.candidates
        ]
    return [DraftStep(action="draft", phase="evaluate", parameters=parameters, source=resolved.span,
                      recipe=resolved.recipe, recipes=tuple(r for _, r in resolved.candidates))]  # fmt: skip


@dataclass(frozen=True)
class DraftStep(PlanStep):
    """`draft`: build the draft, share its tensors with the target's, wire it into genai_config.json
    and check that speculation gives the target's own tokens (surgery/executor/draft.py)."""

    timing: ClassVar[str] = "draft"
    recipe: Recipe | None = field(default=None, compare=False, repr=False)  # the draft's own recipe
    # `as fast as possible`: each candidate's recipe (None for n-gram drafting), as parameters' candidates
    recipes: tuple[Recipe | None, ...] = field(default=(), compare=False, repr=False)

    def describe(self) -> str:
        """One line for `surgery plan`."""
        p = self.parameters
        k = f"{p['max_draft_tokens']} tokens" if p["max_draft_tokens"] else "K tokens (K chosen by measurement)"
        if p.get("candidates"):
            names = "; ".join(c["name"] for c in p["candidates"])
            return (f"draft as fast as possible: builds and measures {len(p['candidates'])} candidates ({names}), "
                    f"drafting {k}, and keeps the fastest in onnxruntime-genai with the target's own greedy "
                    "tokens")  # fmt: skip
        if p["ngram_size"]:
            k = f"{p['max_draft_tokens'] or DEFAULT_NGRAM_TOKENS} tokens"
            return f"draft: onnxruntime-genai drafts {k} from {p['ngram_size']}-grams of the text so far (no model)"
        return (
            f"draft: a second model from the checkpoint ({'; '.join(p['statements'])}) as draft.onnx, sharing the "
            f"target's identical tensors; drafts {k}; greedy tokens with it checked against the target's alone"
        )

    def run(self, run: Run) -> None:
        """Build, wire and check the draft."""
        from surgery.executor.draft import build_draft

        build_draft(run, self)

"""`model "<spec>"`: which model the recipe operates on (`--model` overrides it).

Grammar: `model_stmt`. Its check resolves the spec and reads the config into the model index
every other statement is checked against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from surgery import architectures
from surgery.front.selectors import span_field
from surgery.models.index import ModelIndex
from surgery.models.index_cache import cached_index, keep_index
from surgery.models.loading import load_config
from surgery.models.specs import ModelSpec, ModelSpecError, resolve_spec
from surgery.source import Span

if TYPE_CHECKING:
    from surgery.front.statements.base import Checker


@dataclass(frozen=True)
class ModelStmt:
    """`model "<spec>"`: which model the recipe operates on."""

    spec: str
    span: Span = span_field()
    spec_span: Span = span_field()


NODES = (ModelStmt,)
GRAMMAR = ("model_stmt",)

SYNTAX = """
model_stmt: "model" STRING
"""

def _model_stmt(ast, meta, children) -> ModelStmt:
    (string,) = children
    return ModelStmt(spec=string[1:-1], span=ast.span(meta), spec_span=ast.tok(string))


BUILDERS = {"model_stmt": _model_stmt}


def unparse(statement: ModelStmt) -> str:
    """Canonical text."""
    return f'model "{statement.spec}"'


def check(c: Checker) -> tuple[ModelSpec, ModelIndex, Span | None] | None:
    """The model spec resolved and its config read: an architecture some description covers,
    plausible values. Returns (spec, index, span) or None (with errors)."""
    statements = c.single(ModelStmt, "model")
    if c.model_override is not None:
        text, span = c.model_override, None
    elif statements:
        text, span = statements[0].spec, statements[0].spec_span
    else:
        c.error("the recipe names no model", None, 'add a line `model "<spec>"` or pass --model SPEC')
        return None
    try:
        spec = resolve_spec(text, c.base_dir)
    except ModelSpecError as problem:
        c.error(str(problem), span, problem.hint)
        return None
    index = cached_index(spec, text)
    if index is None:
        index = _index_from_config(c, spec, text, span)
        if index is None:
            return None
        if not index.unsupported_reasons():
            keep_index(spec, index)
    for reason in index.unsupported_reasons():
        c.error(f"cannot compile '{text}': {reason}", span)
    if index.implausible_fields():  # the statements cannot be checked against such a model
        return None
    return spec, index, span


def _index_from_config(c: Checker, spec: ModelSpec, text: str, span: Span | None) -> ModelIndex | None:
    """The index read from the model's config through transformers (None, with errors)."""
    try:
        config = load_config(spec)
    except ModelSpecError as problem:
        c.error(str(problem), span, problem.hint)
        return None
    if architectures.lookup(config.model_type) is None:
        message, hint = architectures.refusal(text, config.model_type)
        c.error(message, span, hint)
        return None
    try:
        return ModelIndex.from_config(text, config)
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as problem:
        c.error(f"cannot compile '{text}': its config is incomplete ({type(problem).__name__})", span)
        return None

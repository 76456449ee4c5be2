"""Recipe statements, each in one module with its syntax node, check, plan step and description.

`STATEMENTS` is the order statements are checked and planned in (the plan then orders steps by
phase, keeping recipe order within a phase). The model statement is special: it yields the
model index every other check needs (surgery/front/check.py resolves it first).
"""

from __future__ import annotations

from types import ModuleType

from surgery.front.statements import (
    calibrate,
    decode,
    draft,
    drop,
    export,
    fuse,
    heads,
    kv_cache,
    merge,
    prune,
    quantize,
    retrieval,
    split,
    verify,
)

# calibrate first (the importance step reads it); the graph statements in the order their
# passes run: drops, then split before prune and merge (they act on its experts), prune before
# merge, then fuse (its layer must be kept); quantize plans on the layers that are left; the
# KV cache after the export (it needs one with a cache) and planned after every graph pass
# that removes attention; the draft last (its block is checked as a recipe of its own, with
# the export resolved).
STATEMENTS: tuple[ModuleType, ...] = (calibrate, drop, heads, split, prune, merge, fuse, quantize, export, kv_cache,
                                      verify, retrieval, decode, draft)  # fmt: skip


def name(module: ModuleType) -> str:
    """A statement module's short name ("drop", "quantize", ...)."""
    return module.__name__.rsplit(".", 1)[-1]


def for_node(node: object) -> ModuleType:
    """The statement module whose syntax node `node` is."""
    for module in (*STATEMENTS, model):
        if isinstance(node, module.NODES):
            return module
    raise TypeError(f"not a statement: {node!r}")


def for_step(step: object) -> ModuleType | None:
    """The statement module whose step kind `step` is (None for the planner's own steps)."""
    return next((module for module in STATEMENTS if module.__name__ == type(step).__module__), None)


from surgery.front.statements import model  # noqa: E402  (the model statement; see the docstring)

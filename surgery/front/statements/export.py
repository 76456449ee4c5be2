"""`export onnx [opset N] [without kv-cache] [with position-ids] [precision fp32|fp16|bf16]
[for cpu|cuda] [without cuda-graphs]`: the export options.
Grammar: `export_stmt`. Its step runs surgery/executor/export.py (the exporter, surgery/export/decoder.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from surgery.export.options import DEFAULT_OPSET, SUPPORTED_OPSETS, ExportOptions
from surgery.formats.precision import DEFAULT_FOR_TARGET
from surgery.formats.precision import precision as precision_record
from surgery.front.plan_step import PlanStep, Run
from surgery.front.selectors import (
    span_field,
)
from surgery.source import Span

if TYPE_CHECKING:
    from surgery.front.statements.base import Checker, PlanState
    from surgery.models.index import ModelIndex


@dataclass(frozen=True)
class ExportStmt:
    """`export onnx [opset N] [without kv-cache] [with position-ids] [precision P] [for T]`."""

    format: str = "onnx"
    opset: int | None = None
    kv_cache: bool = True
    position_ids: bool = False
    precision: str | None = None  # None: the target's default
    target: str = "cpu"
    cuda_graphs: bool = True  # `without cuda-graphs`: genai runs a CUDA output without them
    span: Span = span_field()
    opset_span: Span | None = span_field()
    cuda_graphs_span: Span | None = span_field()
    precision_span: Span | None = span_field()


NODES = (ExportStmt,)
GRAMMAR = ("export_stmt",)

SYNTAX = """
export_stmt: "export" FORMAT export_option*
FORMAT: "onnx"
?export_option: "opset" INT                -> opset_option
              | "without" KV_CACHE         -> without_option
              | "without" CUDA_GRAPHS      -> without_cuda_graphs_option
              | "with" POSITION_IDS        -> with_option
              | "precision" PRECISION      -> precision_option
              | "for" TARGET               -> target_option
PRECISION: "fp32" | "fp16" | "bf16"
TARGET: "cpu" | "cuda"
KV_CACHE: "kv-cache"
CUDA_GRAPHS: "cuda-graphs"
POSITION_IDS: "position-ids"
"""

def _export_stmt(ast, meta, children) -> ExportStmt:
    return ExportStmt(format=str(children[0]), span=ast.span(meta), **ast.options(children[1:]))


BUILDERS = {
    "export_stmt": _export_stmt,
    "opset_option": lambda ast, meta, children: {"opset": int(children[0]), "opset_span": ast.tok(children[0])},
    "without_option": lambda ast, meta, children: {"kv_cache": False},
    "without_cuda_graphs_option": lambda ast, meta, children: {"cuda_graphs": False,
                                                                "cuda_graphs_span": ast.span(meta)},
    "precision_option": lambda ast, meta, children: {
        "precision": str(children[0]), "precision_span": ast.tok(children[0])
    },
    "target_option": lambda ast, meta, children: {"target": str(children[0])},
    "with_option": lambda ast, meta, children: {"position_ids": True},
}


def unparse(statement: ExportStmt) -> str:
    """Canonical text."""
    text = f"export {statement.format}"
    if statement.opset is not None:
        text += f" opset {statement.opset}"
    if not statement.kv_cache:
        text += " without kv-cache"
    if statement.position_ids:
        text += " with position-ids"
    if statement.precision is not None:
        text += f" precision {statement.precision}"
    if statement.target != "cpu":
        text += f" for {statement.target}"
    if not statement.cuda_graphs:
        text += " without cuda-graphs"
    return text


# onnxruntime-gpu 1.31.1's GroupQueryAttention refuses wider heads ("Head size (576) exceeds
# maximum supported MAX_HEAD_SIZE (512)", measured on an H100 with DeepSeek-V2-Lite's latent head).
CUDA_MAX_HEAD_SIZE = 512


def check(c: Checker, index: ModelIndex | None, done: dict) -> tuple[ExportOptions, ExportStmt | None]:
    """The export options (defaults where the recipe has no export statement)."""
    statements = c.single(ExportStmt, "export")
    if not statements:
        return ExportOptions(), None
    statement = statements[0]
    opset = statement.opset if statement.opset is not None else DEFAULT_OPSET
    if opset not in SUPPORTED_OPSETS:
        c.error(
            f"opset {opset} is not supported",
            statement.opset_span or statement.span,
            f"supported opsets: {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1} (default {DEFAULT_OPSET})",
        )
    precision = statement.precision or DEFAULT_FOR_TARGET[statement.target].name
    if not precision_record(precision).runs_on(statement.target):
        c.error(
            f"{precision} is not a {statement.target.upper()} precision",
            statement.precision_span or statement.span,
            f"{precision_record(precision).why_not}: use fp32 (or fp16) for cpu, or add `for cuda`",
        )
    if statement.target == "cuda" and index is not None and index.head_dim > CUDA_MAX_HEAD_SIZE:
        c.error(
            f"this model's attention heads are {index.head_dim} wide"
            + (" (latent attention caches its rotary key and latent as one head)" if index.latent_attention else "")
            + f"; onnxruntime's CUDA GroupQueryAttention takes at most {CUDA_MAX_HEAD_SIZE}",
            statement.span,
            "export for the CPU (drop `for cuda`)",
        )
    if not statement.cuda_graphs and statement.target != "cuda":
        c.error(
            "CUDA graphs are written only into a CUDA output's genai_config.json",
            statement.cuda_graphs_span,
            "drop `without cuda-graphs`, or add `for cuda`",
        )
    options = ExportOptions(
        opset=opset,
        kv_cache=statement.kv_cache,
        position_ids=statement.position_ids,
        precision=precision,
        target=statement.target,
        cuda_graphs=statement.cuda_graphs and statement.target == "cuda",
    )
    return options, statement


def plan(state: PlanState) -> list[PlanStep]:
    """The export step (every plan has one)."""
    export = state.checked.export
    statement = state.checked.export_statement
    return [
        ExportStep(
            action="export onnx",
            phase="export",
            parameters={
                "opset": export.opset,
                "kv_cache": export.kv_cache,
                "position_ids": export.position_ids,
                "precision": export.precision,
                "target": export.target,
                "cuda_graphs": export.cuda_graphs,
            },
            source=statement.span if statement else None,
        )
    ]


@dataclass(frozen=True)
class ExportStep(PlanStep):
    """The `export onnx` step (every plan has one)."""

    timing: ClassVar[str] = "export"

    def describe(self) -> str:
        """One line for `surgery plan`."""
        p = self.parameters
        positions = ", with position-ids" if p.get("position_ids") else ""
        kv = "with" if p["kv_cache"] else "without"
        graphs = ", CUDA graphs in onnxruntime-genai" if p.get("cuda_graphs") else ""
        return f"export onnx opset {p['opset']} {kv} kv-cache{positions}, {p['precision']} for {p['target']}{graphs}"

    def run(self, run: Run) -> None:
        """Write the output folder's model, tokenizer and configs (surgery/executor/export.py)."""
        from surgery.executor.export import export_model

        export_model(run)

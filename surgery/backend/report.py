"""`surgery.json`: what was asked, what was done, and the proof (figures and timings)."""

from __future__ import annotations

import datetime as _dt
import json
import os
from typing import Any

from surgery import __version__
from surgery.backend.verify import Verification
from surgery.diagnostics import Diagnostic
from surgery.export.decoder import ExportResult
from surgery.front.plan import Plan
from surgery.ir.graph import DecoderGraph
from surgery.passes import GraphPass, PassResult
from surgery.source import Span


def structure(graph: DecoderGraph) -> dict[str, Any]:
    """Layers, attention and MLP layers (original numbers), experts per MoE layer, and parameters."""
    from surgery.analysis.experts import expert_count

    experts = {str(layer.index): expert_count(layer.mlp) for layer in graph.layers if layer.has_mlp}
    found = {
        "layers": len(graph.layers),
        "layer_numbers": [layer.index for layer in graph.layers],
        "attention_layers": graph.kv_layers(),
        "mlp_layers": [layer.index for layer in graph.layers if layer.has_mlp],
        "parameters": graph.parameter_count(),
        # per layer with a cache: (key/value heads, head size, its quantized format or None)
        "kv_layout": {str(index): _kv_layout(graph.layer(index).attention) for index in graph.kv_layers()},
    }
    if graph.conv_layers():  # per short-convolution layer (LFM2): its state's (channels, positions)
        convs = {index: graph.layer(index).attention for index in graph.conv_layers()}
        found["conv_state"] = {str(index): [node.channels, node.state_width] for index, node in convs.items()}
    if any(experts.values()):
        found["experts_per_layer"] = {layer: count for layer, count in experts.items() if count}
        found["expert_parameters"] = sum(
            p.numel() for layer in graph.layers if layer.has_mlp and expert_count(layer.mlp)
            for p in layer.mlp.experts.parameters()
        )  # fmt: skip
        found["expert_bytes_fp32"] = found["expert_parameters"] * 4  # experts are exported in fp32
    return found


def _kv_layout(attention) -> list:
    quant = attention.kv_quant
    return [attention.num_kv_heads, attention.head_dim, quant.format.to_json() if quant is not None else None]


def pass_record(graph_pass: GraphPass, result: PassResult, source: Span | None) -> dict[str, Any]:
    """One applied pass as the report lists it: what, with which parameters, from which line."""
    return {
        "action": graph_pass.name,
        "parameters": {k: list(v) if isinstance(v, tuple) else v for k, v in graph_pass.parameters().items()},
        "preserves_semantics": graph_pass.preserves_semantics,
        "summary": result.summary,
        "source": source.to_json() if source else None,
    }


def folder_bytes(folder: str, names: tuple[str, ...] = ("model.onnx", "model.onnx.data")) -> dict[str, int]:
    """Sizes of the model files in an output folder."""
    return {
        name: os.path.getsize(os.path.join(folder, name))
        for name in names
        if os.path.exists(os.path.join(folder, name))
    }


def build_report(
    *,
    recipe_text: str,
    plan: Plan,
    before: dict[str, Any],
    after: dict[str, Any],
    passes: list[dict[str, Any]],
    export: ExportResult,
    files: dict[str, int],
    verification: Verification | None,
    timings: dict[str, float],
    warnings: tuple[Diagnostic, ...],
    sections: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report as plain data; `sections` adds importance, quantization and perplexity records."""
    dropped_kv = [layer for layer in before["attention_layers"] if layer not in export.kv_layers]
    return {
        "surgery_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "recipe": {"path": plan.recipe_name, "text": recipe_text},
        "plan": plan.to_json(),
        "model": {
            "before": {**before, "bytes_fp32": before["parameters"] * 4},
            "after": {**after, "bytes": sum(files.values()), "files": files},
        },
        "kv_cache": {
            "enabled": plan.export.kv_cache,
            "slots": {str(slot): layer for slot, layer in enumerate(export.kv_layers)} if plan.export.kv_cache else {},
            "removed_layers": dropped_kv,
            **_cache_figures(plan, before, after, export),
        },
        "passes": passes,
        "export": {
            "target": plan.export.target,
            "precision": plan.export.precision,
            "opset": plan.export.opset,
            "kv_cache": plan.export.kv_cache,
            "context_length": export.context_length,
            "op_counts": export.op_counts,
        },
        "verification": verification.to_json() if verification else {"skipped": True},
        **(sections or {}),
        "timings_s": {name: round(seconds, 3) for name, seconds in timings.items()},
        "warnings": [d.render() for d in warnings],
    }


def _cache_figures(plan: Plan, before: dict, after: dict, export: ExportResult) -> dict[str, Any]:
    """KV bytes per token before and after (in the export's element type where not quantized),
    and the longest context whose cache fits in 1, 4 and 16 GB."""
    if not plan.export.kv_cache:
        return {}
    from surgery.formats.kv_cache import cache_budget

    itemsize = plan.export.element.itemsize
    original = {layer: (heads, size, None) for layer, (heads, size, _) in before["kv_layout"].items()}
    return {
        "element": plan.export.precision,
        "before": cache_budget(original, itemsize, export.context_length),
        "after": cache_budget(after["kv_layout"], itemsize, export.context_length),
        "formats": {layer: stored for layer, (_, _, stored) in after["kv_layout"].items() if stored is not None},
        # Short convolutions (LFM2) carry a fixed state per sequence beside the cache, whatever the length.
        "conv_state_bytes": sum(c * w for c, w in after.get("conv_state", {}).values()) * itemsize,
    }


def write_report(folder: str, report: dict[str, Any]) -> str:
    """Write surgery.json into `folder`; returns its path."""
    path = os.path.join(folder, "surgery.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
        handle.write("\n")
    return path

"""The quantize steps' work, all of them as one: the exported model's linears (unless the
exporter quantized them as it wrote them) and embedding, its files replaced atomically, and the
report's quantization section."""

from __future__ import annotations

import os
from collections import Counter
from typing import TYPE_CHECKING

from surgery.formats.names import EMBEDDING
from surgery.formats.precision import precision as precision_record

if TYPE_CHECKING:
    from surgery.executor.run import Run
    from surgery.front.plan_step import PlanStep


def quantize_output(run: Run, steps: list[PlanStep]) -> None:
    """Quantize the output as the plan's quantize steps say (later ones override earlier ones);
    GPTQ blocks (`run.calibrated`) are written over the round-to-nearest ones of the quantize
    pass (same layout and size), before the embedding pass shares a tied head's table.

    Linears quantized while written are held to the quantize pass's own contract (`ensures`) on
    the written graph, read without its weights.
    """
    import onnx

    from surgery.analysis.quantization import bits_summary, replace_blocks
    from surgery.backend.report import folder_bytes, pass_record
    from surgery.passes import PassContractError, PassResult, Quantize, QuantizeEmbedding, run_pass
    from surgery.passes.quantize import ACCURACY_LEVELS

    plan, export, progress = run.plan, run.export_result, run.progress
    quantization = run.quantization
    if not quantization:  # every quantize step matched nothing
        return
    written = bool(run.options.quantize_linears or run.options.quantize_embedding)
    folder = str(run.folder.path)
    files_before = folder_bytes(folder)
    embedding = quantization.get(EMBEDDING)
    model = onnx.load(os.path.join(folder, "model.onnx"), load_external_data=not written)
    linears = {target: config for target, config in quantization.items() if target != EMBEDDING}
    if linears:
        assignment = tuple((export.linears[linear], target.format) for linear, target in linears.items())
        # int8 activations on CPU (accuracy_level 4, the fast path there); float compute on CUDA.
        quantize = Quantize(assignment=assignment, accuracy_level=ACCURACY_LEVELS[plan.export.target])
        if written:
            problems = quantize.ensures(model)
            if problems:
                raise PassContractError(quantize.name, "ensures", problems)
            result = PassResult(True, quantize.summary() + ", while writing")
        else:
            progress(f"quantizing {len(assignment)} linear layer(s) to MatMulNBits")
            result = run_pass(quantize, model)
            replace_blocks(model, {export.linears[linear]: b for linear, b in run.calibrated.items()})
        progress(f"quantize: {result.summary}")
        linear_steps = [step for step in steps if step.targets != (EMBEDDING,)]
        record = pass_record(quantize, result, linear_steps[0].source if linear_steps else None)
        record["parameters"] = {"linears": {linear: target.to_json() for linear, target in linears.items()}}
        run.passes.append(record)
    if embedding:
        quantize_embedding = QuantizeEmbedding(stored=embedding.format, tied_head=run.tied_head)
        if written:  # the exporter wrote the lookup: held to the pass's own contract
            problems = quantize_embedding.ensures(model)
            if problems:
                raise PassContractError(quantize_embedding.name, "ensures", problems)
            shared = (bits_summary(model).get("embedding") or {}).get("shared_with_head")
            how = "shares the tied head's quantized tensors" if shared else "in tensors of its own"
            result = PassResult(True, f"embedding to {embedding.format.describe('GatherBlockQuantized')}, {how}, "
                                      "while writing")  # fmt: skip
        else:
            result = run_pass(quantize_embedding, model)
        progress(f"quantize embedding: {result.summary}")
        source = next(step.source for step in reversed(steps) if EMBEDDING in step.targets)
        run.passes.append(pass_record(quantize_embedding, result, source))
    summary = bits_summary(model)
    if not written:
        # Written next to the old files, then swapped in: a crash leaves the fp32 model intact.
        staging = os.path.join(folder, ".quantized")
        os.makedirs(staging)
        onnx.save(
            model,
            os.path.join(staging, "model.onnx"),
            save_as_external_data=True,
            location="model.onnx.data",
            size_threshold=1024,
        )
        for name in ("model.onnx.data", "model.onnx"):
            os.replace(os.path.join(staging, name), os.path.join(folder, name))
        os.rmdir(staging)
    files_after = folder_bytes(folder)
    if written:
        # No float model was written: "before" is what its data file would have held.
        data = files_after["model.onnx.data"] + _float_excess(model, plan.export.precision)
        files_before = {**files_after, "model.onnx.data": data}
    section = {
        **summary,
        "quantized_while_writing": bool(written),
        "files_before": files_before,
        "files_after": files_after,
        "bytes_before": sum(files_before.values()),
        "bytes_after": sum(files_after.values()),
        "op_counts": dict(Counter(node.op_type for node in model.graph.node)),
    }
    run.sections["quantization"] = section
    _moved_by_quantization(run, section)


def _moved_by_quantization(run: Run, section: dict) -> None:
    """Informational: how far quantization moved the logits from PyTorch's (no tolerance applies)."""
    from surgery.backend.verify import compare

    settings = run.settings
    precision = run.plan.export.precision
    if run.trace is not None:
        run.moved = compare(run.trace, str(run.folder.path), float("inf"), settings.threads, precision,
                            providers=settings.providers)  # fmt: skip
    if run.moved is not None:
        section["against_pytorch_fp32"] = {
            "reference_precision": precision,  # PyTorch's element type (the key predates fp16)
            "max_abs_logit_diff": run.moved.max_abs_logit_diff,
            "greedy_tokens_compared": run.moved.greedy_tokens_compared,
            "greedy_tokens_mismatched": run.moved.greedy_tokens_mismatched,
            "mean_kl": run.moved.mean_kl,
            "top1_agreement": run.moved.top1_agreement,
            "positions": run.moved.positions,
        }


def _float_excess(model, precision: str) -> int:
    """Bytes the quantized linears would take in the float element type beyond what they take."""
    from surgery.analysis.quantization import quantized_linears

    itemsize = precision_record(precision).itemsize
    return sum(q.parameters * itemsize - q.storage_bytes for q in quantized_linears(model))

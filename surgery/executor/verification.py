"""The verify step's work: the exported model against PyTorch on prompts, prefill and decode.

Two ways, chosen by the executor's policy. With the whole model in memory, PyTorch's reference
is traced while the exporter writes (`start_reference_trace`; torch and file writes both release
the GIL), then compared with onnxruntime, before quantization. Where the weights stream,
verification runs after the export, teacher-forced and layer-major (surgery.backend.verify_layerwise):
onnxruntime's tokens fed to PyTorch a layer at a time, quantized linears checked exactly against
PyTorch holding the quantized weights.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING

from surgery.export.options import plan_quantizes_cache, verification_pads_prompts
from surgery.formats.precision import FP32
from surgery.formats.precision import precision as precision_record
from surgery.progress import counted

if TYPE_CHECKING:
    from surgery.executor.run import Run


def _padded(run: Run) -> bool:
    """Whether verification left-pads its prompts (surgery.export.options.verification_pads_prompts)."""
    return verification_pads_prompts(run.plan.export.target, plan_quantizes_cache(run.plan.steps))


def start_reference_trace(run: Run, decode_steps: int) -> None:
    """Whole-model runs: trace PyTorch's reference in the background while the export writes."""
    if run.stream:
        return
    from surgery.backend.verify import trace_reference

    export = run.plan.export
    padded = _padded(run)
    graph, tokenizer = run.graph, run.tokenizer
    run.trace = run.background(lambda: trace_reference(graph, tokenizer, export.kv_cache, decode_steps, padded=padded))


def verify(run: Run, decode_steps: int) -> None:
    """Compare the output with PyTorch; the result in `run.verification` (and `run.moved`, how far
    quantizing while writing moved the logits, for information)."""
    from surgery.executor.loading import weights_error
    from surgery.models.weights import WeightsError

    if run.stream:
        try:
            run.verification, run.moved = _verify_layerwise(run, decode_steps)
        except WeightsError as problem:
            raise weights_error(run.checked, problem) from problem
        return
    _verify_whole(run, decode_steps)


def _verify_whole(run: Run, decode_steps: int) -> None:
    from surgery.backend.verify import compare, trace_reference

    settings, export = run.settings, run.plan.export
    precision = export.precision
    trace = run.trace = run.trace.result()
    fp32_trace = None
    if precision != FP32.name:
        # PyTorch again, in the export's element type; the fp32 trace stays for KL / top-1.
        run.progress(f"tracing PyTorch in {precision}")
        fp32_trace = trace
        run.graph.to_dtype(precision_record(precision).torch_dtype())
        padded = _padded(run)
        trace = run.trace = trace_reference(run.graph, run.tokenizer, export.kv_cache, decode_steps, padded=padded)
    quantized = bool(run.plan.quantization())
    run.progress("verifying against PyTorch (prefill + decode)" + (" before quantization" if quantized else ""))
    # The PyTorch weights are not needed past this point; free them before onnxruntime maps the
    # exported ones, so the two copies never add up.
    run.release_graph()
    tolerance = precision_record(precision).tolerance
    folder = str(run.folder.path)
    run.verification = compare(
        trace, folder, tolerance, settings.threads, precision, fp32_trace, settings.providers
    )


def _verify_layerwise(run: Run, decode_steps: int):
    """(verification, how far quantization moved the logits or None), teacher-forced and
    layer-major: PyTorch holds a layer at a time, run on the run's device.

    A model quantized while written is verified exactly through its float-compute twin against
    PyTorch with the quantized weights; the model as written is then compared with the original
    weights for information.
    """
    from surgery.backend.verify import compare
    from surgery.backend.verify_layerwise import float_compute_twin, teacher_forced_traces, written_weights

    graph, options, settings = run.graph, run.options, run.settings
    folder = str(run.folder.path)
    tolerance = precision_record(FP32.name).tolerance
    model = os.path.join(folder, "model.onnx")
    layerwise = {"reference": "teacher-forced, layer by layer"}
    padded = _padded(run)

    # A quantized KV cache: PyTorch attends over onnxruntime's codes, checked against its own
    # rounding (surgery.backend.verify_cache), one check per run.
    from surgery.backend.verify_cache import CodeCheck, judged

    cached = any(graph.layer(index).attention.kv_quant is not None for index in graph.kv_layers())
    checks: list[CodeCheck] = []

    def traces(runs):
        checks[:] = [CodeCheck() for _ in runs] if cached else []
        return teacher_forced_traces(graph, run.tokenizer, runs, decode_steps, options.kv_cache, padded,
                                     settings.threads, settings.providers, device=settings.device,
                                     read_back=checks or None)  # fmt: skip

    def codes(verification, position: int = -1):
        return judged(verification, checks[position]) if checks else verification

    layers = len(graph.layers)
    if not (options.quantize_linears or options.quantize_embedding):
        with counted(run.progress, "verifying against PyTorch (teacher-forced, layer by layer)", layers, "layer"):
            ((trace, recorded),) = traces([(model, None)])
        return codes(replace(compare(trace, model, tolerance, recorded=recorded), **layerwise)), None
    exact = float_compute_twin(folder) if options.accuracy_level else model
    try:
        # The run with the written weights comes last: it overwrites loaded weights in place.
        with counted(run.progress, "verifying against PyTorch with the quantized weights "
                     "(float compute; teacher-forced, layer by layer)", layers, "layer"):  # fmt: skip
            original, quantized = traces([(model, None), (exact, written_weights(graph, model))])
        verification = compare(quantized[0], exact, tolerance, recorded=quantized[1])
        verification = codes(replace(verification, **layerwise, quantized_weights=True))
    finally:
        if exact != model:
            os.remove(exact)
    return verification, compare(original[0], model, float("inf"), recorded=original[1])

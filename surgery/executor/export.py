"""The export step's work: the final graph written as the output folder's model (quantizing
linears as they are written where the weights stream), with its tokenizer, genai_config.json
and the recipe."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from surgery.formats.names import EMBEDDING, HEAD
from surgery.formats.precision import precision as precision_record
from surgery.formats.weights import QuantizedTarget
from surgery.progress import counted

if TYPE_CHECKING:
    from surgery.executor.run import Run


def export_model(run: Run) -> None:
    """Write the model, tokenizer and configs into the run's output folder."""
    from surgery.backend.report import structure
    from surgery.executor.loading import weights_error
    from surgery.export.decoder import export_decoder
    from surgery.models.weights import WeightsError
    from surgery.passes.quantize import ACCURACY_LEVELS

    plan, graph, folder = run.plan, run.graph, str(run.folder.path)
    run.after = structure(graph)  # the graph is final
    run.tied_head = graph.tied_head
    quantization = run.quantization = _calibrate(run, plan.quantization())
    # A quantized head or embedding needs the head's weight as an initializer of its own
    # (the quantized embedding then shares it back when both have the same width).
    options = replace(plan.export, untie_head=HEAD in quantization or EMBEDDING in quantization)
    linears = {target: config for target, config in quantization.items() if target != EMBEDDING}
    if run.stream and quantization:
        # Quantized as they are written: no float copy of the model is written or read back.
        assignment = tuple((linear, target.format) for linear, target in linears.items())
        embedding = quantization.get(EMBEDDING)
        options = replace(options, quantize_linears=assignment, accuracy_level=ACCURACY_LEVELS[options.target],
                          quantize_embedding=embedding.format if embedding else None)  # fmt: skip
    run.options = options
    kv = "with" if plan.export.kv_cache else "without"
    quantizing = ""
    if options.quantize_linears or options.quantize_embedding:
        what = [f"{len(options.quantize_linears)} linear layer(s)"] if options.quantize_linears else []
        what += ["the embedding"] if options.quantize_embedding else []
        quantizing = f", quantizing {' and '.join(what)} as they are written"
    try:
        with counted(run.progress, f"exporting ONNX (opset {plan.export.opset}, {kv} KV cache){quantizing}",
                     len(graph.layers), "layer"):  # fmt: skip
            export = export_decoder(graph, folder, options, run.calibrated if run.stream else None)
    except WeightsError as problem:  # a lazily loaded tensor that is damaged
        raise weights_error(run.checked, problem) from problem
    run.export_result = export
    run.model_tokenizer.save(folder)
    run.sections["onnxruntime_genai"] = _write_genai_config(graph, export, plan.export, run.model_tokenizer, folder)
    (run.folder.path / "recipe.surg").write_text(run.text, encoding="utf-8")


def _calibrate(run: Run, quantization: dict[str, QuantizedTarget]) -> dict[str, QuantizedTarget]:
    """The final format of every quantized tensor, with `run.calibrated` holding the blocks of the
    linears whose rounding reads the calibration data (GPTQ, weighted grids); a
    `quantize model to <bits> bits per weight` has its formats chosen here, by sensitivity
    measured in one walk over the calibration data (surgery.analysis.mixed_precision)."""
    linears = {linear: t for linear, t in quantization.items() if linear != EMBEDDING and t.uses_data}
    if not linears:
        return quantization
    from surgery.analysis.calibrated_quantization import calibrated_blocks, rounded_with_energy, walk_precision

    graph, device, tokens = run.graph, run.settings.device, run.calibration_tokens()
    run.sections["calibration_walk"] = walk_precision(device)
    budget = next((t.bits_per_weight for t in linears.values() if t.bits_per_weight is not None), None)
    describe = run.checked.calibration.describe()
    if budget is None:
        run.progress(f"rounding {len(linears)} linear layer(s) against {describe}")
        run.calibrated = calibrated_blocks(graph, linears, tokens, run.progress, device).blocks
        run.clock.lap("calibrated rounding")
        return quantization
    from surgery.analysis.mixed_precision import FORMATS, choose, section, tensor_shapes

    run.progress(f"measuring the sensitivity of {len(linears)} tensor(s) to each format against {describe}")
    plain = {linear: replace(t, gptq=False, weighted=False) for linear, t in linears.items()}
    measured = calibrated_blocks(graph, plain, tokens, run.progress, device, sensitivity=FORMATS,
                                 head_rounding=linears.get(HEAD))  # fmt: skip
    index, plan = run.checked.index, run.plan
    shapes = tensor_shapes(
        index, {"attention": plan.kv_layers_after, "mlp": plan.mlp_layers_after, "blocks": plan.layers_after}
    )
    element_bytes = precision_record(plan.export.precision).itemsize
    chosen = choose(shapes, measured.errors, budget, index.tied_embeddings, element_bytes)
    final = {name: replace(t, format=chosen[name]) for name, t in quantization.items()}
    run.sections["mixed_precision"] = section(shapes, chosen, measured.errors, budget, index.tied_embeddings,
                                              element_bytes)  # fmt: skip
    run.clock.lap("sensitivity")
    rounded = {linear: final[linear] for linear in linears}
    if any(t.gptq for t in rounded.values()):
        run.calibrated = calibrated_blocks(graph, rounded, tokens, run.progress, device).blocks
    else:
        run.calibrated = rounded_with_energy(graph, rounded, measured.energies, run.progress, device)
    run.clock.lap("calibrated rounding")
    return final


# onnxruntime's CUDA graphs replay one captured graph: no control flow, every node on the GPU.
_CONTROL_FLOW = ("If", "Loop", "Scan")
# genai 0.18's CUDA-graph replays do not carry a short convolution's state (LFM2) from one decode
# step to the next: measured on an H100, tokens part from Hugging Face's at the third; without
# graphs they are Hugging Face's exactly.
_NO_CUDA_GRAPH = ("CausalConvWithState",)


def cuda_provider_options(options, op_counts: dict[str, int]) -> dict[str, str]:
    """genai's CUDA provider options for an output: CUDA graphs unless the recipe turned them off,
    the graph has control flow, which onnxruntime cannot capture, or convolution states, which
    genai's replays do not carry. genai's other constraints (KV buffers shared between past and
    present at the context length, which the CUDA export writes; batch size fixed for a
    generator) hold for every CUDA output."""
    blocked = (*_CONTROL_FLOW, *_NO_CUDA_GRAPH)
    if options.cuda_graphs and not any(op_counts.get(op) for op in blocked):
        return {"enable_cuda_graph": "1"}
    return {}


def _write_genai_config(graph, export, options, tokenizer, folder: str) -> dict:
    """genai_config.json beside the model, so onnxruntime-genai loads the folder as it is."""
    from surgery.export.genai import genai_config, write_genai_config

    try:
        # The CUDA target's outputs ask genai for its CUDA provider; the CPU's for none (CPU).
        providers = [{"cuda": cuda_provider_options(options, export.op_counts)}] if options.target == "cuda" else []
        content = genai_config(
            graph,
            export.context_length,
            options.kv_cache,
            options.position_ids,
            tokenizer,
            providers,
            share_buffer=options.target == "cuda",
        )
    except ValueError as reason:
        return {"written": False, "reason": str(reason)}
    write_genai_config(folder, content)
    written = {"written": True, "config": "genai_config.json", "model_type": content["model"]["type"]}
    if options.target == "cuda":
        written["cuda_graphs"] = bool(providers[0]["cuda"])
    return written

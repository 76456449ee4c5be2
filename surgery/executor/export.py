"""The export step's work: the final graph written as the output folder's model (quantizing
linears as they are written where the weights stream), with its tokenizer, genai_config.json
and the recipe."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from surgery.formats.names import EMBEDDING, HEAD
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
    quantization = plan.quantization()
    # A quantized head or embedding needs the head's weight as an initializer of its own
    # (the quantized embedding then shares it back when both have the same width).
    options = replace(plan.export, untie_head=HEAD in quantization or EMBEDDING in quantization)
    linears = {target: config for target, config in quantization.items() if target != EMBEDDING}
    run.calibrated = _gptq(run, linears)
    if run.calibrated:
        run.clock.lap("gptq")
    if run.stream and linears:
        # Quantized as they are written: no float copy of the model is written or read back.
        assignment = tuple((linear, target.format) for linear, target in linears.items())
        options = replace(options, quantize_linears=assignment, accuracy_level=ACCURACY_LEVELS[options.target])
    run.options = options
    kv = "with" if plan.export.kv_cache else "without"
    quantizing = (
        f", quantizing {len(options.quantize_linears)} linear layer(s) to MatMulNBits as they are written"
        if options.quantize_linears
        else ""
    )
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


def _gptq(run: Run, linears: dict) -> dict:
    """GPTQ blocks for the linears marked `gptq`, calibrated on the recipe's calibration tokens
    (surgery.analysis.calibrated_quantization); empty when none is."""
    settings = {linear: target.format for linear, target in linears.items() if target.gptq}
    if not settings:
        return {}
    from surgery.analysis.calibrated_quantization import calibrated_blocks

    run.progress(f"GPTQ: rounding {len(settings)} linear layer(s) against {run.checked.calibration.describe()}")
    return calibrated_blocks(run.graph, settings, run.calibration_tokens(), run.progress)


def _write_genai_config(graph, export, options, tokenizer, folder: str) -> dict:
    """genai_config.json beside the model, so onnxruntime-genai loads the folder as it is."""
    from surgery.export.genai import genai_config, write_genai_config

    try:
        # The CUDA target's outputs ask genai for its CUDA provider; the CPU's for none (CPU).
        providers = [{"cuda": {}}] if options.target == "cuda" else []
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
    return {"written": True, "config": "genai_config.json", "model_type": content["model"]["type"]}

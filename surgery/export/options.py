"""Export options (what `export onnx ...` asks for); importable without torch or onnx."""

from __future__ import annotations

from dataclasses import dataclass

from surgery.formats.precision import Precision, precision
from surgery.formats.weights import WeightFormat

DEFAULT_OPSET = 21
SUPPORTED_OPSETS = range(17, 24)
TARGETS = ("cpu", "cuda")


def verification_pads_prompts(target: str, quantized_cache: bool = False) -> bool:
    """Whether verification left-pads its prompts for an export of `target`.

    The CUDA form has no padding bias (onnxruntime's CUDA attention takes right padding only),
    so its verification cuts the prompts to one length instead. So does a quantized KV cache:
    it rounds keys after RoPE, and GroupQueryAttention rotates a left-padded row by its padded
    index where PyTorch counts real tokens, which moves the rounding grid (equal in attention
    without rounding: RoPE is relative).
    """
    return target != "cuda" and not quantized_cache


def plan_quantizes_cache(steps) -> bool:
    """Whether a plan's steps quantize any layer's KV cache."""
    return any(step.action == "quantize kv-cache" and step.layers for step in steps)


@dataclass(frozen=True)
class ExportOptions:
    """What `export onnx ...` asked for."""

    opset: int = DEFAULT_OPSET
    kv_cache: bool = True
    # Write a tied head as its own initializer (transposed embedding), so that an ONNX pass can
    # replace its MatMul (quantizing the head must not touch the embedding the Gather reads).
    untie_head: bool = False
    # Rotary positions from an explicit `position_ids` input (RotaryEmbedding nodes before
    # attention) instead of the padded index inside GroupQueryAttention (see export/decoder.py).
    position_ids: bool = False
    # Mixture-of-experts layers: "plain" ONNX ops (every expert on every token, any routing), or
    # onnxruntime's "contrib" com.microsoft.MoE where the routing is its softmax top-k (only the
    # chosen experts run); layers it cannot express stay plain. See docs/moe.md for the timings.
    moe_operator: str = "contrib"
    # The element type of weights, activations, KV cache and logits; every node component reads
    # it (`export onnx precision fp32|fp16|bf16`; the default depends on the target).
    precision: str = "fp32"
    # The execution provider the output is built for (`export onnx for cpu|cuda`): it picks the
    # default precision and the provider options written into genai_config.json.
    target: str = "cpu"
    # A CUDA output asks onnxruntime-genai to capture its decode steps in CUDA graphs
    # (`enable_cuda_graph` in genai_config.json) unless `without cuda-graphs`; never for the CPU.
    cuda_graphs: bool = False
    # Linear layers written quantized as they are exported, each (linear, its WeightFormat): one
    # weight in memory at a time, never a float copy of the model on disk.
    quantize_linears: tuple[tuple[str, WeightFormat], ...] = ()
    # The embedding written as GatherBlockQuantized in this format as it is exported (reading a tied
    # head's tensors when the head is written in the same format), or None: a float Gather.
    quantize_embedding: WeightFormat | None = None
    # MatMulNBits' accuracy_level for those: 4 (int8 activations) on CPU, 0 (float) on CUDA.
    accuracy_level: int = 4

    @property
    def element(self) -> Precision:
        """The record of the element type (`precision` names it)."""
        return precision(self.precision)

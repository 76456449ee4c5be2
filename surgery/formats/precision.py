"""The element type of an export, as one record: every fact about fp32, fp16 and bf16 lives here.

The exporter writes weights, activations, KV cache and logits in it; verification traces PyTorch
in it and compares at its tolerance; `check` refuses it where no provider runs it; the search
counts its bits. Nobody keeps a table of their own: they read the `Precision`.
Norm statistics and softmax run in fp32 inside onnxruntime's fused kernels whatever the type.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Precision:
    """One element type and what follows from it."""

    name: str  # as the recipe spells it: "fp32", "fp16", "bf16"
    bits: int  # stored bits per element
    torch_name: str  # torch.<torch_name>
    numpy_name: str  # numpy's (or ml_dtypes') name of the type
    onnx_type: int  # onnx.TensorProto's enum value
    ort_type: str  # how onnxruntime names a tensor of it ("tensor(float16)")
    # Verification's max |logit difference| against PyTorch computing in the same element type.
    # Measured on SmolLM2-135M: fp16 ONNX against fp16 PyTorch 0.25 (logits up to 34), while
    # fp16 PyTorch itself is 0.24 from fp32; bf16 has 8 fewer mantissa bits.
    tolerance: float
    # Additive bias of padding keys: exp() of it is exactly 0, and it stays finite in the type
    # (fp16 overflows past 65504; an infinite bias would turn a padding row's softmax into NaN).
    mask_value: float
    # The execution providers whose kernels run an export in this type (onnxruntime's CPU
    # kernels have no bf16 MatMul; GroupQueryAttention's CUDA kernels take fp16 and bf16 only,
    # and fp32 through the CPU fallback of the CUDA provider).
    providers: tuple[str, ...]
    # Why the providers left out cannot run it, for the messages that refuse it.
    why_not: str = ""

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return self.bits // 8

    def torch_dtype(self):
        """The torch dtype (imports torch)."""
        import torch

        return getattr(torch, self.torch_name)

    def numpy_dtype(self):
        """The numpy dtype; bf16 through ml_dtypes (numpy has none)."""
        if self.name == "bf16":
            import ml_dtypes

            return ml_dtypes.bfloat16
        import numpy as np

        return np.dtype(self.numpy_name).type

    def runs_on(self, provider: str) -> bool:
        """Whether `provider`'s kernels run an export in this type."""
        return provider in self.providers


FP32 = Precision("fp32", 32, "float32", "float32", 1, "tensor(float)", 1e-3, -1.0e9, ("cpu", "cuda"))
FP16 = Precision("fp16", 16, "float16", "float16", 10, "tensor(float16)", 0.5, -65504.0, ("cpu", "cuda"))
BF16 = Precision("bf16", 16, "bfloat16", "bfloat16", 16, "tensor(bfloat16)", 4.0, -1.0e9, ("cuda",),
                 why_not="onnxruntime's CPU kernels have no bf16 MatMul")

PRECISIONS: dict[str, Precision] = {p.name: p for p in (FP32, FP16, BF16)}
# fp32 on CPU (onnxruntime's CPU kernels are fastest and exact in fp32; int4 via `quantize`);
# fp16 on CUDA (GroupQueryAttention has CUDA kernels for fp16 and bf16 only).
DEFAULT_FOR_TARGET: dict[str, Precision] = {"cpu": FP32, "cuda": FP16}


def precision(name: str) -> Precision:
    """The record of `name` ("fp32", "fp16", "bf16"); KeyError for anything else."""
    return PRECISIONS[name]


def from_ort_type(ort_type: str) -> Precision:
    """The record of an onnxruntime tensor type string (a model input's `.type`)."""
    for record in PRECISIONS.values():
        if record.ort_type == ort_type:
            return record
    raise KeyError(ort_type)

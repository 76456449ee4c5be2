"""Running an exported model in onnxruntime: one forward step, and greedy generation.

Used by `surgery run`, by verification and by the benchmarks, so all three drive the model
the same way: inputs `input_ids`, `attention_mask`, `position_ids`, `past_key_values.*`;
outputs `logits`, `present.*`.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from surgery.console import onnxruntime_log_level
from surgery.diagnostics import HintedError
from surgery.formats.precision import from_ort_type

_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16, without importing onnx here


def float32_of(value: ort.OrtValue) -> np.ndarray:
    """A host onnxruntime tensor as a float32 array, bfloat16 included.

    onnxruntime cannot hand a bfloat16 tensor to numpy (numpy has no such type), so its raw
    16-bit words are copied out and widened: a bfloat16 is the top half of a float32.
    """
    if value.data_type() != "tensor(bfloat16)":
        return value.numpy().astype(np.float32, copy=False)
    if value.device_name().lower() != "cpu":
        raise ValueError("a bfloat16 tensor must be on the host to be read")
    shape = value.shape()
    count = int(np.prod(shape)) if shape else 1
    words = np.ctypeslib.as_array((ctypes.c_uint16 * count).from_address(value.data_ptr())).copy()
    return (words.astype(np.uint32) << 16).view(np.float32).reshape(shape)


PROVIDERS = ("cpu", "cuda")


class ProviderUnavailable(HintedError):
    """The asked execution provider is not in this onnxruntime build."""


def execution_providers(provider: str = "cpu") -> list[str]:
    """onnxruntime's provider list for `--provider cpu|cuda` (CUDA falls back to CPU per node)."""
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ProviderUnavailable(
            "the CUDA execution provider is not available in this onnxruntime",
            "install onnxruntime-gpu (`pip install 'surgery[gpu]'`, in place of onnxruntime) on a machine with an "
            "NVIDIA GPU, or use --provider cpu",
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def session_options(threads: int | None = None, low_memory: bool = False) -> ort.SessionOptions:
    """CPU session options; `threads` defaults to the machine's core count.

    `low_memory` turns off weight prepacking, so the weights stay memory-mapped from the data
    file instead of being copied into packed buffers (for short runs such as verification).
    """
    options = ort.SessionOptions()
    options.log_severity_level = onnxruntime_log_level()
    if low_memory:
        options.add_session_config_entry("session.disable_prepacking", "1")
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


@dataclass
class StepOutput:
    """Logits of one forward call and the KV cache to feed the next one."""

    logits: np.ndarray
    present: list  # onnxruntime OrtValues, to feed back as the next step's past
    fused_layer: np.ndarray | None = None  # dynamic layer fusion: the layer fused per token


class OnnxCausalLM:
    """An exported decoder in an onnxruntime session, with its KV layout read from the inputs."""

    def __init__(
        self,
        model_path: str,
        threads: int | None = None,
        providers: list[str] | None = None,
        low_memory: bool = False,
    ):
        if os.path.isdir(model_path):
            model_path = os.path.join(model_path, "model.onnx")
        # MatMulNBits without its prepacked layout runs far slower (measured: 1.2 s against
        # 0.05 s a decode step on SmolLM2 int4), and its packed weights are small anyway.
        low_memory = low_memory and not _has_quantized_matmul(model_path)
        self.session = ort.InferenceSession(
            model_path,
            sess_options=session_options(threads, low_memory),
            providers=providers or ["CPUExecutionProvider"],
        )
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = set(inputs)
        self.past_names = sorted(
            (n for n in inputs if n.startswith("past_key_values.")),
            key=lambda n: (int(n.split(".")[1]), n.endswith("value")),
        )
        self.kv_slots = len(self.past_names) // 2
        # Short-convolution states (LFM2), `past.<slot>.conv`: fixed (batch, hidden, kernel - 1).
        self.conv_names = sorted((n for n in inputs if n.startswith("past.") and n.endswith(".conv")),
                                 key=lambda n: int(n.split(".")[1]))  # fmt: skip
        self.conv_shapes = [(inputs[name].shape[1], inputs[name].shape[2]) for name in self.conv_names]
        self.conv_types = [inputs[name].type for name in self.conv_names]
        self.state_names = self.past_names + self.conv_names  # what `step` feeds and hands back, in order
        self.uses_cache = bool(self.state_names)
        if self.kv_slots:
            # Per cache input: layers may differ in key/value heads and head size.
            folder = os.path.dirname(model_path)
            self.kv_dims = [_kv_dims(inputs[name].shape, folder) for name in self.past_names]
            self.kv_heads, self.head_dim = self.kv_dims[0]
            # tensor(float), tensor(float16), tensor(bfloat16); a quantized cache's layers
            # (`quantize kv-cache`) hold tensor(int8) or tensor(uint8) codes.
            self.kv_types = [inputs[name].type for name in self.past_names]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_cache(self, batch: int) -> list:
        """Zero-length past keys/values for a first (prefill) step, then zero convolution states."""
        if not self.uses_cache:
            return []
        kv = []
        if self.kv_slots:
            kv = [_empty_past(kind, batch, heads, size)
                  for (heads, size), kind in zip(self.kv_dims, self.kv_types, strict=True)]  # fmt: skip
        return kv + [_zero_state(kind, batch, channels, width)
                     for (channels, width), kind in zip(self.conv_shapes, self.conv_types, strict=True)]  # fmt: skip

    def step(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: list | None = None,
    ) -> StepOutput:
        """One forward call. `past` is ignored by a model exported without a KV cache.

        The KV cache stays in onnxruntime's tensors (`present` holds OrtValues, fed back as they
        are): only the logits are copied out, not the whole cache at every step.
        """
        feed = {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": attention_mask.astype(np.int64),
        }
        # Models from other exporters (onnxruntime-genai's builder) derive positions themselves.
        if "position_ids" in self.input_names:
            feed["position_ids"] = position_ids.astype(np.int64)
        if self.uses_cache:
            past = past if past is not None else self.empty_cache(input_ids.shape[0])
            feed.update(zip(self.state_names, past, strict=True))
        values = {
            name: value if isinstance(value, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(value)
            for name, value in feed.items()
        }
        outputs = self.session.run_with_ort_values(self.output_names, values)
        named = dict(zip(self.output_names, outputs, strict=True))
        present = [named[_present_name(n)] for n in self.state_names]
        fused = named.get("fused_layer")
        # fp16 and bf16 logits are widened here, so every caller (argmax, log-softmax) computes in fp32.
        return StepOutput(
            logits=float32_of(named["logits"]),
            present=present,
            fused_layer=fused.numpy() if fused is not None else None,
        )

    def generate(self, prompt_ids: list[int], max_new_tokens: int, eos_token_ids: set[int],
                 choose: Callable[[np.ndarray], int] | None = None) -> list[int]:  # fmt: skip
        """Decoding for one prompt, greedy unless `choose` picks the token from a position's
        logits (surgery.backend.sampling); returns the new token ids."""
        ids = np.array([prompt_ids], np.int64)
        mask = np.ones_like(ids)
        positions = np.arange(ids.shape[1])[None]
        past = None
        if self.uses_cache:  # a long prompt enters the cache a piece at a time (exact, bounded memory)
            while ids.shape[1] > PREFILL_PIECE:
                start = positions[0, 0]
                piece = slice(0, PREFILL_PIECE)
                past = self.step(ids[:, piece], mask[:, : start + PREFILL_PIECE], positions[:, piece], past).present
                ids, positions = ids[:, PREFILL_PIECE:], positions[:, PREFILL_PIECE:]
        new_tokens: list[int] = []
        for _ in range(max_new_tokens):
            out = self.step(ids, mask, positions, past)
            token = int(out.logits[0, -1].argmax()) if choose is None else choose(out.logits[0, -1])
            new_tokens.append(token)
            if token in eos_token_ids:
                break
            mask = np.concatenate([mask, [[1]]], axis=1)
            if self.uses_cache:
                past = out.present
                ids = np.array([[token]], np.int64)
                positions = positions[:, -1:] + 1
            else:
                ids = np.concatenate([ids, [[token]]], axis=1)
                positions = np.arange(ids.shape[1])[None]
        return new_tokens


# A prompt longer than this enters the KV cache in pieces: attention's transient memory grows
# with new x cached tokens, and a layer whose attention is explicit (a `pre-rope` cache) holds
# every score (a 16k prompt at once: ~13 GB for Qwen2.5-1.5B's 12 heads; 512 at a time: 0.4 GB).
PREFILL_PIECE = 512

_CACHE_CODES = {"tensor(int8)": np.int8, "tensor(uint8)": np.uint8}  # a quantized KV cache's codes


def _empty_past(kind: str, batch: int, heads: int, size: int):
    """One zero-length past tensor of onnxruntime type `kind`."""
    if kind == "tensor(bfloat16)":  # numpy has no bfloat16: an empty onnxruntime tensor
        return ort.OrtValue.ortvalue_from_shape_and_type([batch, heads, 0, size], _BFLOAT16)
    dtype = _CACHE_CODES[kind] if kind in _CACHE_CODES else from_ort_type(kind).numpy_dtype()
    return np.zeros((batch, heads, 0, size), dtype)


def _present_name(past: str) -> str:
    """The output that carries input `past` forward (`past_key_values.0.key` -> `present.0.key`,
    `past.2.conv` -> `present.2.conv`)."""
    prefix = "past_key_values." if past.startswith("past_key_values.") else "past."
    return "present." + past[len(prefix) :]


def _zero_state(kind: str, batch: int, channels: int, width: int):
    """A convolution state before the first token: zeros (the causal padding)."""
    if kind == "tensor(bfloat16)":  # numpy has no bfloat16: zero words, which are bfloat16 zeros
        zeros = np.zeros((batch, channels, width), np.uint16)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(zeros, _BFLOAT16)
    return np.zeros((batch, channels, width), from_ort_type(kind).numpy_dtype())


def _has_quantized_matmul(model_path: str) -> bool:
    """Whether the model's graph holds MatMulNBits nodes (its weights are not read)."""
    import onnx

    graph = onnx.load(model_path, load_external_data=False).graph
    return any(node.op_type == "MatMulNBits" for node in graph.node)


def _kv_dims(shape: list, folder: str) -> tuple[int, int]:
    """(kv_heads, head_dim) of the past tensors: from the graph, else from the folder's config.

    Our exports fix both dimensions; other exporters (onnxruntime-genai) may leave them symbolic.
    """
    if isinstance(shape[1], int) and isinstance(shape[3], int):
        return shape[1], shape[3]
    import json

    genai = os.path.join(folder, "genai_config.json")
    if os.path.exists(genai):
        with open(genai) as handle:
            decoder = json.load(handle)["model"]["decoder"]
        return int(decoder["num_key_value_heads"]), int(decoder["head_size"])
    with open(os.path.join(folder, "config.json")) as handle:
        config = json.load(handle)
    heads = int(config["num_attention_heads"])
    return int(config.get("num_key_value_heads", heads)), int(config.get("head_dim") or config["hidden_size"] // heads)

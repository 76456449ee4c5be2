"""Emit the edited decoder graph as an ONNX model built on onnxruntime's fused operators.

Why not trace: the layers of a decoder share their structure, so the graph of a layer is a
function of its *kind* (attention kept?, MLP kept?, which extras the architecture has) and
its weights. Emitting that structure directly and stamping each layer's weights into it makes
export cost linear in the weights alone (a few seconds, no tracer), and lets every layer use
the fused kernels that make onnxruntime fast on CPU:

- one packed QKV `MatMul` feeding `GroupQueryAttention` (com.microsoft) directly, which splits
  it, applies RoPE, concatenates the KV cache and attends with grouped heads without
  repeat_kv copies;
- `SkipSimplifiedLayerNormalization`: each residual add is fused with the next RMSNorm;
- `MatMul` against pre-transposed weights; SwiGLU as Sigmoid*Mul.

Left padding is honoured: `seqlens_k` is the full padded length for every row and the padding
is an additive `attention_bias`. Rotary positions are the index in the padded sequence
(prompt: 0..S-1, decode: the past length), which GroupQueryAttention derives itself. For a
left-padded row the true positions are that index minus the row's padding, a constant shift,
and RoPE attention depends only on position differences, so the logits are those of the
model fed true positions (verification checks exactly this case). The model therefore has no
`position_ids` input. `export onnx with position-ids` adds one for callers with other
positions (packed sequences, gaps): RoPE is then applied by `RotaryEmbedding` nodes on the
split Q and K before attention, which costs 3-5% of a decode step.
(onnxruntime's GroupQueryAttention refuses batch > 1 with both a past and several new tokens;
prefill and one-token decode, the generation loop's two steps, work at any batch size.)
A dropped attention emits nothing and has no KV input or output; KV slots are numbered
compactly over the kept attention layers. Correctness is not assumed: `surgery.verify`
compares this graph against `DecoderGraph.forward` in PyTorch after every apply.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from onnx import TensorProto

from surgery.export.options import ExportOptions
from surgery.export.writer import GraphWriter
from surgery.models.graph import DecoderGraph, DecoderLayer

MS = "com.microsoft"
MASK_VALUE = -1.0e9  # additive bias of padding keys: exp() of it is exactly 0 in fp32


@dataclass(frozen=True)
class ExportResult:
    """What was written: paths, KV layout, and graph statistics for the report."""

    model_path: str
    data_path: str
    kv_layers: tuple[int, ...]
    parameter_count: int
    op_counts: dict[str, int]
    linears: dict[str, str]  # linear layer ("model.layers.3.mlp.up_proj", "lm_head") -> its MatMul node
    context_length: int = 0  # positions the rotary tables cover: the longest sequence the model takes


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float32).cpu().numpy()


def _t(stacked: torch.Tensor) -> np.ndarray:
    """Stacked (experts, out, in) weights as (experts, in, out) for a batched MatMul."""
    return np.ascontiguousarray(_np(stacked).transpose(0, 2, 1))


def softmax_routed(moe: torch.nn.Module) -> bool:
    """Whether a MoE layer routes as onnxruntime's MoE operator does: softmax, top-k, optional
    renormalization, over dense experts (not a split's unit weights, merged groups or factors)."""
    return not (
        getattr(moe.gate, "unit_weights", False) or hasattr(moe, "group_of") or hasattr(moe.experts, "gate_up_left")
    )


def _linear_weight_t(module: torch.nn.Linear) -> np.ndarray:
    """A Linear's weight as MatMul's right operand: (in_features, out_features)."""
    return _np(module.weight).T


class _Emitter:
    """Walks the layers once, keeping the residual stream and the pending residual update."""

    def __init__(self, graph: DecoderGraph, writer: GraphWriter, options: ExportOptions):
        self.graph, self.w, self.options = graph, writer, options
        self.residual = ""
        self.pending: str | None = None  # a sub-block's output not yet added to the residual
        self.linears: dict[str, str] = {}

    # Residual stream bookkeeping: every norm consumes the pending update (Skip* fuses the add).

    def norm(self, module: torch.nn.Module, name: str, scale: float | None = None, derived: bool = True) -> str:
        """RMSNorm of the residual stream (adding the pending update first, fused).

        `scale` multiplies the gain: layer fusion folds its mixing weights into the final norm's
        gain this way. The scaled copies read for fused layers are `derived` (not parameters).
        """
        if scale is None:
            gamma = self.w.weight(f"{name}.weight", _np(module.weight))
        else:
            gamma = self.w.weight(f"{name}.weight_x{scale:g}", _np(module.weight) * scale, parameter=not derived)
        eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6)))
        if self.pending is None:
            return self.w.op(
                "SimplifiedLayerNormalization", [self.residual, gamma], name, axis=-1, epsilon=eps, stash_type=1
            )
        # Outputs 1 and 2 (mean, inverse std) are for training; left unnamed, they are never computed.
        out, _, _, total = self.w.node(
            "SkipSimplifiedLayerNormalization",
            [self.pending, self.residual, gamma],
            name,
            [f"{name}/output_0", "", "", f"{name}/output_3"],
            MS,
            epsilon=eps,
        )
        self.residual, self.pending = total, None
        return out

    def linear(self, module: torch.nn.Linear, x: str, name: str) -> str:
        self.linears[name] = f"{name}/MatMul"
        y = self.w.op("MatMul", [x, self.w.weight(f"{name}.weight", _linear_weight_t(module))], f"{name}/MatMul")
        if module.bias is not None:
            y = self.w.op("Add", [y, self.w.weight(f"{name}.bias", _np(module.bias))], f"{name}/Add")
        return y

    # Graph inputs and the pieces every attention layer shares.

    def inputs(self) -> None:
        w = self.w
        self.input_ids = w.add_input("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
        self.attention_mask = w.add_input("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])
        if self.options.position_ids:
            self.position_ids = w.add_input("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
        self.kv_layers = self.graph.kv_layers()
        idx = self.graph.index
        kv_shape = ["batch_size", idx.num_kv_heads, "past_sequence_length", idx.head_dim]
        present_shape = ["batch_size", idx.num_kv_heads, "total_sequence_length", idx.head_dim]
        if self.options.kv_cache:
            for slot in range(len(self.kv_layers)):
                for kind in ("key", "value"):
                    w.add_input(f"past_key_values.{slot}.{kind}", TensorProto.FLOAT, kv_shape)
            for slot in range(len(self.kv_layers)):
                for kind in ("key", "value"):
                    w.add_output(f"present.{slot}.{kind}", TensorProto.FLOAT, present_shape)

    def attention_context(self) -> None:
        """seqlens_k, total_sequence_length and the padding bias shared by every attention."""
        w, c = self.w, self.w.constant
        name = "/model/attention_context"
        mask_shape = w.op("Shape", [self.attention_mask], f"{name}/mask_shape")
        batch = w.op("Gather", [mask_shape, c([0])], f"{name}/batch")
        total = w.op("Gather", [mask_shape, c([1])], f"{name}/total")
        self.total_len = w.op("Cast", [total], f"{name}/total_int32", to=TensorProto.INT32)
        # Every row is treated as full length; padding is excluded by the bias instead.
        last = w.op("Sub", [self.total_len, c(1, np.int32)], f"{name}/last")
        self.seqlens_k = w.op("Expand", [last, batch], f"{name}/seqlens_k")
        # Padding bias by lookup (mask 0 -> MASK_VALUE, 1 -> 0), as (batch, 1, query, key):
        # GroupQueryAttention broadcasts over heads but wants every query row.
        bias = w.op("Gather", [c([MASK_VALUE, 0.0], np.float32), self.attention_mask], f"{name}/bias_2d")
        bias = w.op("Unsqueeze", [bias, c([1, 2])], f"{name}/bias_4d")
        seq = w.op("Gather", [w.op("Shape", [self.input_ids], f"{name}/ids_shape"), c([1])], f"{name}/seq")
        target = w.op("Concat", [batch, c([1]), seq, total], f"{name}/bias_shape", axis=0)
        self.bias = w.op("Expand", [bias, target], f"{name}/attention_bias")
        cos, sin = self._rotary_tables()
        self.cos = w.weight("cos_cache", cos, parameter=False)
        self.sin = w.weight("sin_cache", sin, parameter=False)

    def _rotary_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """cos/sin for every position, from the model's own rotary module (its scaling included)."""
        graph = self.graph
        positions = int(graph.config.max_position_embeddings)
        probe = torch.zeros(1, 1, dtype=torch.float32)
        with torch.no_grad():
            cos, sin = graph.rotary(probe, torch.arange(positions)[None])
        half = graph.index.head_dim // 2
        return _np(cos[0, :, :half]), _np(sin[0, :, :half])

    # Sub-blocks.

    def attention(self, layer: DecoderLayer, x: str, slot: int) -> str:
        attn = layer.attention
        name = f"model.layers.{layer.index}.self_attn"
        idx = self.graph.index
        w = self.w
        q_size, kv_size = idx.num_heads * idx.head_dim, idx.num_kv_heads * idx.head_dim
        packed = np.concatenate(
            [_linear_weight_t(attn.q_proj), _linear_weight_t(attn.k_proj), _linear_weight_t(attn.v_proj)], axis=1
        )
        self.linears[f"{name}.qkv_proj"] = f"/{name}/qkv_proj/MatMul"
        qkv = w.op("MatMul", [x, w.weight(f"{name}.qkv_proj.weight", packed)], f"/{name}/qkv_proj/MatMul")
        if attn.q_proj.bias is not None:
            bias = np.concatenate([_np(attn.q_proj.bias), _np(attn.k_proj.bias), _np(attn.v_proj.bias)])
            qkv = w.op("Add", [qkv, w.weight(f"{name}.qkv_proj.bias", bias)], f"/{name}/qkv_proj/Add")
        explicit = self.options.position_ids
        # Qwen3: RMSNorm over each head of Q and K; OLMoE: over the whole Q and K projections.
        norms = getattr(attn, "q_norm", None) is not None
        clip = getattr(attn.config, "clip_qkv", None) if hasattr(attn, "config") else None  # OLMoE
        if norms or explicit or clip is not None:
            q, k, v = w.node("Split", [qkv, w.constant([q_size, kv_size, kv_size])], f"/{name}/qkv_split", 3, axis=-1)
            if norms:
                q = self.head_norm(attn.q_norm, q, f"{name}.q_norm")
                k = self.head_norm(attn.k_norm, k, f"{name}.k_norm")
            if clip is not None:
                bounds = [w.constant(-float(clip), np.float32), w.constant(float(clip), np.float32)]
                q, k, v = (w.op("Clip", [t, *bounds], f"/{name}/clip_{n}") for t, n in ((q, "q"), (k, "k"), (v, "v")))
        else:
            q, k, v = qkv, "", ""  # packed: GroupQueryAttention splits it itself
        if explicit:
            q = self.rotary(q, idx.num_heads, f"/{name}/q_rotary")
            k = self.rotary(k, idx.num_kv_heads, f"/{name}/k_rotary")
        past_k = past_v = ""
        present = [f"/{name}/present_key", f"/{name}/present_value"]
        if self.options.kv_cache:
            past_k, past_v = f"past_key_values.{slot}.key", f"past_key_values.{slot}.value"
            present = [f"present.{slot}.key", f"present.{slot}.value"]
        rotary = [] if explicit else [self.cos, self.sin]
        inputs = [q, k, v, past_k, past_v, self.seqlens_k, self.total_len, *(rotary or ["", ""]), "", self.bias]
        out = w.node(
            "GroupQueryAttention",
            inputs,
            f"/{name}/GroupQueryAttention",
            [f"/{name}/output", *present],
            MS,
            num_heads=idx.num_heads,
            kv_num_heads=idx.num_kv_heads,
            scale=float(attn.scaling),
            # transformers lets query q see key k when q - k < window; this attribute counts alike.
            local_window_size=layer.sliding_window if layer.sliding_window else -1,
            do_rotary=0 if explicit else 1,
            rotary_interleaved=0,
        )[0]
        return self.linear(attn.o_proj, out, f"{name}.o_proj")

    def rotary(self, x: str, heads: int, name: str) -> str:
        return self.w.op(
            "RotaryEmbedding", [x, self.position_ids, self.cos, self.sin], name, MS, interleaved=0, num_heads=heads
        )

    def head_norm(self, module: torch.nn.Module, x: str, name: str) -> str:
        """RMSNorm of a (batch, seq, heads * head_dim) tensor: over each head when its weight has
        head_dim entries (Qwen3), over the whole projection otherwise (OLMoE)."""
        head_dim = self.graph.index.head_dim
        gamma = self.w.weight(f"{name}.weight", _np(module.weight))
        if module.weight.shape[0] != head_dim:
            return self.w.op("SimplifiedLayerNormalization", [x, gamma], f"/{name}/Norm", axis=-1,
                             epsilon=float(module.variance_epsilon), stash_type=1)  # fmt: skip
        split = self.w.op("Reshape", [x, self.w.constant([0, 0, -1, head_dim])], f"/{name}/Reshape")
        normed = self.w.op(
            "SimplifiedLayerNormalization",
            [split, gamma],
            f"/{name}/Norm",
            axis=-1,
            epsilon=float(module.variance_epsilon),
            stash_type=1,
        )
        return self.w.op("Reshape", [normed, self.w.constant([0, 0, -1])], f"/{name}/Merge")

    def mlp(self, layer: DecoderLayer, x: str) -> str:
        if hasattr(layer.mlp, "experts"):
            return self.moe(layer, x)
        return self.swiglu(layer.mlp, x, f"model.layers.{layer.index}.mlp")

    def swiglu(self, mlp: torch.nn.Module, x: str, name: str) -> str:
        """A dense SwiGLU MLP (also a Qwen2-MoE shared expert)."""
        gate = self.linear(mlp.gate_proj, x, f"{name}.gate_proj")
        up = self.linear(mlp.up_proj, x, f"{name}.up_proj")
        act = self.w.op("Mul", [gate, self.w.op("Sigmoid", [gate], f"/{name}/act/Sigmoid")], f"/{name}/act/Mul")
        hidden = self.w.op("Mul", [act, up], f"/{name}/Mul")
        return self.linear(mlp.down_proj, hidden, f"{name}.down_proj")

    def moe(self, layer: DecoderLayer, x: str) -> str:
        """A mixture-of-experts MLP in plain ONNX ops, exact for any routing.

        Router: softmax over the expert logits, top-k, optionally renormalized (Mixtral
        always, Qwen by `norm_topk_prob`); a split MLP (surgery.moe) gives each chosen expert
        weight 1. The chosen weights are scattered into a dense (tokens, experts) matrix, zero
        elsewhere; every expert runs on every token as one batched MatMul over stacked
        weights, and the outputs are summed with those weights, so each token gets exactly
        its top-k experts' mixture.
        """
        moe = layer.mlp
        w = self.w
        name = f"model.layers.{layer.index}.mlp"
        top_k = int(moe.gate.top_k)
        normalize = bool(getattr(moe.gate, "norm_topk_prob", True))  # Mixtral's router always renormalizes
        logits = w.op("MatMul", [x, w.weight(f"{name}.gate.weight", _np(moe.gate.weight).T)], f"/{name}/router/MatMul")
        if self.options.moe_operator == "contrib" and softmax_routed(moe):
            mixed = self.contrib_moe(moe, x, logits, top_k, normalize, name)
        else:
            mixed = self.plain_moe(moe, x, logits, top_k, normalize, name)
        shared = getattr(moe, "shared_expert", None)
        if shared is not None:  # Qwen2-MoE: sigmoid(gate(x)) * shared_expert(x), added
            shared_out = self.swiglu(shared, x, f"{name}.shared_expert")
            gate_w = w.weight(f"{name}.shared_expert_gate.weight", _np(moe.shared_expert_gate.weight).T)
            scale = w.op(
                "Sigmoid", [w.op("MatMul", [x, gate_w], f"/{name}/shared_gate/MatMul")], f"/{name}/shared_gate"
            )
            mixed = w.op("Add", [mixed, w.op("Mul", [shared_out, scale], f"/{name}/shared/Mul")], f"/{name}/shared/Add")
        return mixed

    def contrib_moe(self, moe: torch.nn.Module, x: str, logits: str, top_k: int, normalize: bool, name: str) -> str:
        """onnxruntime's com.microsoft.MoE: softmax, top-k, (renormalize), and only the chosen
        experts' SwiGLU per token. Its CPU kernel wants gate and up rows interleaved."""
        w, c = self.w, self.w.constant
        gate_up = _np(moe.experts.gate_up_proj)  # (experts, 2I, hidden): gate rows then up rows
        experts, two_inter, hidden = gate_up.shape
        pairs = gate_up.reshape(experts, 2, two_inter // 2, hidden).transpose(0, 2, 1, 3)  # (e, I, gate|up, h)
        interleaved = np.ascontiguousarray(pairs.reshape(experts, two_inter, hidden))
        rows = w.op("Reshape", [x, c([-1, hidden])], f"/{name}/moe/rows")
        router = w.op("Reshape", [logits, c([-1, experts])], f"/{name}/moe/router_rows")
        inputs = [rows, router, w.weight(f"{name}.experts.gate_up_interleaved", interleaved), "",
                  w.weight(f"{name}.experts.down_proj", _np(moe.experts.down_proj))]  # fmt: skip
        out = w.op("MoE", inputs, f"/{name}/moe/MoE", domain="com.microsoft", k=top_k,
                   activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=int(normalize))  # fmt: skip
        return w.op("Reshape", [out, w.op("Shape", [x], f"/{name}/moe/shape")], f"/{name}/moe/out")

    def plain_moe(self, moe: torch.nn.Module, x: str, logits: str, top_k: int, normalize: bool, name: str) -> str:
        """Dense routing weights and every expert on every token (see `moe`)."""
        w, c = self.w, self.w.constant
        experts = moe.experts
        unit = getattr(moe.gate, "unit_weights", False)  # a split MLP: each chosen expert counts once
        # A split's router ranks raw scores, as PyTorch does; a softmax first could round two
        # close scores to one probability and break the tie differently.
        probs = logits if unit else w.op("Softmax", [logits], f"/{name}/router/Softmax", axis=-1)
        top, index = w.node("TopK", [probs, c([top_k])], f"/{name}/router/TopK", 2, axis=-1)
        if unit:
            top = w.op("Add", [w.op("Mul", [top, c(0.0, np.float32)], f"/{name}/router/zero"), c(1.0, np.float32)],
                       f"/{name}/router/ones")  # fmt: skip
        elif normalize:
            total = w.op("ReduceSum", [top, c([-1])], f"/{name}/router/sum", keepdims=1)
            top = w.op("Div", [top, total], f"/{name}/router/normalize")
        zeros = w.op("Mul", [probs, c(0.0, np.float32)], f"/{name}/router/zeros")
        if hasattr(moe, "group_of"):
            # Merged experts: each chosen original expert maps to its group; weights on one group add up.
            groups = int(moe.experts.gate_up_proj.shape[0])
            index = w.op("Gather", [c(moe.group_of.tolist()), index], f"/{name}/router/group_of")
            zeros = w.op("Slice", [zeros, c([0]), c([groups]), c([-1])], f"/{name}/router/group_zeros")
            dense = w.op("ScatterElements", [zeros, index, top], f"/{name}/router/weights", axis=-1, reduction="add")
        else:
            dense = w.op("ScatterElements", [zeros, index, top], f"/{name}/router/weights", axis=-1)
        # (batch, seq, hidden) -> (batch, 1, seq, hidden) against (experts, hidden, 2I).
        xs = w.op("Unsqueeze", [x, c([1])], f"/{name}/experts/x")
        hidden = self.batched_experts_matmul(experts, "gate_up", xs, name)  # (batch, experts, seq, 2I)
        inter = int(experts.gate_up_proj.shape[1]) // 2
        gate, up = w.node("Split", [hidden, c([inter, inter])], f"/{name}/experts/split", 2, axis=-1)
        act = w.op("Mul", [gate, w.op("Sigmoid", [gate], f"/{name}/experts/Sigmoid")], f"/{name}/experts/silu")
        out = self.batched_experts_matmul(experts, "down", w.op("Mul", [act, up], f"/{name}/experts/Mul"), name)
        # weights (batch, seq, experts) -> (batch, experts, seq, 1)
        weights = w.op("Unsqueeze", [w.op("Transpose", [dense], f"/{name}/router/T", perm=[0, 2, 1]), c([3])],
                       f"/{name}/router/weights4")  # fmt: skip
        return w.op("ReduceSum", [w.op("Mul", [out, weights], f"/{name}/experts/weighted"), c([1])],
                    f"/{name}/experts/sum", keepdims=0)  # fmt: skip

    # The whole model.

    def batched_experts_matmul(self, experts: torch.nn.Module, which: str, x: str, name: str) -> str:
        """x (batch, experts, seq, in) times each expert's `which` weight (gate_up or down), transposed.

        Experts merged to a rank (LowRankExperts) are written as their two factors, two MatMuls.
        """
        w = self.w
        if hasattr(experts, f"{which}_left"):
            right = getattr(experts, f"{which}_right")  # (experts, r, in)
            left = getattr(experts, f"{which}_left")  # (experts, out, r)
            narrow = w.op("MatMul", [x, w.weight(f"{name}.experts.{which}_right", _t(right))],
                          f"/{name}/experts/{which}_right")  # fmt: skip
            return w.op("MatMul", [narrow, w.weight(f"{name}.experts.{which}_left", _t(left))],
                        f"/{name}/experts/{which}_left")  # fmt: skip
        weight = getattr(experts, f"{which}_proj")
        return w.op("MatMul", [x, w.weight(f"{name}.experts.{which}_proj", _t(weight))], f"/{name}/experts/{which}")

    def emit(self) -> None:
        graph, w = self.graph, self.w
        self.inputs()
        if self.kv_layers:
            self.attention_context()
        embed = w.weight("model.embed_tokens.weight", _np(graph.embed.weight))
        self.residual = w.op("Gather", [embed, self.input_ids], "/model/embed_tokens/Gather")
        slot = 0
        fusion = graph.fusion if graph.fusion is not None and graph.fusion.weight > 0 else None
        fused = set(fusion.layers) if fusion else set()
        readouts: dict[int, tuple[str | None, str]] = {}  # layer -> FinalNorm(m), FinalNorm(h)
        for layer in graph.layers:
            prefix = f"model.layers.{layer.index}"
            if layer.attention is not None:
                x = self.norm(layer.input_norm, f"{prefix}.input_layernorm")
                self.pending = self.attention(layer, x, slot)
                slot += 1
            pre = None
            if layer.mlp is not None:
                x = self.norm(layer.post_norm, f"{prefix}.post_attention_layernorm")
                if layer.index in fused and fusion.dynamic:
                    pre = self.norm(graph.final_norm, f"/lm_head/fusion/layer{layer.index}_pre_mlp_norm", scale=1.0)
                self.pending = self.mlp(layer, x)
            if layer.index in fused:
                # Static: the mixing weight folds into the gain, so the head reads a plain sum.
                scale = 1.0 if fusion.dynamic else fusion.weight
                readouts[layer.index] = (
                    pre,
                    self.norm(graph.final_norm, f"/lm_head/fusion/layer{layer.index}_norm", scale),
                )
        if fusion is None:
            x = self.norm(graph.final_norm, "model.norm")
        else:
            x = self.norm(graph.final_norm, "model.norm", scale=1 - fusion.weight, derived=False)
        if graph.tied_head and not self.options.untie_head:
            # Stored once; onnxruntime folds the transpose of a constant when the session loads.
            head = w.op("Transpose", [embed], "/lm_head/Transpose", perm=[1, 0])
        else:
            # A tied head written separately is the same parameters again: not counted twice.
            head = w.weight("lm_head.weight", _linear_weight_t(graph.lm_head), parameter=not graph.tied_head)
        self.linears["lm_head"] = "/lm_head/MatMul"
        vocab = graph.index.vocab_size
        if fusion is None:
            w.node("MatMul", [x, head], "/lm_head/MatMul", ["logits"])
        elif not fusion.dynamic:
            mixed = w.op("Add", [x, readouts[fusion.layers[0]][1]], "/lm_head/fusion/Add")
            w.node("MatMul", [mixed, head], "/lm_head/MatMul", ["logits"])
        else:
            self.dynamic_fusion(x, head, [readouts[layer] for layer in fusion.layers], fusion)
        w.add_output("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", vocab])
        if fusion is not None and fusion.dynamic:
            w.add_output("fused_layer", TensorProto.INT64, ["batch_size", "sequence_length"])

    def dynamic_fusion(self, final: str, head: str, readouts: list[tuple[str, str]], fusion) -> None:
        """Per token: IKS of every candidate, argmin, and that candidate's readout mixed in.

        All readouts go through the head in one MatMul over a stacked axis, so a decode step
        reads the vocabulary projection once however many candidates there are. The IKS
        compared is `sum p log p + q log q - (p+q) log(p+q)`, which is 2 JSD(p||q) - 2 log 2:
        the same argmin with fewer operations. `final` already carries the weight 1 - a.
        """
        w, c = self.w, self.w.constant
        name = "/lm_head/fusion"
        k = len(readouts)
        rows = [final] + [h for _, h in readouts] + [m for m, _ in readouts]
        stacked = w.op("Concat", [w.op("Unsqueeze", [r, c([2])], f"{name}/stack{i}") for i, r in enumerate(rows)],
                       f"{name}/stack", axis=2)  # fmt: skip
        logits = w.op("MatMul", [stacked, head], "/lm_head/MatMul")  # (batch, seq, 1 + 2k, vocab)
        last, post, pre = w.node("Split", [logits, c([1, k, k])], f"{name}/split", 3, axis=2)
        log_q = w.op("LogSoftmax", [post], f"{name}/log_post", axis=-1)
        log_p = w.op("LogSoftmax", [pre], f"{name}/log_pre", axis=-1)
        p = w.op("Exp", [log_p], f"{name}/p")
        q = w.op("Exp", [log_q], f"{name}/q")
        both = w.op("Add", [p, q], f"{name}/p_plus_q")
        # Where both probabilities underflow, (p+q) log(p+q) is 0: clamp so 0 * log(0) is not NaN.
        log_both = w.op("Log", [w.op("Max", [both, c(1e-30, np.float32)], f"{name}/clamp")], f"{name}/log_p_plus_q")
        own = w.op("Add", [w.op("Mul", [p, log_p], f"{name}/p_log_p"), w.op("Mul", [q, log_q], f"{name}/q_log_q")],
                   f"{name}/own")  # fmt: skip
        divergence = w.op("Sub", [own, w.op("Mul", [both, log_both], f"{name}/mix")], f"{name}/divergence")
        iks = w.op("ReduceSum", [divergence, c([-1])], f"{name}/iks", keepdims=0)  # (batch, seq, k)
        pick = w.op("ArgMin", [iks], f"{name}/argmin", axis=-1, keepdims=1)  # (batch, seq, 1)
        pick4 = w.op("Unsqueeze", [pick, c([3])], f"{name}/pick4")
        index = w.op("Expand", [pick4, c([1, 1, 1, self.graph.index.vocab_size])], f"{name}/pick_expand")
        chosen = w.op("GatherElements", [post, index], f"{name}/chosen", axis=2)
        weighted = w.op("Mul", [chosen, c(fusion.weight, np.float32)], f"{name}/weighted")
        mixed = w.op("Add", [last, weighted], f"{name}/Add")
        w.node("Squeeze", [mixed, c([2])], f"{name}/logits", ["logits"])
        layers = c(list(fusion.layers))
        w.node("Gather", [layers, w.op("Squeeze", [pick, c([2])], f"{name}/pick2")], f"{name}/layer", ["fused_layer"])


def export_decoder(graph: DecoderGraph, folder: str, options: ExportOptions | None = None) -> ExportResult:
    """Write `model.onnx` and `model.onnx.data` for the graph into `folder`."""
    options = options or ExportOptions()
    model_path = os.path.join(folder, "model.onnx")
    writer = GraphWriter(os.path.join(folder, "model.onnx.data"))
    try:
        emitter = _Emitter(graph, writer, options)
        emitter.emit()
    except BaseException:
        writer.close()
        raise
    kv_layers = tuple(graph.kv_layers())
    metadata = {
        "surgery.kv_layers": json.dumps(list(kv_layers)),
        "surgery.layers": json.dumps([layer.index for layer in graph.layers]),
        "surgery.kv_cache": json.dumps(options.kv_cache),
    }
    writer.save(model_path, options.opset, metadata, graph_name=graph.index.name)
    return ExportResult(
        model_path=model_path,
        data_path=writer.data_path,
        kv_layers=kv_layers,
        parameter_count=writer.parameter_count,
        op_counts=dict(Counter(node.op_type for node in writer.nodes)),
        linears=dict(emitter.linears),
        context_length=int(graph.config.max_position_embeddings),
    )

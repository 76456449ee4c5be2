"""Write a random-weight model of Llama-3.1-8B's shape as bf16 safetensors shards, tensor by tensor.

    python benchmarks/random_llama.py /tmp/llama-8b-shape            # 32 layers, 16 GB
    python benchmarks/random_llama.py /tmp/small --layers 4          # same widths, fewer layers

The folder is a Hugging Face checkpoint (config.json, sharded safetensors with their index,
and SmolLM2's tokenizer, whose ids all lie inside Llama 3's vocabulary). Each tensor is drawn
a block of rows at a time and written as it is drawn: the script holds about 64 MB whatever
the model's size, so the model can be far larger than memory. Weights are N(0, 0.02), norms 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import time
from pathlib import Path

import torch

LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 32,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}
SHARD_BYTES = 5 << 30  # Hugging Face's default shard size
BLOCK_BYTES = 64 << 20


def tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every parameter of the Llama checkpoint in file order, with its shape."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    shapes = [("model.embed_tokens.weight", (config["vocab_size"], hidden))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.self_attn.q_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.k_proj.weight", (kv, hidden)),
            (f"{p}.self_attn.v_proj.weight", (kv, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
            (f"{p}.mlp.gate_proj.weight", (inter, hidden)),
            (f"{p}.mlp.up_proj.weight", (inter, hidden)),
            (f"{p}.mlp.down_proj.weight", (hidden, inter)),
        ]
    return shapes + [("model.norm.weight", (hidden,)), ("lm_head.weight", (config["vocab_size"], hidden))]


def shards(shapes: list[tuple[str, tuple[int, ...]]]) -> list[list[tuple[str, tuple[int, ...]]]]:
    """The tensors split into consecutive shards of at most SHARD_BYTES (bf16)."""
    out: list[list] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 2 * torch.Size(shape).numel()
        if out[-1] and size + nbytes > SHARD_BYTES:
            out.append([])
            size = 0
        out[-1].append((name, shape))
        size += nbytes
    return out


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], generator: torch.Generator) -> None:
    """One safetensors file: its header (every offset is known from the shapes), then each
    tensor's bytes as they are drawn."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = 2 * torch.Size(shape).numel()
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for _, shape in tensors:
            if len(shape) == 1:  # a norm's gain
                handle.write(torch.ones(shape, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes())
                continue
            rows = max(1, BLOCK_BYTES // (2 * shape[1]))
            for start in range(0, shape[0], rows):
                block = torch.randn((min(rows, shape[0] - start), shape[1]), generator=generator) * 0.02
                handle.write(memoryview(block.to(torch.bfloat16).view(torch.uint8).numpy()))


def write_model(folder: Path, layers: int | None = None, seed: int = 0) -> dict:
    """The random checkpoint in `folder`; returns what was written."""
    from surgery.models.builtin import smollm2_folder

    config = dict(LLAMA_3_1_8B)
    if layers is not None:
        config["num_hidden_layers"] = layers
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer = smollm2_folder(progress=lambda *_: None)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer / name, folder / name)
    generator = torch.Generator().manual_seed(seed)
    parts = shards(tensor_shapes(config))
    weight_map = {}
    started = time.perf_counter()
    for i, tensors in enumerate(parts, 1):
        name = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        write_shard(folder / name, tensors, generator)
        weight_map.update({tensor: name for tensor, _ in tensors})
    total = sum(2 * torch.Size(shape).numel() for _, shape in tensor_shapes(config))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"folder": str(folder), "bytes": total, "shards": len(parts), "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--layers", type=int, default=None, help="layers (default: 32, as Llama-3.1-8B)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    written = write_model(args.folder, args.layers, args.seed)
    print(f"wrote {written['bytes'] / 1e9:.2f} GB in {written['shards']} shard(s) to {written['folder']} "
          f"in {written['seconds']:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()

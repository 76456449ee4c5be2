"""The families added for issue 29 on the GPU: each tiny model, and a random model of
DeepSeek-V2-Lite's shape (multi-head latent attention with a 576-wide cache head, 2 layers), through
`surgery apply --provider cuda` of `export onnx for cuda` (fp16, the CUDA graph form), verified on
the CUDA provider against PyTorch in fp16. Prints a table and writes JSON.

    python benchmarks/families_cuda.py [--work DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # noqa: E402
sys.path.insert(0, str(REPO / "benchmarks"))

from common import write_result  # noqa: E402

MODELS = ("tiny-gemma", "tiny-glm", "tiny-glm4", "tiny-ernie4_5", "tiny-nemotron", "tiny-hunyuan", "tiny-gpt-oss",
          "tiny-deepseek-v2", "tiny-deepseek-v2-moe", "tiny-phimoe", "tiny-gemma2", "tiny-phi4-mini", "tiny-smollm3",
          "tiny-olmo", "tiny-lfm2", "tiny-lfm2-moe")  # fmt: skip


def deepseek_v2_lite_shape(folder: Path) -> None:
    """A seeded random model of DeepSeek-V2-Lite's attention and MoE shape, 2 layers, tiny vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM, DeepseekV2Config

    from surgery.models import builtin

    config = DeepseekV2Config(
        vocab_size=259, hidden_size=2048, num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=16,
        kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, head_dim=64,
        intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=64, num_experts_per_tok=6,
        n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=1.0, norm_topk_prob=False,
        topk_method="greedy", max_position_embeddings=4096,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                         "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 0.707, "mscale_all_dim": 0.707},
        bos_token_id=256, eos_token_id=257, pad_token_id=258,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    builtin.byte_tokenizer().save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--json", default=str(REPO / "bench-results" / "families-cuda.json"))
    parser.add_argument("--only", nargs="+", default=None, help="these models only (default: all and V2-Lite's shape)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="families-cuda-"))
    work.mkdir(parents=True, exist_ok=True)
    lite = work / "deepseek-v2-lite-shape"
    models = args.only or (*MODELS, str(lite))
    if str(lite) in models and not (lite / "config.json").exists():
        deepseek_v2_lite_shape(lite)
    rows = {}
    header = f"{'model':28} {'exit':>4} {'passed':>6} {'max |diff|':>10} {'tolerance':>9} {'KL fp32':>8} {'top-1':>6}"
    print(header + "  error")
    for model in models:
        name = Path(model).name
        recipe = work / f"{name}.surg"
        recipe.write_text(f'model "{model}"\nexport onnx for cuda\n')
        out = work / f"{name}-out"
        done = subprocess.run([sys.executable, "-m", "surgery", "apply", str(recipe), "-o", str(out), "--provider",
                               "cuda", "--force"], capture_output=True, text=True)  # fmt: skip
        report = json.loads((out / "surgery.json").read_text()) if (out / "surgery.json").exists() else {}
        verification = report.get("verification", {})
        rows[name] = {"exit": done.returncode, "passed": verification.get("passed"),
                      "max_abs_logit_diff": verification.get("max_abs_logit_diff"),
                      "tolerance": verification.get("tolerance"), "fp32_kl": verification.get("fp32_kl"),
                      "fp32_top1": verification.get("fp32_top1"),
                      "error": done.stderr.strip().splitlines()[-1] if done.returncode else ""}  # fmt: skip
        r = rows[name]
        diff = f"{r['max_abs_logit_diff']:.2e}" if r["max_abs_logit_diff"] is not None else "-"
        kl = f"{r['fp32_kl']:.1e}" if r["fp32_kl"] is not None else "-"
        top1 = f"{r['fp32_top1']:.3f}" if r["fp32_top1"] is not None else "-"
        print(f"{name:28} {r['exit']:4d} {str(r['passed']):>6} {diff:>10} {str(r['tolerance']):>9} {kl:>8} {top1:>6}  "
              f"{r['error'][:80]}", flush=True)  # fmt: skip
    write_result(args.json, {"what": __doc__.splitlines()[0], "rows": rows})


if __name__ == "__main__":
    main()

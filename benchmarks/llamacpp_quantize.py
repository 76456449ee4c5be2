"""llama.cpp's Q4_K_M of a Hugging Face folder, for the int4 quality table: convert, quantize
(timed, peak memory), and llama.cpp's own perplexity of both.

llama.cpp is not a dependency: build its tools from the source in the llama-cpp-python sdist
(`pip download llama-cpp-python --no-deps --no-binary :all:`, then in vendor/llama.cpp `cmake -B
build -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF && cmake
--build build --target llama-quantize llama-perplexity llama-imatrix`) and pass that folder.

Steps:
1. `convert_hf_to_gguf.py --outtype f16` (its own gguf-py; needs sentencepiece installed): the
   base every quantization starts from;
2. with `--imatrix`, `llama-imatrix` on WikiText-2 valid (`--imatrix-chunks` chunks of 512);
3. `llama-quantize` to `--type` (default Q4_K_M), timed in a fresh process with its peak memory;
4. `llama-perplexity` of the f16 base and the quantized file on WikiText-2 test (`--chunks` chunks
   of 512 tokens; llama.cpp scores the second half of each chunk), so the increase is also known
   under llama.cpp's own protocol.

The quantized file then goes to `bench_int4_quality.py --gguf-rows "llama.cpp Q4_K_M=FILE"`,
which scores it by the table's protocol (our export of its dequantized weights).

    python benchmarks/llamacpp_quantize.py --llama-cpp DIR --model HF_FOLDER --out DIR [--imatrix]
        [--type Q4_K_M] [--chunks 32] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from common import measure, write_result  # noqa: E402

DATA = REPO / "surgery" / "data"


def perplexity(tools: Path, model: Path, chunks: int, threads: int) -> float:
    """llama-perplexity's final estimate on WikiText-2 test, `chunks` chunks of 512 tokens."""
    out = subprocess.run([str(tools / "llama-perplexity"), "-m", str(model), "-f", str(DATA / "wikitext-2-test.txt"),
                          "-c", "512", "--chunks", str(chunks), "-t", str(threads)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    if found is None:
        raise SystemExit(f"llama-perplexity printed no estimate for {model}")
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", type=Path, required=True,
                        help="llama.cpp's source folder, its tools built in build/bin")  # fmt: skip
    parser.add_argument("--model", type=Path, required=True, help="the Hugging Face folder (safetensors)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--type", default="Q4_K_M")
    parser.add_argument("--imatrix", action="store_true", help="weigh the rounding by an importance matrix")
    parser.add_argument("--imatrix-chunks", type=int, default=32)
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", default=str(REPO / "bench-results" / "llamacpp-quantize.json"))
    args = parser.parse_args()
    tools = args.llama_cpp / "build" / "bin"
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / "f16.gguf"
    if not base.exists():
        env = {**os.environ, "PYTHONPATH": str(args.llama_cpp / "gguf-py")}
        subprocess.run([sys.executable, str(args.llama_cpp / "convert_hf_to_gguf.py"), str(args.model),
                        "--outtype", "f16", "--outfile", str(base)], check=True, env=env)  # fmt: skip
    result: dict = {"model": str(args.model), "type": args.type, "threads": args.threads}
    command = [str(tools / "llama-quantize")]
    if args.imatrix:
        matrix = args.out / "imatrix.gguf"
        result["imatrix"] = measure([str(tools / "llama-imatrix"), "-m", str(base), "-f",
                                     str(DATA / "wikitext-2-valid.txt"), "-o", str(matrix), "-c", "512",
                                     "--chunks", str(args.imatrix_chunks), "-t", str(args.threads)])  # fmt: skip
        command += ["--imatrix", str(matrix)]
    quantized = args.out / f"{args.type.lower()}{'-imatrix' if args.imatrix else ''}.gguf"
    result["quantize"] = measure([*command, str(base), str(quantized), args.type, str(args.threads)])
    result["file"] = str(quantized)
    result["mb"] = round(quantized.stat().st_size / 1e6, 1)
    result["llamacpp_perplexity"] = {"chunks": args.chunks, "f16": perplexity(tools, base, args.chunks, args.threads),
                                     args.type: perplexity(tools, quantized, args.chunks, args.threads)}  # fmt: skip
    ppl = result["llamacpp_perplexity"]
    ppl["increase"] = round(ppl[args.type] / ppl["f16"] - 1, 4)
    print(f"{args.type}{' with imatrix' if args.imatrix else ''}: {result['mb']} MB, quantized in "
          f"{result['quantize']['seconds']} s (peak {result['quantize']['peak_gb']} GB); llama-perplexity "
          f"f16 {ppl['f16']}, {args.type} {ppl[args.type]} ({ppl['increase']:+.2%})")  # fmt: skip
    write_result(args.json, result)


if __name__ == "__main__":
    main()

"""onnxruntime-genai loads what we write and generates what `surgery run` generates.

Every family's tiny model, unedited and after each structural edit, exported with its
genai_config.json: genai's greedy tokens (its own KV cache and loop) equal
our runtime's. Batches too. SmolLM2's examples are checked the same way in tests/test_smollm2.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
import pytest

from conftest import attention_layers, tiny_graph
from surgery.backend.runtime import OnnxCausalLM
from surgery.export.decoder import export_decoder
from surgery.export.genai import GENAI_MODEL_TYPES, genai_config, write_genai_config
from surgery.export.options import ExportOptions
from surgery.models import builtin
from surgery.passes import DropAttention, DropBlock, DropMlp, run_pass

EDITS = {"none": None, "drop attention": DropAttention, "drop mlp": DropMlp, "drop block": DropBlock}
PROMPTS = ([5, 17, 42, 99, 3, 64, 8, 120, 77, 31], [9, 200, 14, 61])


def genai_greedy(folder: str, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy continuations of a batch of prompts through onnxruntime-genai."""
    model = og.Model(folder)
    params = og.GeneratorParams(model)
    length = max(map(len, prompts)) + new_tokens
    params.set_search_options(max_length=length, do_sample=False, batch_size=len(prompts))
    generator = og.Generator(model, params)
    width = len(prompts[0])
    generator.append_tokens(np.array(prompts, np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [generator.get_sequence(row)[width:].tolist() for row in range(len(prompts))]


def our_greedy(folder: str, prompt: list[int], new_tokens: int) -> list[int]:
    """`surgery run`'s greedy loop, stopping at end-of-text like genai (which leaves that token out)."""
    eos = json.loads(Path(folder, "genai_config.json").read_text())["model"]["eos_token_id"]
    eos = set(eos if isinstance(eos, list) else [eos])
    tokens = OnnxCausalLM(folder, threads=1).generate(list(prompt), new_tokens, eos)
    return tokens[:-1] if tokens and tokens[-1] in eos else tokens


def export_with_config(graph, folder, options: ExportOptions | None = None):
    options = options or ExportOptions()
    result = export_decoder(graph, str(folder), options)
    content = genai_config(graph, result.context_length, options.kv_cache, options.position_ids)
    write_genai_config(str(folder), content)
    return content


@pytest.mark.parametrize("name", tuple(builtin.TINY_MODELS))
@pytest.mark.parametrize("edit", EDITS)
def test_genai_generates_our_tokens(name, edit, tmp_path):
    graph = tiny_graph(name)
    if EDITS[edit] is not None:
        layers = attention_layers(name, (1, 2)) if edit == "drop attention" else (1, 2)
        run_pass(EDITS[edit](layers=layers), graph)
    content = export_with_config(graph, tmp_path)
    # genai's layers are the cache's slots: KV slots, then convolution states (LFM2).
    assert content["model"]["decoder"]["num_hidden_layers"] == len(graph.kv_layers()) + len(graph.conv_layers())
    assert genai_greedy(str(tmp_path), [PROMPTS[0]], 8) == [our_greedy(str(tmp_path), PROMPTS[0], 8)]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_genai_batches_like_single_runs(name, tmp_path):
    # genai's Python API takes a batch as equal-length rows (it does not mask pad tokens), so
    # the rows are two different prompts of one length; each must come out as when run alone.
    graph = tiny_graph(name)
    export_with_config(graph, tmp_path)
    prompts = [PROMPTS[0], PROMPTS[0][::-1]]
    single = [our_greedy(str(tmp_path), p, 6) for p in prompts]
    assert genai_greedy(str(tmp_path), prompts, 6) == single


def test_position_ids_are_named_when_exported(tmp_path):
    graph = tiny_graph("tiny-llama")
    content = export_with_config(graph, tmp_path, ExportOptions(position_ids=True))
    assert content["model"]["decoder"]["inputs"]["position_ids"] == "position_ids"
    assert genai_greedy(str(tmp_path), [PROMPTS[0]], 6) == [our_greedy(str(tmp_path), PROMPTS[0], 6)]


def test_no_config_without_a_kv_cache():
    graph = tiny_graph("tiny-llama")
    with pytest.raises(ValueError, match="without kv-cache"):
        genai_config(graph, 64, kv_cache=False, position_ids=False)


def test_model_types_are_genai_names_or_the_generic_decoder():
    for name in builtin.TINY_MODELS:
        graph = tiny_graph(name)
        content = genai_config(graph, 64, kv_cache=True, position_ids=False)
        assert content["model"]["type"] == GENAI_MODEL_TYPES.get(graph.index.architecture, "llama")


def test_genai_runs_a_quantized_output_with_its_embedding_quantized(tmp_path):
    from conftest import run_cli

    recipe = tmp_path / "q.surg"
    recipe.write_text(
        'model "tiny-qwen2"\nquantize layers to int4\nquantize head to int4\nquantize embedding to int4\n'
    )
    assert run_cli("apply", str(recipe), "-o", str(tmp_path / "out")).code == 0
    folder = str(tmp_path / "out")
    assert genai_greedy(folder, [PROMPTS[0]], 8) == [our_greedy(folder, PROMPTS[0], 8)]

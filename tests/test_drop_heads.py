"""`drop heads`: the statement (syntax, check, plan) and its pass against an independent statement
of what it means, then end to end through `apply` and onnxruntime-genai."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY, run_cli, tiny_graph, write
from surgery.diagnostics import RecipeError
from surgery.front.check import check
from surgery.front.parser import parse
from surgery.front.planner import build_plan
from surgery.front.syntax import unparse
from surgery.ir.inputs import position_ids_from_mask
from surgery.passes import PassContractError, run_pass
from surgery.passes.drop_heads import DropHeads

PROMPT_IDS = torch.tensor(
    [[258, 258, 72, 101, 108, 108, 111, 44, 32, 119], [84, 104, 101, 32, 113, 117, 105, 99, 107, 32]]
)
MASK = (PROMPT_IDS != 258).long()


def _one_per_group(graph, layer: int) -> tuple[int, ...]:
    """The first query head of every key/value head (a droppable, balanced choice)."""
    attention = graph.layer(layer).attention
    group = attention.num_heads // attention.num_kv_heads
    return tuple(kv * group for kv in range(attention.num_kv_heads))


def _heads_silenced(graph, layers: tuple[int, ...], heads: tuple[int, ...]) -> torch.Tensor:
    """The comparison: the Hugging Face model with those heads' outputs zeroed before o_proj."""
    model = graph.model
    size = graph.index.head_dim
    handles = []

    def silence(module, args):
        (x,) = args
        x = x.clone()
        for head in heads:
            x[..., head * size : (head + 1) * size] = 0
        return (x,)

    for index in layers:
        output = graph.architecture.attention.o  # the output projection's name (LFM2: out_proj)
        handles.append(getattr(model.model.layers[index].self_attn, output).register_forward_pre_hook(silence))
    try:
        with torch.no_grad():
            return model(input_ids=PROMPT_IDS, attention_mask=MASK, position_ids=position_ids_from_mask(MASK)).logits
    finally:
        for handle in handles:
            handle.remove()


# Every dense family whose heads can be dropped (not OLMo 2's whole-projection Q norm, not latent attention).
@pytest.mark.parametrize("arch", [name for name in TINY if name not in ("tiny-olmo2", "tiny-deepseek-v2")])
def test_dropping_heads_equals_silencing_them_in_the_hugging_face_model(arch):
    graph = tiny_graph(arch)
    layers = (1, 3)
    heads = _one_per_group(graph, 1)
    expected = _heads_silenced(graph, layers, heads)
    result = run_pass(DropHeads(layers=layers, heads=heads), graph)
    assert result.modified and graph.layer(1).attention.num_heads == graph.index.num_heads - len(heads)
    actual = graph.forward(PROMPT_IDS, MASK, position_ids_from_mask(MASK))
    real = MASK.bool()
    assert torch.allclose(actual[real], expected[real], atol=1e-5, rtol=0)
    untouched = tiny_graph(arch).forward(PROMPT_IDS, MASK, position_ids_from_mask(MASK))
    assert (untouched[real] - actual[real]).abs().max() > 1e-4


def test_the_contract_refuses_unbalanced_groups_and_a_second_drop():
    graph = tiny_graph("tiny-llama")  # 4 query heads, 2 key/value heads
    with pytest.raises(PassContractError, match="must lose as many"):
        run_pass(DropHeads(layers=(1,), heads=(0, 1)), graph)
    run_pass(DropHeads(layers=(1,), heads=(0, 2)), graph)
    with pytest.raises(PassContractError, match="heads were dropped already"):
        run_pass(DropHeads(layers=(1,), heads=(1, 3)), graph)


def test_a_projection_wide_q_norm_is_refused_by_the_contract():
    with pytest.raises(PassContractError, match="Q norm spans every head"):
        run_pass(DropHeads(layers=(1,), heads=(0, 2)), tiny_graph("tiny-olmo2"))


def test_syntax_round_trip_and_plan():
    recipe = parse('model "tiny-llama"\ndrop heads 0, 2 of layers 1..2, 4\ndrop attention layers 4\n')
    assert unparse(recipe) == 'model "tiny-llama"\ndrop heads 0, 2 of layers 1..2, 4\ndrop attention layers 4\n'
    assert parse(unparse(recipe)) == recipe
    plan = build_plan(check(recipe), verify=False)
    (step,) = [s for s in plan.steps if s.action == "drop heads"]
    # Layer 4's attention is dropped first: its heads are gone with it.
    assert step.layers == (1, 2) and step.parameters["heads"] == [0, 2]
    assert step.targets == ("model.layers.1.self_attn", "model.layers.2.self_attn")
    assert "drop query heads 0, 2 of layers 1..2" in plan.render()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("drop heads 0, 1 of layers 1", "these take 2, 0 from them"),
        ("drop heads 7 of layers 1", "head 7 is out of range"),
        ("drop heads 3..1 of layers 1", "reversed range 3..1"),
        ("drop heads 0..3 of layers 1", "every query head would be dropped"),
        ("drop heads 0, 2 of least important 2 by zd", "drop heads takes explicit layers"),
    ],
)
def test_check_points_at_the_statement(line, message):
    with pytest.raises(RecipeError) as error:
        check(parse(f'model "tiny-llama"\n{line}\n', name="r.surg"))
    (diagnostic,) = error.value.diagnostics
    assert message in diagnostic.message and diagnostic.span.line == 2


def test_one_statement_per_layer():
    with pytest.raises(RecipeError, match="already dropped on line 2"):
        check(parse('model "tiny-llama"\ndrop heads 0, 2 of layers 1..2\ndrop heads 1, 3 of layers 2\n'))


def test_apply_verifies_and_genai_generates_what_surgery_runs(in_tmp):
    recipe = write(in_tmp / "r.surg", 'model "tiny-qwen3"\ndrop heads 0, 2 of layers *\nexport onnx\n')
    result = run_cli("apply", recipe, "-o", "out")
    assert result.code == 0, result.err
    report = json.loads((in_tmp / "out" / "surgery.json").read_text())
    assert report["verification"]["passed"]
    assert [p["action"] for p in report["passes"]] == ["drop heads"]
    assert report["model"]["after"]["parameters"] < report["model"]["before"]["parameters"]
    pytest.importorskip("onnxruntime_genai")
    from test_genai import PROMPTS, genai_greedy, our_greedy

    folder = str(in_tmp / "out")
    for prompt in PROMPTS:
        assert genai_greedy(folder, [list(prompt)], 8) == [our_greedy(folder, list(prompt), 8)]

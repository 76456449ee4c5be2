"""Mixture-of-experts models: export parity with exact routing, and what the checker refuses.

pattern: the Hugging Face MoE model (its own router and experts); replacement: the exported
graph (dense routing matrix, all experts batched); comparison: logits over a left-padded batch
plus decode, on batches where tokens are routed to different experts.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_MOE, run_cli, tiny_graph, write
from surgery.calibration import CalibrationSpec, calibration_tokens
from surgery.experts import expert_frequencies, most_used
from surgery.export.decoder import export_decoder
from surgery.models import builtin
from surgery.moe import SplitMoE, split_mlp
from surgery.passes import DropAttention, DropBlock, DropMlp, PruneExperts, SplitMlp, run_pass
from surgery.plan import VERIFY_DECODE_STEPS
from surgery.verify import PROMPTS, _left_padded, verify

EDITS = {"none": [], "mixed": [DropAttention(layers=(1,)), DropMlp(layers=(3,)), DropBlock(layers=(5,))]}


@pytest.mark.parametrize("arch", TINY_MOE)
@pytest.mark.parametrize("edit", EDITS)
def test_moe_parity_with_kv_cache(arch, edit, tmp_path):
    graph = tiny_graph(arch)
    for graph_pass in EDITS[edit]:
        run_pass(graph_pass, graph)
    export_decoder(graph, str(tmp_path))
    check = verify(graph, builtin.byte_tokenizer(), str(tmp_path), VERIFY_DECODE_STEPS, 1e-4, threads=1)
    assert check.passed, check.reason
    assert check.max_abs_logit_diff < 1e-4


@pytest.mark.parametrize("arch", TINY_MOE)
def test_verification_batch_routes_tokens_to_different_experts(arch):
    """The parity above is only meaningful if the routing it checks varies from token to token."""
    graph = tiny_graph(arch)
    chosen = []
    router = graph.model.model.layers[0].mlp.gate
    handle = router.register_forward_hook(lambda module, args, out: chosen.append(out[2]))
    ids, mask = _left_padded(builtin.byte_tokenizer(), PROMPTS)
    with torch.no_grad():
        graph.model(input_ids=ids, attention_mask=mask)
    handle.remove()
    routes = {tuple(sorted(row.tolist())) for row in chosen[0]}
    assert len(routes) >= 3  # several different expert pairs within one batch


def test_quantizing_moe_mlps_is_refused_at_the_line(in_tmp):
    recipe = write(in_tmp / "r.surg", 'model "tiny-mixtral"\nquantize attention to int4\nquantize layers 0 to int8\n')
    result = run_cli("check", recipe)
    assert result.code == 1
    assert "r.surg:3:1: error: quantizing mixture-of-experts MLPs is not supported yet" in result.err
    assert "r.surg:2" not in result.err


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen2"])
def test_split_with_every_expert_is_the_dense_mlp(arch, tmp_path):
    dense = tiny_graph(arch)
    split = tiny_graph(arch)
    run_pass(SplitMlp(layers=(0, 2, 5), experts=4, top_k=4), split)
    ids = torch.tensor([[72, 101, 108, 108, 111, 44, 32, 119, 111, 114]])
    mask = torch.ones_like(ids)
    positions = torch.arange(ids.shape[1])[None]
    assert torch.allclose(split.forward(ids, mask, positions), dense.forward(ids, mask, positions), atol=1e-5)
    assert isinstance(split.layer(2).mlp, SplitMoE)


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_split_moe_export_parity(top_k, tmp_path):
    graph = tiny_graph("tiny-mistral")
    run_pass(DropMlp(layers=(1,)), graph)
    run_pass(SplitMlp(layers=(0, 2, 3, 4, 5), experts=4, top_k=top_k), graph)
    export_decoder(graph, str(tmp_path))
    check = verify(graph, builtin.byte_tokenizer(), str(tmp_path), VERIFY_DECODE_STEPS, 1e-4, threads=1)
    assert check.passed, check.reason


def test_split_router_is_a_hard_top_k():
    graph = tiny_graph("tiny-llama")
    moe = split_mlp(graph.layer(0).mlp, experts=4, top_k=2)
    x = torch.randn(3, 7, 64)
    weights, index = moe.gate(x)
    assert torch.equal(weights, torch.ones(3, 7, 2))
    scores = x @ moe.gate.weight.T
    assert torch.equal(index.sort(-1).values, scores.topk(2, dim=-1).indices.sort(-1).values)
    # the experts partition the neurons: equal sizes, every neuron once
    assert moe.experts.gate_up_proj.shape == (4, 2 * 40, 64) and moe.experts.down_proj.shape == (4, 64, 40)


def test_split_errors_point_at_the_statement(in_tmp):
    recipe = write(in_tmp / "r.surg", 'model "tiny-llama"\nsplit mlp layers * into 3 experts top 4\n')
    result = run_cli("check", recipe)
    assert result.code == 1
    assert "r.surg:2:1: error: cannot split 160 MLP neurons into 3 equal experts" in result.err
    assert "top 4 is not in 1..3" in result.err
    moe = write(in_tmp / "m.surg", 'model "tiny-mixtral"\nsplit mlp layers 0 into 2 experts top 1\n')
    assert "already mixtures of experts" in run_cli("check", moe).err


def _direct_counts(graph, layer: int, tokens) -> list[float]:
    """Expert use counted by hand: the residual entering the MLP, through the router's softmax and top-k."""
    seen = []
    handle = graph.layer(layer).post_norm.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        for row in tokens:
            ids = torch.from_numpy(row)[None]
            graph.forward(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
    handle.remove()
    router = graph.layer(layer).mlp.gate
    counts = torch.zeros(router.weight.shape[0], dtype=torch.float64)
    for x in seen:
        chosen = torch.topk(x.reshape(-1, x.shape[-1]) @ router.weight.T, router.top_k, dim=-1).indices
        counts += torch.bincount(chosen.reshape(-1), minlength=len(counts))
    return (counts / counts.sum()).tolist()


@pytest.mark.parametrize("arch", [*TINY_MOE, "split"])
def test_frequencies_match_a_direct_count_and_pruning_keeps_parity(arch, tmp_path):
    graph = tiny_graph("tiny-llama" if arch == "split" else arch)
    if arch == "split":
        run_pass(SplitMlp(layers=tuple(range(6)), experts=4, top_k=2), graph)
    tokens = calibration_tokens(builtin.byte_tokenizer(), CalibrationSpec(samples=3, length=24))
    frequencies = expert_frequencies(graph, (0, 3), tokens)
    for layer in (0, 3):
        assert frequencies[layer] == pytest.approx(_direct_counts(graph, layer, tokens), abs=1e-9)
    kept = ((0, most_used(frequencies[0], 3)), (3, most_used(frequencies[3], 1)))
    run_pass(PruneExperts(kept=kept), graph)
    assert graph.layer(3).mlp.gate.top_k == 1 and graph.layer(0).mlp.gate.weight.shape[0] == 3
    export_decoder(graph, str(tmp_path))
    check = verify(graph, builtin.byte_tokenizer(), str(tmp_path), VERIFY_DECODE_STEPS, 1e-4, threads=1)
    assert check.passed, check.reason


def test_prune_checks(in_tmp):
    dense = write(in_tmp / "d.surg", 'model "tiny-llama"\nprune experts layers * to 2\n')
    assert "has no experts to prune" in run_cli("check", dense).err
    many = write(in_tmp / "m.surg", 'model "tiny-mixtral"\nprune experts layers * to 4\n')
    assert "keeping 4 experts of 4 prunes nothing or everything" in run_cli("check", many).err
    split = write(
        in_tmp / "s.surg", 'model "tiny-llama"\nsplit mlp layers * into 4 experts top 2\nprune experts layers 1 to 3\n'
    )
    assert run_cli("check", split).code == 0

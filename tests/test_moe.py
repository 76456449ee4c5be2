"""Mixture-of-experts models: export parity with exact routing, and what the checker refuses.

pattern: the Hugging Face MoE model (its own router and experts); replacement: the exported
graph (dense routing matrix, all experts batched); comparison: logits over a left-padded batch
plus decode, on batches where tokens are routed to different experts.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from conftest import TINY_MOE, run_cli, tiny_graph, write
from surgery.analysis.experts import (
    LowRankExperts,
    MergedMoE,
    expert_frequencies,
    full_rank,
    group_by_outputs,
    group_by_router,
    most_used,
)
from surgery.analysis.moe import SplitMoE, split_mlp
from surgery.backend.verify import PROMPTS, prompt_batch, verify
from surgery.calibration import CalibrationSpec, calibration_tokens
from surgery.export.decoder import export_decoder
from surgery.export.options import ExportOptions
from surgery.front.planner import VERIFY_DECODE_STEPS
from surgery.models import builtin
from surgery.passes import DropAttention, DropBlock, DropMlp, MergeExperts, PruneExperts, SplitMlp, run_pass

EDITS = {"none": [], "mixed": [DropAttention(layers=(1,)), DropMlp(layers=(3,)), DropBlock(layers=(5,))]}


@pytest.mark.parametrize("arch", TINY_MOE)
@pytest.mark.parametrize("edit", EDITS)
@pytest.mark.parametrize("operator", ["contrib", "plain"])
def test_moe_parity_with_kv_cache(arch, edit, operator, tmp_path):
    graph = tiny_graph(arch)
    for graph_pass in EDITS[edit]:
        run_pass(graph_pass, graph)
    result = export_decoder(graph, str(tmp_path), ExportOptions(moe_operator=operator))
    check = verify(graph, builtin.byte_tokenizer(), str(tmp_path), VERIFY_DECODE_STEPS, 1e-4, threads=1)
    assert check.passed, check.reason
    assert check.max_abs_logit_diff < 1e-4
    moe_layers = sum(layer.mlp is not None for layer in graph.layers)
    assert result.op_counts.get("MoE", 0) == (moe_layers if operator == "contrib" else 0)


def test_layers_the_moe_operator_cannot_express_stay_plain(tmp_path):
    """Split (unit weights) and merged (grouped routing) layers are plain ops; a pruned layer is the operator."""
    graph = tiny_graph("tiny-mixtral")
    run_pass(PruneExperts(kept=((0, (0, 1, 3)),)), graph)
    run_pass(MergeExperts(merges=((1, ((0, 1), (2, 3)), ((0.5, 0.5), (0.5, 0.5))),)), graph)
    result = export_decoder(graph, str(tmp_path))
    assert result.op_counts["MoE"] == 5  # layer 1 is merged
    assert result.op_counts["ScatterElements"] == 1
    dense = tiny_graph("tiny-llama")
    run_pass(SplitMlp(layers=(0, 1), experts=4, top_k=2), dense)
    (tmp_path / "split").mkdir()
    assert "MoE" not in export_decoder(dense, str(tmp_path / "split")).op_counts


@pytest.mark.parametrize("arch", TINY_MOE)
def test_verification_batch_routes_tokens_to_different_experts(arch):
    """The parity above is only meaningful if the routing it checks varies from token to token."""
    graph = tiny_graph(arch)
    chosen = []
    router = graph.model.model.layers[0].mlp.gate
    handle = router.register_forward_hook(lambda module, args, out: chosen.append(out[2]))
    ids, mask = prompt_batch(builtin.byte_tokenizer(), PROMPTS)
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
    handle = graph.layer(layer).mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
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


@pytest.mark.parametrize("arch", TINY_MOE)
def test_merging_into_as_many_groups_as_experts_is_the_identity(arch):
    original, merged = tiny_graph(arch), tiny_graph(arch)
    singletons = tuple((layer, tuple((e,) for e in range(4)), ((1.0,),) * 4) for layer in range(6))
    run_pass(MergeExperts(merges=singletons), merged)
    ids = torch.tensor([[72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]])
    mask, positions = torch.ones_like(ids), torch.arange(ids.shape[1])[None]
    assert torch.allclose(merged.forward(ids, mask, positions), original.forward(ids, mask, positions), atol=1e-5)


def test_grouped_routing_equals_a_direct_computation():
    """Top-k over the N original logits, chosen experts mapped to groups, weights on a group added."""
    graph = tiny_graph("tiny-mixtral")
    original = graph.layer(0).mlp
    groups, weights = [[0, 3], [1, 2]], [[0.25, 0.75], [0.5, 0.5]]
    merged = MergedMoE(original, groups, weights, align=False)
    x = torch.randn(9, 64)
    with torch.no_grad():
        probs = torch.softmax(x @ original.gate.weight.T, dim=-1)
        top, index = torch.topk(probs, 2, dim=-1)
        top = top / top.sum(-1, keepdim=True)  # Mixtral renormalizes
        expected = torch.zeros(9, 64)
        for t in range(9):
            for slot in range(2):
                g = 0 if int(index[t, slot]) in groups[0] else 1
                members, w = groups[g], weights[g]
                gate_up = sum(wi * original.experts.gate_up_proj[e] for e, wi in zip(members, w, strict=True))
                down = sum(wi * original.experts.down_proj[e] for e, wi in zip(members, w, strict=True))
                gate, up = (gate_up @ x[t]).chunk(2)
                expected[t] += top[t, slot] * (down @ (torch.nn.functional.silu(gate) * up))
        assert torch.allclose(merged(x[None])[0], expected, atol=1e-5)


def test_alignment_undoes_a_neuron_permutation():
    """Two experts that are the same function with neurons in another order merge into that function."""
    original = tiny_graph("tiny-mixtral").layer(0).mlp
    inter = original.experts.down_proj.shape[-1]
    order = torch.randperm(inter, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gate_up, down = original.experts.gate_up_proj, original.experts.down_proj
        gate_up[1] = torch.cat([gate_up[0, :inter][order], gate_up[0, inter:][order]])
        down[1] = down[0][:, order]
    aligned = MergedMoE(original, [[0, 1], [2], [3]], [[0.5, 0.5], [1.0], [1.0]])
    plain = MergedMoE(original, [[0, 1], [2], [3]], [[0.5, 0.5], [1.0], [1.0]], align=False)
    assert torch.allclose(aligned.experts.gate_up_proj[0], original.experts.gate_up_proj[0], atol=1e-6)
    assert torch.allclose(aligned.experts.down_proj[0], original.experts.down_proj[0], atol=1e-6)
    assert not torch.allclose(plain.experts.gate_up_proj[0], original.experts.gate_up_proj[0], atol=1e-3)


def test_rank_truncation_is_the_shared_subspace_projection():
    """Sub-MoE: left singular vectors of [W_1 ... W_k], projection of the weighted average, stored factored."""
    original = tiny_graph("tiny-mixtral").layer(0).mlp
    groups, weights, rank = [[0, 3], [1, 2]], [[0.25, 0.75], [0.5, 0.5]], 5
    merged = MergedMoE(original, groups, weights, align=False, rank=rank)
    full = MergedMoE(original, groups, weights, align=False)
    assert isinstance(merged.experts, LowRankExperts)
    for g, members in enumerate(groups):
        for which in ("gate_up_proj", "down_proj"):
            stacked = getattr(original.experts, which)[members].detach().double()
            u = torch.linalg.svd(torch.cat(list(stacked), dim=1), full_matrices=False).U[:, :rank]
            expected = u @ u.T @ getattr(full.experts, which)[g].double()
            assert torch.allclose(getattr(merged.experts, which)[g].double(), expected, atol=1e-5)
    e, two_i, hidden = full.experts.gate_up_proj.shape
    assert sum(p.numel() for p in merged.experts.parameters()) == e * rank * (two_i + hidden + hidden + two_i // 2)
    assert full_rank(original.experts.gate_up_proj, original.experts.down_proj) == two_i // 2


def test_merge_with_rank_end_to_end_keeps_onnx_parity(in_tmp):
    recipe = write(
        in_tmp / "r.surg",
        'model "tiny-mixtral"\ncalibrate on "valid" samples 3 length 32\nmerge experts layers * to 2 rank 50%\n',
    )
    result = run_cli("apply", recipe, "-o", "out")
    assert result.code == 0, result.err
    report = json.loads((in_tmp / "out" / "surgery.json").read_text())
    assert report["verification"]["passed"]
    step = next(s for s in report["plan"]["steps"] if s["action"] == "merge experts")
    assert step["parameters"]["resolved_rank"] == 24  # 50% of the experts' full rank 48 (tiny-mixtral: I = 48)
    before, after = report["model"]["before"], report["model"]["after"]
    assert after["expert_parameters"] < before["expert_parameters"] // 2  # fewer groups, and factored


def test_plan_shows_the_groups_per_layer(in_tmp):
    recipe = write(
        in_tmp / "r.surg",
        'model "tiny-mixtral"\ncalibrate on "valid" samples 3 length 32\n'
        "prune experts layers 0..1 to 3\nmerge experts layers 2 to 2 grouping router\n",
    )
    result = run_cli("plan", recipe)
    assert result.code == 0, result.err
    assert "experts kept per layer:" in result.out and "layer 1: " in result.out
    assert "groups of original experts per layer (most used first):" in result.out
    assert re.search(r"layer 2: \[[0-3 ]+\] \[[0-3 ]+\]", result.out)


def test_merge_rank_and_order_errors(in_tmp):
    recipe = write(
        in_tmp / "r.surg",
        'model "tiny-mixtral"\nmerge experts layers 0 to 2 rank 0\nmerge experts layers 1 to 2 rank 100%\n'
        "prune experts layers 3 to 2\nmerge experts layers 3 to 3\n",
    )
    result = run_cli("check", recipe)
    assert result.code == 1
    assert "r.surg:2:34: error: rank 0 keeps nothing" in result.err
    assert "r.surg:3:34: error: rank 100% is not a truncation" in result.err
    assert "r.surg:5:1: error: cannot merge into 3 groups the 2 experts that pruning keeps" in result.err


@pytest.mark.parametrize("arch", TINY_MOE)
@pytest.mark.parametrize("rank", [None, 8])
def test_merged_and_pruned_export_parity(arch, rank, tmp_path):
    """After pruning and merging (uneven groups, optionally rank-factored), ONNX still matches PyTorch."""
    graph = tiny_graph(arch)
    run_pass(PruneExperts(kept=((0, (0, 2, 3)),)), graph)
    groups, weights = ((0, 3), (1,), (2,)), ((0.7, 0.3), (1.0,), (1.0,))
    run_pass(MergeExperts(merges=tuple((layer, groups, weights) for layer in (1, 2, 5)), rank=rank), graph)
    export_decoder(graph, str(tmp_path))
    check = verify(graph, builtin.byte_tokenizer(), str(tmp_path), VERIFY_DECODE_STEPS, 1e-4, threads=1)
    assert check.passed, check.reason


def test_grouping_rules():
    features = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.95], [-1.0, 0.0]])
    assert group_by_outputs(features, 3) == [[0, 1], [2, 3], [4]]
    router = np.array([[1.0, 0.0], [0.0, 1.0], [0.95, 0.1], [0.1, 0.9]])
    # the two most used experts lead; the others join the leader whose router row is closest
    assert group_by_router(router, [0.4, 0.3, 0.2, 0.1], 2) == [[0, 2], [1, 3]]


@pytest.mark.parametrize("grouping", ["output", "router"])
def test_merge_recipe_end_to_end(in_tmp, grouping):
    recipe = write(
        in_tmp / "r.surg",
        'model "tiny-qwen2-moe"\ncalibrate on "valid" samples 3 length 32\n'
        f"merge experts layers * to 2 grouping {grouping}\n",
    )
    result = run_cli("apply", recipe, "-o", "out")
    assert result.code == 0, result.err
    report = json.loads((in_tmp / "out" / "surgery.json").read_text())
    merge = next(p for p in report["passes"] if "groups" in p)
    assert all(
        sorted(e for g in groups for e in g) == [0, 1, 2, 3] and len(groups) == 2 for groups in merge["groups"].values()
    )
    before, after = report["model"]["before"], report["model"]["after"]
    assert after["parameters"] < before["parameters"]
    assert before["experts_per_layer"] == {str(i): 4 for i in range(6)}
    assert after["experts_per_layer"] == {str(i): 2 for i in range(6)}
    assert after["expert_parameters"] * 2 == before["expert_parameters"]

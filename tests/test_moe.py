"""Mixture-of-experts models: export parity with exact routing, and what the checker refuses.

pattern: the Hugging Face MoE model (its own router and experts); replacement: the exported
graph (dense routing matrix, all experts batched); comparison: logits over a left-padded batch
plus decode, on batches where tokens are routed to different experts.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_MOE, run_cli, tiny_graph, write
from surgery.export.decoder import export_decoder
from surgery.models import builtin
from surgery.passes import DropAttention, DropBlock, DropMlp, run_pass
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

"""Each pass against an independent statement of what it means, on tiny models of four architectures.

pattern: the unmodified Hugging Face model; replacement: the pass applied to the decoder graph;
comparison: the Hugging Face model itself with forward hooks that remove the same part
(attention output -> 0, MLP output -> 0, decoder layer -> identity). Their logits must match.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, tiny_graph
from surgery.ir.inputs import position_ids_from_mask
from surgery.passes import DropAttention, DropBlock, DropMlp, PassContractError, run_pass

PROMPT_IDS = torch.tensor(
    [[258, 258, 258, 72, 101, 108, 108, 111, 44, 32, 119], [84, 104, 101, 32, 113, 117, 105, 99, 107, 32, 98]]
)
MASK = (PROMPT_IDS != 258).long()


def _zero_output(module, args, output):
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]), *output[1:])
    return torch.zeros_like(output)


def _identity_layer(module, args, kwargs, output):
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _hooked_logits(graph, part: str, layers: tuple[int, ...]) -> torch.Tensor:
    """The comparison: the HF model with `part` of `layers` removed by hooks."""
    model = graph.model
    handles = []
    for index in layers:
        layer = model.model.layers[index]
        if part == "attention":
            handles.append(layer.self_attn.register_forward_hook(_zero_output))
        elif part == "mlp":  # the family's MLP module (LFM2: feed_forward)
            handles.append(getattr(layer, graph.architecture.names.mlp).register_forward_hook(_zero_output))
        else:
            handles.append(layer.register_forward_hook(_identity_layer, with_kwargs=True))
    try:
        with torch.no_grad():
            return model(input_ids=PROMPT_IDS, attention_mask=MASK, position_ids=position_ids_from_mask(MASK)).logits
    finally:
        for handle in handles:
            handle.remove()


CASES = [
    (DropAttention, "attention", (1, 4)),
    (DropMlp, "mlp", (0, 5)),
    (DropBlock, "block", (2, 3)),
]


@pytest.mark.parametrize("arch", TINY)
@pytest.mark.parametrize(("pass_class", "part", "layers"), CASES, ids=lambda c: getattr(c, "name", str(c)))
def test_pass_equals_hooked_model(arch, pass_class, part, layers):
    graph = tiny_graph(arch)
    expected = _hooked_logits(graph, part, layers)
    result = run_pass(pass_class(layers=layers), graph)
    assert result.modified
    actual = graph.forward(PROMPT_IDS, MASK, position_ids_from_mask(MASK))
    real = MASK.bool()
    assert torch.allclose(actual[real], expected[real], atol=1e-5, rtol=0)
    # And the pass changed something: the unmodified graph differs.
    untouched = tiny_graph(arch).forward(PROMPT_IDS, MASK, position_ids_from_mask(MASK))
    assert (untouched[real] - actual[real]).abs().max() > 1e-3


def test_unmodified_graph_equals_the_hugging_face_model():
    graph = tiny_graph("tiny-llama")
    with torch.no_grad():
        expected = graph.model(
            input_ids=PROMPT_IDS, attention_mask=MASK, position_ids=position_ids_from_mask(MASK)
        ).logits
    actual = graph.forward(PROMPT_IDS, MASK, position_ids_from_mask(MASK))
    assert torch.allclose(actual[MASK.bool()], expected[MASK.bool()], atol=1e-6, rtol=0)


def test_drop_attention_renumbers_kv_slots():
    graph = tiny_graph("tiny-llama")
    run_pass(DropAttention(layers=(0, 3)), graph)
    assert graph.kv_layers() == [1, 2, 4, 5]
    run_pass(DropBlock(layers=(4,)), graph)
    assert graph.kv_layers() == [1, 2, 5]
    assert [layer.index for layer in graph.layers] == [0, 1, 2, 3, 5]


def test_contract_refuses_dropping_twice():
    graph = tiny_graph("tiny-llama")
    run_pass(DropMlp(layers=(2,)), graph)
    with pytest.raises(PassContractError, match="drop mlp.*layer 2 has no MLP to drop"):
        run_pass(DropMlp(layers=(2,)), graph)


def test_contract_refuses_a_missing_layer():
    graph = tiny_graph("tiny-qwen2")
    run_pass(DropBlock(layers=(1,)), graph)
    with pytest.raises(PassContractError, match="layer 1 is not in the graph"):
        run_pass(DropAttention(layers=(1,)), graph)


def test_contract_keeps_one_attention_layer():
    graph = tiny_graph("tiny-llama")
    with pytest.raises(PassContractError, match="no attention layer left"):
        run_pass(DropAttention(layers=tuple(range(6))), graph)


def test_passes_declare_themselves():
    for pass_class, keyword in ((DropAttention, "drop attention"), (DropMlp, "drop mlp"), (DropBlock, "drop block")):
        assert pass_class.name == keyword
        assert pass_class.preserves_semantics is False
        assert pass_class(layers=(1,)).parameters() == {"layers": (1,)}

"""Quantization: exact node selection per layer and width, the packed weights, and the numbers.

pattern: the grouped recipe of tests/golden/plans/tiny-quantize-groups.surg (overlapping rules,
a shadowed rule, `rest`, a later statement overriding a group, the head); replacement: the
applied output folder; comparison: the node set each rule must produce, the float weights
each MatMulNBits node must reproduce to within half a quantization step, and PyTorch run with
exactly those dequantized weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import REPO, run_cli, tiny_graph
from surgery.analysis.quantization import (
    dequantize,
    initializer_arrays,
    producers_of,
    quantized_linears,
    stored_tensor,
)
from surgery.backend.runtime import OnnxCausalLM
from surgery.export.decoder import export_decoder
from surgery.export.options import ExportOptions
from surgery.formats.weights import WeightFormat
from surgery.ir.inputs import position_ids_from_mask
from surgery.passes import PassContractError, Quantize, run_pass

GOLDEN = REPO / "tests" / "golden" / "plans"


def _linear_nodes(layer: int, part: str = "layers") -> set[str]:
    attention = {f"/model.layers.{layer}.self_attn/qkv_proj/MatMul", f"model.layers.{layer}.self_attn.o_proj/MatMul"}
    mlp = {f"model.layers.{layer}.mlp.{name}/MatMul" for name in ("gate_proj", "up_proj", "down_proj")}
    return {"attention": attention, "mlp": mlp, "layers": attention | mlp}[part]


@pytest.fixture(scope="module")
def grouped(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("grouped")
    for name in ("tiny-quantize-groups.surg", "tiny-importance.json"):
        shutil.copy(GOLDEN / name, folder / name)
    result = run_cli("apply", str(folder / "tiny-quantize-groups.surg"), "-o", str(folder / "out"))
    assert result.code == 0, result.err
    return folder / "out"


def _nodes(folder: Path) -> dict[str, onnx.NodeProto]:
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    return {node.name: node for node in model.graph.node}


def test_each_rule_converts_exactly_its_linears(grouped):
    nodes = _nodes(grouped)
    attrs = {
        name: {a.name: a.i for a in node.attribute} for name, node in nodes.items() if node.op_type == "MatMulNBits"
    }
    int8 = _linear_nodes(1) | _linear_nodes(4) | {"/lm_head/MatMul"} | _linear_nodes(2, "attention")
    int4_block16 = _linear_nodes(0) | _linear_nodes(2, "mlp") | _linear_nodes(3)
    int8_symmetric = _linear_nodes(5, "mlp")  # layer 5's attention was dropped: nothing to quantize there
    expected = {f"{n}_Q8": (8, 32) for n in int8 | int8_symmetric} | {f"{n}_Q4": (4, 16) for n in int4_block16}
    assert {name: (a["bits"], a["block_size"]) for name, a in attrs.items()} == expected
    for name in expected:
        has_zero_points = len(nodes[name].input) > 3 and bool(nodes[name].input[3])
        assert has_zero_points == (name.removesuffix("_Q8") not in int8_symmetric), name
        assert attrs[name]["accuracy_level"] == 4
    assert not [n for n, node in nodes.items() if node.op_type == "MatMul"]  # everything was selected once
    assert not any(n.startswith("/model.layers.5.self_attn") for n in nodes)


def test_report_counts_bits_exactly(grouped):
    report = json.loads((grouped / "surgery.json").read_text())
    q = report["quantization"]
    graph = tiny_graph("tiny-llama")
    hidden, inter, vocab = 64, graph.index.intermediate_size, graph.index.vocab_size
    kv = graph.index.num_kv_heads * graph.index.head_dim
    attention = hidden * (hidden + 2 * kv) + hidden * hidden
    mlp = 3 * hidden * inter
    int8 = 2 * (attention + mlp) + hidden * vocab + attention + mlp  # layers 1, 4, head, layer 2 attention, layer 5 mlp
    int4 = 2 * (attention + mlp) + mlp  # layers 0, 3 and layer 2's MLP
    assert q["widths"] == {
        "int8": {"linears": 10 + 1 + 2 + 3, "parameters": int8},
        "int4": {"linears": 10 + 3, "parameters": int4},
    }
    assert q["quantized_linears_nominal_bits"] == pytest.approx((8 * int8 + 4 * int4) / (int8 + int4))
    # Every other stored weight is fp32: embedding, norms, and nothing else (layer 5's attention is gone).
    floats = vocab * hidden + hidden * (2 * 6 - 1 + 1)
    assert q["float_parameters"] == floats
    stored = int8 + int4 + floats
    assert q["model_nominal_bits"] == pytest.approx((8 * int8 + 4 * int4 + 32 * floats) / stored)
    assert q["quantized_linears_storage_bits"] > q["quantized_linears_nominal_bits"]  # scales and zero points
    assert q["bytes_after"] < q["bytes_before"]
    assert report["model"]["after"]["bytes"] == q["bytes_after"]
    # Quantized as written; verified exactly: the float-compute twin against PyTorch with these weights.
    assert q["quantized_while_writing"] and report["verification"]["quantized_weights"]
    assert report["verification"]["passed"] and report["plan"]["steps"][2]["parameters"]["quantized_weights"]


def test_report_counts_bits_per_kind_of_linear(grouped):
    """Where a mixed-precision recipe spent its bits: per kind of linear, counts at each width,
    parameters, bytes and bits per weight stored, adding up to the totals."""
    q = json.loads((grouped / "surgery.json").read_text())["quantization"]
    kinds = q["by_kind"]
    assert list(kinds) == ["qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    # qkv_proj: layers 1, 2, 4 at int8, 0 and 3 at int4 (layer 5 has no attention); down_proj: 1, 4, 5 at int8.
    assert kinds["qkv_proj"]["widths"] == {"int8": 3, "int4": 2}
    assert kinds["down_proj"]["widths"] == {"int8": 3, "int4": 3}
    assert kinds["lm_head"]["widths"] == {"int8": 1}
    assert sum(k["parameters"] for k in kinds.values()) == q["quantized_parameters"]
    for width, totals in q["widths"].items():
        assert sum(k["widths"].get(width, 0) for k in kinds.values()) == totals["linears"]
    for kind in kinds.values():
        assert kind["storage_bits"] == pytest.approx(8 * kind["bytes"] / kind["parameters"])


def _quantized_weights(model: onnx.ModelProto) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    arrays = initializer_arrays(model, {name for n in model.graph.node for name in n.input})
    producers = producers_of(model.graph)
    return {n.name: dequantize(n, arrays, producers) for n in model.graph.node if n.op_type == "MatMulNBits"}, arrays


def test_packed_weights_reproduce_the_float_weights(grouped):
    model = onnx.load(str(grouped / "model.onnx"))
    weights, arrays = _quantized_weights(model)
    graph = tiny_graph("tiny-llama")
    layer = graph.model.model.layers[3]
    originals = {
        "model.layers.3.mlp.down_proj/MatMul_Q4": layer.mlp.down_proj.weight.detach().numpy().T,
        "/model.layers.3.self_attn/qkv_proj/MatMul_Q4": np.concatenate(
            [
                m.weight.detach().numpy().T
                for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
            ],
            axis=1,
        ),
        "/lm_head/MatMul_Q8": graph.head.weight.detach().numpy().T,
    }
    nodes = {n.name: n for n in model.graph.node}
    for name, original in originals.items():
        node = nodes[name]
        block = next(a.i for a in node.attribute if a.name == "block_size")
        k, n = original.shape
        scales = arrays[node.input[2]].reshape(n, -1)
        # Each weight is within half a step (its block's scale) of the float weight; a
        # mis-packed nibble or block would be off by many steps.
        step = np.repeat(scales, block, axis=1)[:, :k].T
        error = np.abs(weights[name] - original)
        assert error.shape == original.shape
        assert np.all(error <= 0.5 * step * (1 + 1e-3) + 1e-7), name
        assert error.max() > 0  # quantization did happen


@pytest.mark.parametrize(
    "bits, block, symmetric, half",
    [(4, 32, False, False), (4, 16, True, False), (8, 32, False, False), (8, 64, True, False), (4, 32, False, True)],
)
def test_onnxruntime_matches_pytorch_with_the_dequantized_weights(tmp_path, bits, block, symmetric, half):
    """With float compute (accuracy_level 0) the quantized model is PyTorch with the quantized weights.

    Every linear (and the head, untied) is quantized; PyTorch gets the weights `dequantize`
    reads back from the packed tensors. Any mistake in selection, packing, the head's untying
    or the Q/K/V split would show up as a large logit difference. `half`: scales stored in fp16
    and read through Casts that onnxruntime folds.
    """
    graph = tiny_graph("tiny-qwen2")  # tied head, QKV biases
    export = export_decoder(graph, str(tmp_path), ExportOptions(untie_head=True))
    model = onnx.load(export.model_path)
    assignment = tuple((node, WeightFormat(bits, block, symmetric, half)) for node in export.linears.values())
    run_pass(Quantize(assignment=assignment, accuracy_level=0), model)
    casts = [n for n in model.graph.node if n.op_type == "Cast" and n.name.endswith("_scales/Cast")]
    assert len(casts) == (len(assignment) if half else 0)
    weights, _ = _quantized_weights(model)
    (tmp_path / "q").mkdir()  # (saving moves the weights out of `model`, so read them first)
    onnx.save(model, str(tmp_path / "q" / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    node_of = {node + f"_Q{bits}": linear for linear, node in export.linears.items()}
    q_size = graph.index.num_heads * graph.index.head_dim
    kv_size = graph.index.num_kv_heads * graph.index.head_dim
    with torch.no_grad():
        for name, weight in weights.items():
            linear, w = node_of[name], torch.from_numpy(np.ascontiguousarray(weight.T))
            if linear == "lm_head":
                graph.head.weight = torch.nn.Parameter(w)  # untied, as the export wrote it
            elif linear.endswith("qkv_proj"):
                attn = graph.model.get_submodule(linear.rsplit(".", 1)[0])
                for module, part in zip(
                    (attn.q_proj, attn.k_proj, attn.v_proj), torch.split(w, [q_size, kv_size, kv_size]), strict=True
                ):
                    module.weight.copy_(part)
            else:
                graph.model.get_submodule(linear).weight.copy_(w)
    ids = torch.tensor([[72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]])
    mask = torch.ones_like(ids)
    positions = position_ids_from_mask(mask)
    expected = graph.forward(ids, mask, positions).numpy()
    actual = OnnxCausalLM(str(tmp_path / "q" / "model.onnx")).step(ids.numpy(), mask.numpy(), positions.numpy()).logits
    assert np.abs(actual - expected).max() < 1e-4


def test_quantize_pass_contract(tmp_path):
    graph = tiny_graph("tiny-qwen2")
    export = export_decoder(graph, str(tmp_path))
    model = onnx.load(export.model_path)
    with pytest.raises(PassContractError, match="not a MatMul"):
        run_pass(Quantize(assignment=(("/no/such/MatMul", WeightFormat(4, 32, False)),)), model)
    chosen = export.linears["model.layers.2.mlp.up_proj"]
    result = run_pass(Quantize(assignment=((chosen, WeightFormat(4, 32, False)),)), model)
    assert result.modified
    assert [q.node for q in quantized_linears(model)] == [f"{chosen}_Q4"]  # and nothing else


# The embedding: GatherBlockQuantized, alone or sharing a tied head's tensors.


def _apply(tmp_path: Path, model: str, lines: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = tmp_path / "r.surg"
    recipe.write_text(f'model "{model}"\n{lines}\nexport onnx\n')
    result = run_cli("apply", str(recipe), "-o", str(tmp_path / "out"))
    assert result.code == 0, result.err
    return tmp_path / "out"


def _lookup_table(folder: Path, rows: int) -> np.ndarray:
    """The float rows the quantized lookup returns, read by running just that node in onnxruntime."""
    import onnxruntime as ort
    from onnx import helper

    model = onnx.load(str(folder / "model.onnx"))
    lookup = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    keep = {lookup.name} | {n.name for n in model.graph.node if set(n.output) & set(lookup.input)}
    nodes = [n for n in model.graph.node if n.name in keep]
    used = {name for n in nodes for name in n.input}
    inputs = [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [None])]
    graph = helper.make_graph(
        nodes,
        "lookup",
        inputs,
        [helper.make_tensor_value_info(lookup.output[0], onnx.TensorProto.FLOAT, None)],
        [i for i in model.graph.initializer if i.name in used],
    )
    small = helper.make_model(graph, opset_imports=model.opset_import)
    session = ort.InferenceSession(small.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": np.arange(rows, dtype=np.int64)})[0]


@pytest.mark.parametrize(
    "bits, block, symmetric, half",
    [(4, 32, False, False), (4, 16, True, False), (8, 32, False, False), (8, 64, True, False), (4, 32, False, True)],
)
def test_the_quantized_embedding_is_the_table_to_within_a_step(tmp_path, bits, block, symmetric, half):
    graph = tiny_graph("tiny-llama")  # untied: the table is quantized into tensors of its own
    original = graph.embedding.weight.detach().numpy()
    width = f"int{bits} block {block}" + (" symmetric" if symmetric else "") + (" scales fp16" if half else "")
    out = _apply(tmp_path, "tiny-llama", f"quantize embedding to {width}")
    nodes = _nodes(out)
    assert "/model/embed_tokens/Gather" not in nodes
    lookup = nodes["/model/embed_tokens/GatherBlockQuantized"]
    attributes = {a.name: a.i for a in lookup.attribute}
    assert (attributes["bits"], attributes["block_size"]) == (bits, block)
    assert (len(lookup.input) == 4) != symmetric  # zero points only when asymmetric
    table = _lookup_table(out, original.shape[0])
    blocks = original.reshape(original.shape[0], -1, block)
    written = onnx.load(str(out / "model.onnx"))
    stored = stored_tensor(lookup.input[2], producers_of(written.graph))
    scales = initializer_arrays(written, {stored})[stored]
    assert (scales.dtype == np.float16) == half and (stored != lookup.input[2]) == half  # read through a Cast
    step = np.abs(scales).reshape(original.shape[0], -1, 1)
    error = np.abs(table - original).reshape(blocks.shape)
    # Half a step, except that symmetric blocks map the largest magnitude to -2^(bits-1), so the
    # other sign tops out one code short of it (onnxruntime's packer, as for MatMulNBits).
    bound = (1.0 if symmetric else 0.5) * step * (1 + 1e-3) + 1e-6
    assert np.all(error <= bound)
    assert error.max() > 0
    report = json.loads((out / "surgery.json").read_text())
    embedding = report["quantization"]["embedding"]
    assert embedding["bits"] == bits and not embedding["shared_with_head"]
    # The model runs with it: PyTorch with exactly these rows gives the same logits.
    with torch.no_grad():
        graph.embedding.weight.copy_(torch.from_numpy(table))
    ids = torch.tensor([[72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]])
    mask = torch.ones_like(ids)
    positions = position_ids_from_mask(mask)
    expected = graph.forward(ids, mask, positions).numpy()
    actual = OnnxCausalLM(str(out)).step(ids.numpy(), mask.numpy(), positions.numpy()).logits
    assert np.abs(actual - expected).max() < 1e-4


def test_a_tied_head_quantized_alike_shares_one_matrix(tmp_path):
    shared = _apply(tmp_path / "a", "tiny-qwen2", "quantize head to int4\nquantize embedding to int4")
    apart = _apply(tmp_path / "b", "tiny-qwen2", "quantize head to int8\nquantize embedding to int4")
    model = onnx.load(str(shared / "model.onnx"), load_external_data=False)
    lookup = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    producers = {o: n for n in model.graph.node for o in n.output}
    head = next(n for n in model.graph.node if n.name == "/lm_head/MatMul_Q4")
    assert [producers[name].input[0] for name in (lookup.input[0], *lookup.input[2:])] == list(head.input[1:4])
    assert not any(i.name.startswith("model.embed_tokens") for i in model.graph.initializer)
    report = json.loads((shared / "surgery.json").read_text())
    assert report["quantization"]["embedding"]["shared_with_head"]
    size = {folder: (folder / "model.onnx.data").stat().st_size for folder in (shared, apart)}
    table = 259 * 64  # vocabulary x hidden of the tiny models
    assert size[apart] - size[shared] > table // 2  # the int4 table is stored once, not twice
    # Shared rows are the head's rows: the lookup returns what the head multiplies with.
    rows = _lookup_table(shared, 259)
    weights, _ = _quantized_weights(onnx.load(str(shared / "model.onnx")))
    assert np.array_equal(rows, weights["/lm_head/MatMul_Q4"].T)


def test_quantizing_the_embedding_alone_warns_about_its_tied_head(tmp_path):
    recipe = tmp_path / "r.surg"
    recipe.write_text('model "tiny-qwen2"\nquantize embedding to int4\n')
    result = run_cli("plan", str(recipe))
    assert result.code == 0
    assert "the head is tied to the embedding but not quantized like it" in result.err
    assert "quantize head to int4 block 32" in result.err


def test_an_embedding_block_must_divide_the_hidden_size(tmp_path):
    recipe = tmp_path / "r.surg"
    recipe.write_text('model "tiny-llama"\nquantize embedding to int4 block 128\n')
    result = run_cli("check", str(recipe))
    assert result.code == 1
    assert "do not split into blocks of 128" in result.err and "16, 32, 64" in result.err

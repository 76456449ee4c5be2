"""Precision and target: `export onnx precision fp16|bf16 [for cpu|cuda]`.

fp16 exports of every family verify against PyTorch computing in fp16 (onnxruntime's CPU has
fp16 kernels), with KL divergence and top-1 agreement against fp32 in the report; the CUDA form
(no padding bias, seqlens from the mask, shared KV buffers in genai) runs here too, on the CPU
provider, and in onnxruntime-genai; bf16 is refused where it cannot run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import attention_layers, run_cli, write
from surgery.models import builtin


def apply(folder: Path, model: str, body: str, *flags: str) -> tuple[int, str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    recipe = write(folder / "r.surg", f'model "{model}"\n{body}')
    result = run_cli("apply", recipe, "-o", str(folder / "out"), *flags)
    return result.code, result.err, folder / "out"


@pytest.mark.parametrize("name", tuple(builtin.TINY_MODELS))
def test_fp16_exports_verify_against_pytorch_in_fp16(name, tmp_path):
    layer = attention_layers(name, (2,))[0]
    code, err, out = apply(tmp_path, name, f"drop attention layers {layer}\nexport onnx precision fp16\n")
    assert code == 0, err
    verification = json.loads((out / "surgery.json").read_text())["verification"]
    assert verification["passed"] and verification["precision"] == "fp16"
    assert verification["max_abs_logit_diff"] <= verification["tolerance"] == 0.5
    assert verification["fp32_kl"] < 1e-3 and verification["fp32_top1"] >= 0.9
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    types = {init.data_type for init in model.graph.initializer if len(init.dims) == 2}
    assert types == {onnx.TensorProto.FLOAT16}  # every weight matrix is stored in fp16
    kinds = {value.name: value.type.tensor_type.elem_type for value in (*model.graph.input, *model.graph.output)}
    assert kinds["logits"] == kinds["past_key_values.0.key"] == kinds["present.0.value"] == onnx.TensorProto.FLOAT16


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3", "tiny-mixtral"])
def test_the_cuda_form_has_no_padding_bias_and_runs_in_genai(name, tmp_path):

    code, err, out = apply(tmp_path, name, "export onnx for cuda\n")
    assert code == 0, err
    report = json.loads((out / "surgery.json").read_text())
    assert report["verification"]["passed"] and report["verification"]["precision"] == "fp16"
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    attention = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert attention and all(len(n.input) <= 10 or not n.input[10] for n in attention)
    config = json.loads((out / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True
    # CUDA graphs for genai's decode steps (no control flow in these graphs)
    assert config["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {"enable_cuda_graph": "1"}}]
    assert report["onnxruntime_genai"]["cuda_graphs"]
    # genai on this CPU machine, with the shared buffer: the same tokens as our runtime.
    config["model"]["decoder"]["session_options"]["provider_options"] = []
    (out / "genai_config.json").write_text(json.dumps(config))
    from test_genai import PROMPTS, genai_greedy, our_greedy

    assert genai_greedy(str(out), [PROMPTS[0]], 8) == [our_greedy(str(out), PROMPTS[0], 8)]


def test_cuda_graphs_can_be_turned_off(tmp_path):
    code, err, out = apply(tmp_path, "tiny-llama", "export onnx for cuda without cuda-graphs\n", "--no-verify")
    assert code == 0, err
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]


def test_fp16_quantized_layers_head_and_embedding(tmp_path):
    body = "quantize layers to int4\nquantize head to int4\nquantize embedding to int4\nexport onnx precision fp16\n"
    code, err, out = apply(tmp_path, "tiny-qwen2", body)
    assert code == 0, err
    report = json.loads((out / "surgery.json").read_text())
    assert report["quantization"]["embedding"]["shared_with_head"]
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    scales = {n.input[2] for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert {i.data_type for i in model.graph.initializer if i.name in scales} == {onnx.TensorProto.FLOAT16}
    moved = report["quantization"]["against_pytorch_fp32"]
    assert moved["reference_precision"] == "fp16" and np.isfinite(moved["max_abs_logit_diff"])


def test_bf16_is_refused_on_cpu_at_the_export_line(tmp_path):
    recipe = write(tmp_path / "r.surg", 'model "tiny-llama"\nexport onnx precision bf16\n')
    result = run_cli("check", recipe)
    assert result.code == 1
    assert "r.surg:2:" in result.err and "bf16 is not a CPU precision" in result.err and "for cuda" in result.err


def test_bf16_for_cuda_needs_the_gpu_to_verify_and_writes_bf16_without(tmp_path):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a GPU machine verifies bf16")
    code, err, _ = apply(tmp_path / "a", "tiny-llama", "export onnx precision bf16 for cuda\n")
    assert code == 1 and "cannot be verified on the CPU" in err and "--provider cuda" in err
    code, err, out = apply(tmp_path / "b", "tiny-llama", "export onnx precision bf16 for cuda\n", "--no-verify")
    assert code == 0, err
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert {i.data_type for i in model.graph.initializer if len(i.dims) == 2} == {onnx.TensorProto.BFLOAT16}


def test_the_cuda_provider_without_onnxruntime_gpu_is_a_message(tmp_path):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed")
    code, err, out = apply(tmp_path, "tiny-llama", "export onnx for cuda\n", "--provider", "cuda")
    assert code == 1
    assert "CUDA execution provider is not available" in err and "onnxruntime-gpu" in err
    assert not out.exists()


def test_run_and_eval_on_the_cuda_provider_without_onnxruntime_gpu_are_messages(tmp_path):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed")
    code, err, out = apply(tmp_path, "tiny-llama", "export onnx for cuda\n", "--no-verify")
    assert code == 0, err
    for command in (
        ["run", str(out), "--prompt", "Hi", "--provider", "cuda"],
        ["eval", str(out), "--window", "64", "--provider", "cuda"],
    ):
        result = run_cli(*command)
        assert result.code == 1, command
        assert "CUDA execution provider is not available" in result.err and "Traceback" not in result.err


def test_bf16_outputs_are_read_back_as_float32():
    """onnxruntime cannot give numpy a bfloat16 tensor; the runtime widens its words itself."""
    from onnx import TensorProto, helper

    from surgery.backend.runtime import float32_of

    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.BFLOAT16)],
        "cast",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([[1.0, -2.5, 3.140625], [1e-3, 65504.0, -0.0]], np.float32)
    (y,) = session.run_with_ort_values(["y"], {"x": ort.OrtValue.ortvalue_from_numpy(x)})
    assert y.data_type() == "tensor(bfloat16)"
    read = float32_of(y)
    assert read.dtype == np.float32 and read.shape == (2, 3)
    # bf16 keeps 8 significand bits: every value within 2^-8 relative of the input.
    np.testing.assert_allclose(read, x, rtol=2**-8)
    assert read[0, 0] == 1.0 and read[0, 1] == -2.5


def test_a_bf16_pytorch_trace_is_recorded_in_float32():
    """Verification of a bf16 export traces PyTorch in bf16; its logits are kept as float32."""
    import torch

    from conftest import tiny_graph
    from surgery.backend.verify import trace_reference

    graph = tiny_graph("tiny-llama")
    fp32 = trace_reference(graph, builtin.byte_tokenizer(), True, 4)
    graph.to_dtype(torch.bfloat16)
    bf16 = trace_reference(graph, builtin.byte_tokenizer(), True, 4)
    assert bf16.prefill_logits.dtype == np.float32
    assert bf16.step_logits.dtype == np.float32
    assert 0 < np.abs(bf16.prefill_logits - fp32.prefill_logits).max() < 0.5

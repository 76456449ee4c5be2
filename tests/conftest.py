"""Shared fixtures: running the CLI in-process and building tiny graphs."""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from surgery.cli import main
from surgery.ir.graph import DecoderGraph
from surgery.models import builtin
from surgery.models.index import ModelIndex

REPO = Path(__file__).resolve().parent.parent

def _tiny_index(name: str) -> ModelIndex:
    return ModelIndex.from_config(name, builtin.tiny_config(name))


# Dense tiny models (DeepSeek's with dense layers only among them), and the MoE ones whose experts
# take every expert statement (gpt-oss's and DeepSeek's do not: check refuses those).
_INDICES = {name: _tiny_index(name) for name in builtin.TINY_MODELS}
TINY = tuple(name for name, index in _INDICES.items() if not index.is_moe)
TINY_MOE = tuple(name for name, index in _INDICES.items() if index.is_moe and index.moe_router == "softmax_topk")


def attention_layers(name: str, layers: tuple[int, ...]) -> tuple[int, ...]:
    """`layers` for a statement about attention on tiny model `name`: a convolution layer (LFM2's:
    it has no attention) is replaced by the nearest attention layer not already chosen."""
    available = [i for i in _INDICES[name].attention_layers if i not in layers]
    chosen = []
    for layer in layers:
        if layer in _INDICES[name].conv_layers:
            layer = min(available, key=lambda i: (abs(i - layer), i))
            available.remove(layer)
        chosen.append(layer)
    return tuple(sorted(chosen))


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(*argv: str) -> CliResult:
    """Run `surgery argv...` in-process, capturing its output and exit code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exit_:  # argparse usage errors and --version
            code = int(exit_.code or 0)
    return CliResult(code, out.getvalue(), err.getvalue())


def applied(folder: Path, recipe: str) -> tuple[CliResult, dict]:
    """`surgery apply` of `recipe` (its text) into folder/out: the CLI's result and, where it
    wrote one, the output's surgery.json (else {})."""
    path = folder / "recipe.surg"
    path.write_text(recipe)
    result = run_cli("apply", str(path), "-o", str(folder / "out"))
    report = folder / "out" / "surgery.json"
    return result, (json.loads(report.read_text()) if report.exists() else {})


def prefill_and_decode_match(graph: DecoderGraph, folder: Path, tolerance: float = 1e-4):
    """Run 8 prompt tokens and one decode step through the export in `folder` and assert each
    step's logits are PyTorch's (`graph.forward` over the 9 tokens) within `tolerance`. Returns
    (ids, mask, positions, PyTorch's logits, the decode step's output)."""
    import numpy as np
    import torch

    from surgery.backend.runtime import OnnxCausalLM

    model = OnnxCausalLM(str(folder))
    ids = torch.randint(0, graph.index.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    mask, positions = torch.ones_like(ids), torch.arange(9)[None]
    reference = graph.forward(ids, mask, positions).numpy()
    prefill = model.step(ids[:, :8].numpy(), mask[:, :8].numpy(), positions[:, :8].numpy())
    decode = model.step(ids[:, 8:].numpy(), mask.numpy(), positions[:, 8:].numpy(), prefill.present)
    assert np.abs(prefill.logits - reference[:, :8]).max() < tolerance
    assert np.abs(decode.logits[:, -1] - reference[:, -1]).max() < tolerance
    return ids, mask, positions, reference, decode


def tiny_graph(name: str) -> DecoderGraph:
    """A fresh decoder graph over the seeded tiny built-in `name`."""
    model = builtin.tiny_model(name)
    return DecoderGraph(model, ModelIndex.from_config(name, model.config))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run the test inside a temporary working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return os.fspath(path)

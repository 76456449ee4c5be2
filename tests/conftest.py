"""Shared fixtures: running the CLI in-process and building tiny graphs."""

from __future__ import annotations

import contextlib
import io
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

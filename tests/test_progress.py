"""Counted progress: work over a couple of seconds says how far it is and how long is left, on a
terminal as one updating line and in a log as a few lines; the layer iterator counts layers."""

from __future__ import annotations

import io

import pytest

from surgery import progress as progress_module
from surgery.models import builtin
from surgery.models.index import ModelIndex
from surgery.progress import ProgressLines, advance, counted


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(progress_module.time, "perf_counter", clock)
    return clock


def test_off_a_terminal_long_work_shows_its_count_and_the_time_left(clock):
    stream = io.StringIO()
    lines = ProgressLines(stream)
    with counted(lines, "importance: similarity", 60, "layer"):
        for _ in range(60):
            clock.now += 1.0  # a layer a second
            advance("layer")
    text = stream.getvalue().splitlines()
    assert len(text) == 4
    assert text[0].endswith("importance: similarity")
    assert text[1].endswith("importance: similarity: 5/60 layers, ~55s left")  # the first count after 5 s
    assert text[2].endswith("importance: similarity: 35/60 layers, ~25s left")  # then every 30 s
    assert text[3] == "[  60.0s] importance: similarity: 60/60 layers in 1:00"


def test_off_a_terminal_quick_work_is_one_line(clock):
    stream = io.StringIO()
    with counted(ProgressLines(stream), "exporting ONNX", 6, "layer"):
        for _ in range(6):
            clock.now += 0.1
            advance("layer")
    assert stream.getvalue().count("\n") == 1


def test_on_a_terminal_a_bar_updates_in_place(clock):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    with counted(ProgressLines(stream), "search line 5: layers, bisect", 4, "candidate"):
        advance("candidate", 2)
        advance("candidate", 2)
    assert "search line 5: layers, bisect: 4/4 candidates" in stream.getvalue()
    assert "\r" in stream.getvalue()


def test_counters_nest_by_unit_and_a_plain_callable_gets_the_phase_line():
    seen, updates = [], []
    with counted(seen.append, "eval", 3, "window"):
        advance("window")  # a plain callable shows nothing more
    assert seen == ["eval"]

    class Recording:
        def __call__(self, message):
            pass

        def counter(self, description, total, unit):
            import contextlib

            return contextlib.nullcontext(lambda n: updates.append((unit, n)))

    with counted(Recording(), "reference", 2, "layer"), counted(Recording(), "eval", 3, "window"):
        advance("layer")
        advance("window", 2)
        advance("candidate")  # nobody counts candidates: nothing happens
    assert updates == [("layer", 1), ("window", 2)]


def test_the_decoder_graphs_layer_iterator_counts_its_layers():
    from surgery.ir.graph import DecoderGraph

    model = builtin.tiny_model("tiny-llama")
    graph = DecoderGraph(model, ModelIndex.from_config("tiny-llama", model.config))
    counted_layers = []

    class Recording:
        def __call__(self, message):
            pass

        def counter(self, description, total, unit):
            import contextlib

            return contextlib.nullcontext(counted_layers.append)

    with counted(Recording(), "a pass", len(graph.layers), "layer"):
        for _ in graph.each_layer_materialized():
            pass
    assert counted_layers == [1] * len(graph.layers)


def test_a_counter_whose_work_starts_late_estimates_from_its_own_units(clock):
    """`eval --against`: the windows are scored only after the reference's layers; the time left
    is made of windows, not of the wait before the first one."""
    stream = io.StringIO()
    with counted(ProgressLines(stream), "perplexity", 8, "window"):
        clock.now = 30.0  # the first window comes after 30 s of other work
        advance("window")
        for _ in range(7):
            clock.now += 10.0
            advance("window")
    text = stream.getvalue().splitlines()
    assert text[1].endswith("perplexity: 1/8 windows")  # one unit: no rate yet
    assert text[2].endswith("perplexity: 4/8 windows, ~40s left")  # 10 s a window since the first
    assert text[-1].endswith("perplexity: 8/8 windows in 1:40")

"""Budget searches: `as many as fit { ... }` finds the largest count that keeps every budget.

pattern: a recipe with a searched statement on a tiny model; replacement: the settled recipe
(the statement at the count found); comparison: the answer of `search exhaustive` (every count
measured), on measurements that are monotone by construction (a fake executor, every limit and
worker count) and on real ones (sizes of real int8/int4 exports, process pool and Ray).
"""

from __future__ import annotations

import json
import re

import pytest

from conftest import run_cli
from surgery.diagnostics import RecipeError
from surgery.front.parser import parse_source
from surgery.front.syntax import unparse
from surgery.pipeline import compile_recipe
from surgery.search import executors
from surgery.search.engine import SearchSettings
from surgery.source import Source

DROP = """model "tiny-llama"
calibrate on "wikitext-2-valid" samples 4 length 32
drop attention least important by similarity as many as fit {{
    perplexity on "wikitext-2-test" max-increase {limit}% tokens 256 window 64
    search {method}{extra}
}}
"""

MIXED = """model "tiny-llama"
quantize layers by zd as many as fit {{
    most important -> int8
    rest -> int4
    size at most {mb} MB
    search {method}
}}
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


class FakeExecutor:
    """Measures a candidate from its recipe text: perplexity rises by `rise[count]` percent."""

    def __init__(self, rise: list[float], workers: int):
        self.rise, self.workers, self.batches = rise, workers, []

    def run(self, jobs):
        self.batches.append(len(jobs))
        results = []
        for job in jobs:
            found = re.search(r"least important (\d+) by", job.text) or re.search(
                r"drop attention layers ([\d, ]+)", job.text
            )
            count = 0 if found is None else (int(found[1]) if "least" in found[0] else len(found[1].split(",")))
            (key,) = job.reference
            increase = self.rise[count] / 100
            perplexity = job.reference[key] * (1 + increase)
            quality = {key: {"perplexity": perplexity, "increase": increase, "kl": None, "top1": None}}
            results.append({"bytes": 1000 - count, "bits": 32.0, "quality": quality, "texts": job.text})
        return results

    def close(self):
        pass


def fake(monkeypatch, rise: list[float], workers: int) -> FakeExecutor:
    executor = FakeExecutor(rise, workers)
    monkeypatch.setattr(executors, "make_executor", lambda kind, count: executor)
    return executor


def test_budget_syntax_round_trips():
    text = (
        DROP.format(limit=10, method="exhaustive", extra="\n    decode at most 12 ms per token prompt 128")
        + (MIXED.format(mb=150, method="bisect").split("\n", 1)[1])
    )
    recipe = parse_source(Source("r.surg", text))
    again = parse_source(Source("again.surg", unparse(recipe)))
    assert again == recipe
    assert "as many as fit {" in unparse(recipe) and "size at most 150 MB" in unparse(recipe)


# A monotone rise with a plateau, and the limits that put the answer at every count.
RISE = [0.0, 1.0, 3.0, 3.0, 7.0, 12.0]


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("limit", [0.5, 1, 2.9, 3, 5, 8, 11.9, 40])
def test_bisection_gives_the_exhaustive_answer(limit, workers, tmp_path, cache, monkeypatch):
    answers = {}
    built = {}
    for method in ("exhaustive", "bisect"):
        executor = fake(monkeypatch, RISE, workers)
        path = write(tmp_path, f"{method}.surg", DROP.format(limit=limit, method=method, extra=""))
        compiled = compile_recipe(path, verify=False, search=SearchSettings(workers=workers, use_cache=False))
        (search,) = compiled.searches
        answers[method] = search.answer.count
        built[method] = sum(executor.batches)
        assert max(executor.batches) <= workers
    expected = max(count for count, rise in enumerate(RISE) if rise <= limit)
    assert answers == {"exhaustive": expected, "bisect": expected}
    assert built["exhaustive"] == len(RISE)
    assert built["bisect"] < len(RISE) or workers > 1


def test_the_settled_plan_drops_the_answer_and_points_at_the_recipe(tmp_path, cache, monkeypatch):
    fake(monkeypatch, RISE, 1)
    path = write(tmp_path, "r.surg", DROP.format(limit=5, method="bisect", extra=""))
    compiled = compile_recipe(path, verify=False)
    (step,) = [s for s in compiled.plan.steps if s.action == "drop attention"]
    assert len(step.layers) == 3 and step.source.line == 3  # the user's line, not a generated one
    assert step.parameters["selected_by"].startswith("least important 3 by similarity")


def test_a_budget_no_count_meets_is_an_error_at_the_block(tmp_path, cache, monkeypatch):
    fake(monkeypatch, [5.0, 6, 7, 8, 9, 10], 1)
    path = write(tmp_path, "r.surg", DROP.format(limit=1, method="bisect", extra=""))
    with pytest.raises(RecipeError) as raised:
        compile_recipe(path, verify=False)
    (diagnostic,) = raised.value.diagnostics
    assert (diagnostic.span.line, diagnostic.span.column) == (3, 46)
    assert "no count meets every budget: the closest, 0 attention layers dropped, misses" in diagnostic.message
    assert "(measured +5.00%)" in diagnostic.message


def test_a_second_run_reads_every_candidate_from_the_cache(tmp_path, cache, monkeypatch):
    fake(monkeypatch, RISE, 1)
    path = write(tmp_path, "r.surg", DROP.format(limit=5, method="exhaustive", extra=""))
    first = compile_recipe(path, verify=False).searches[0]
    assert first.built() == len(RISE)

    def no_executor(kind, workers):
        raise AssertionError("a cached search built a candidate")

    monkeypatch.setattr(executors, "make_executor", no_executor)
    second = compile_recipe(path, verify=False).searches[0]
    assert second.built() == 0 and second.answer.count == first.answer.count
    assert [c.measured["values"] for c in second.candidates] == [c.measured["values"] for c in first.candidates]

    # The same recipe in another folder (its texts the same by content) reads the same candidates.
    (tmp_path / "elsewhere").mkdir()
    moved = write(tmp_path / "elsewhere", "copy.surg", DROP.format(limit=5, method="exhaustive", extra=""))
    assert compile_recipe(moved, verify=False).searches[0].built() == 0


def test_rescore_scores_again_after_each_drop(tmp_path, cache, monkeypatch):
    import numpy as np

    from surgery.architectures.conformance import checked_graph
    from surgery.calibration import calibration_tokens
    from surgery.data import resolve_text
    from surgery.importance.measures import residual_statistics
    from surgery.models.loading import load_model
    from surgery.passes import DropAttention, run_pass

    fake(monkeypatch, RISE, 1)
    path = write(tmp_path, "r.surg", DROP.format(limit=3, method="exhaustive", extra="\n    rescore"))
    compiled = compile_recipe(path, verify=False)
    (search,) = compiled.searches
    assert search.answer.count == 3
    chosen = {c.count: c.layers for c in search.candidates}
    assert all(len(chosen[k]) == k for k in chosen)
    # The plan drops the re-scored layers, written out.
    (step,) = [s for s in compiled.plan.steps if s.action == "drop attention"]
    assert step.layers == chosen[3]
    # The second layer to go is the least important on the model without the first.
    checked = compiled.checked
    model, tokenizer, weights = load_model(checked.spec, lambda _: None, lazy=True)
    graph = checked_graph(model, checked.index, weights)
    tokens = calibration_tokens(tokenizer, checked.calibration, resolve_text(checked.calibration.data))
    (first,) = chosen[1]
    run_pass(DropAttention(layers=(first,)), graph)
    attention = residual_statistics(graph, tokens)["attention"]
    remaining = [layer for layer in range(checked.index.num_layers) if layer != first]
    second = remaining[int(np.argmax([attention[layer] for layer in remaining]))]
    assert set(chosen[2]) == {first, second}


def _real(tmp_path, method: str, mb: float, executor: str = "process"):
    path = write(tmp_path, f"{method}-{executor}.surg", MIXED.format(mb=mb, method=method))
    settings = SearchSettings(executor=executor, workers=2, use_cache=False)
    return compile_recipe(path, verify=False, search=settings).searches[0]


@pytest.mark.slow
def test_real_size_search_matches_the_sweep_in_a_process_pool_and_on_ray(tmp_path, cache):
    """int8 on the most important layers, int4 on the rest, under a size budget: real exports,
    real sizes, which grow with every int8 layer, so bisection must find the sweep's count."""
    sweep = _real(tmp_path, "exhaustive", mb=1000)
    sizes = {c.count: c.measured["bytes"] / 1e6 for c in sweep.candidates}
    assert all(sizes[k] < sizes[k + 1] for k in range(len(sizes) - 1))
    limit = round((sizes[3] + sizes[4]) / 2, 4)  # room for exactly 3 layers at int8
    bisected = _real(tmp_path, "bisect", mb=limit)
    assert bisected.answer.count == 3 and bisected.built() < len(sizes)
    pytest.importorskip("ray")
    on_ray = _real(tmp_path, "bisect", mb=limit, executor="ray")
    assert on_ray.answer.count == 3
    assert {c.count: c.measured["bytes"] for c in on_ray.candidates} == {
        c.count: c.measured["bytes"] for c in bisected.candidates
    }


@pytest.mark.slow
def test_apply_writes_search_json_and_the_plot(tmp_path, cache):
    path = write(tmp_path, "r.surg", MIXED.format(mb=1000, method="bisect"))
    result = run_cli("apply", path, "-o", str(tmp_path / "out"), "--no-verify")
    assert result.code == 0, result.err
    assert "search (line 2, bisect): layers at int8 = 6" in result.out
    content = json.loads((tmp_path / "out" / "search.json").read_text())
    (search,) = content["searches"]
    assert search["answer"]["count"] == 6 and search["counts_possible"] == 7
    assert (
        "quantize layers by zd {" in content["settled_recipe"]
        and "most important 6 -> int8" in content["settled_recipe"]
    )
    assert (tmp_path / "out" / "search.png").read_bytes().startswith(b"\x89PNG")
    report = json.loads((tmp_path / "out" / "surgery.json").read_text())
    assert report["search"]["answers"][0]["count"] == 6

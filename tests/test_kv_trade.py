"""The joint KV cache search: `quantize kv-cache by <source> as many as fit { ...; or drop attention
least important; kv-cache at most X at N tokens; <quality> }`.

pattern: a searched KV cache group with `or drop attention`; replacement: the settled recipe
(the least important attention layers dropped, the most important of the rest at int8, the
others at int4); comparison: the budget's arithmetic for each number of drops, the best quality
among the measured combinations (a fake executor whose quality is known), and a real `apply`
whose cache keeps the budget.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import run_cli
from surgery.front.parser import parse_source
from surgery.front.syntax import unparse
from surgery.pipeline import compile_recipe
from surgery.search import executors
from surgery.search.engine import SearchSettings
from surgery.search.trade import TradePoint, frontier
from surgery.source import Source

# tiny-llama: 6 layers of 2 key/value heads of 16, so a layer's cache is 64 bytes a token at
# int8 and 32 at int4. 0.05 MB at 256 tokens is 195.3 bytes a token: 6 layers at int4 (192).
TRADE = """model "tiny-llama"
calibrate on "wikitext-2-valid" samples 8 length 64
quantize kv-cache by similarity as many as fit {{
    most important -> int8
    rest -> int4
    or drop attention least important
    kv-cache at most {mb} MB at 256 tokens
    perplexity on "wikitext-2-test" max-increase {limit}% tokens 256 window 64
}}
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))


def _statement(text: str):
    return parse_source(Source("t.surg", text)).statements[2]


def test_the_syntax_round_trips():
    recipe = parse_source(Source("t.surg", TRADE.format(mb=0.05, limit=5)))
    assert "    or drop attention least important\n" in unparse(recipe)
    assert parse_source(Source("again.surg", unparse(recipe))) == recipe
    text = TRADE.format(mb=0.05, limit=5).replace("important\n", "important up to 3\n")
    bounded = parse_source(Source("t.surg", text))
    assert "or drop attention least important up to 3\n" in unparse(bounded)
    assert parse_source(Source("again.surg", unparse(bounded))) == bounded


def test_each_number_of_drops_buys_the_widest_caches_the_budget_holds():
    statement = _statement(TRADE.format(mb=0.05, limit=5))
    # d drops leave 6 - d layers: (6 - d) * 32 + n * 32 <= 195.3 bytes, n int8 layers.
    assert frontier(statement, 6, 2, 16, 2048) == [
        TradePoint(0, 0, 6, 192), TradePoint(1, 1, 5, 192), TradePoint(2, 2, 4, 192), TradePoint(3, 3, 3, 192)
    ]  # fmt: skip
    # 0.03 MB (117.2 bytes a token): three drops before int4 fits, and it stops when all are int8.
    assert frontier(_statement(TRADE.format(mb=0.03, limit=5)), 6, 2, 16, 2048) == [
        TradePoint(3, 0, 3, 96), TradePoint(4, 1, 2, 96), TradePoint(5, 1, 1, 64)
    ]  # fmt: skip
    # A budget every layer fits at int8: nothing to trade, no drop.
    assert frontier(_statement(TRADE.format(mb=1, limit=5)), 6, 2, 16, 2048) == [TradePoint(0, 6, 6, 384)]
    assert frontier(_statement(TRADE.format(mb=0.001, limit=5)), 6, 2, 16, 2048) == []
    # `up to 2`: no more drops than that, even where more would widen caches.
    bounded = _statement(TRADE.format(mb=0.05, limit=5).replace("least important\n", "least important up to 2\n"))
    assert bounded.trade.most == 2 and [p.dropped for p in frontier(bounded, 6, 2, 16, 2048)] == [0, 1, 2]
    tight = _statement(TRADE.format(mb=0.03, limit=5).replace("least important\n", "least important up to 2\n"))
    assert [p.dropped for p in frontier(tight, 2, 2, 16, 2048)] == [0, 1]  # and one layer keeps attention


class QualityByCombination:
    """Measures a candidate from its text: KV bytes from its widths, and a perplexity increase
    that is `drop_cost` a dropped layer less `int8_gain` an int8 layer."""

    def __init__(self, drop_cost: float, int8_gain: float):
        self.drop_cost, self.int8_gain, self.texts = drop_cost, int8_gain, []

    def run(self, jobs):
        results = []
        for job in jobs:
            self.texts.append(job.text)
            dropped = re.search(r"least important (\d+) by", job.text)
            dropped = int(dropped[1]) if dropped else 0
            wide = re.search(r"most important (\d+) -> int8", job.text)
            kept = 6 - dropped
            wide = int(wide[1]) if wide else (kept if "rest -> int8" in job.text else 0)
            (key,) = job.reference
            increase = (self.drop_cost * dropped - self.int8_gain * wide + 4.0) / 100
            quality = {key: {"perplexity": job.reference[key] * (1 + increase), "increase": increase,
                             "kl": None, "top1": None}}  # fmt: skip
            results.append({"bytes": 1000, "bits": 32.0, "quality": quality,
                            "kv_bytes_per_token": wide * 64 + (kept - wide) * 32})  # fmt: skip
        return results

    def close(self):
        pass


@pytest.mark.parametrize(("drop_cost", "int8_gain", "answer"), [(1.0, 2.0, 3), (3.0, 2.0, 0), (2.0, 2.0, 0)])
def test_the_answer_is_the_measured_combination_with_the_best_quality(drop_cost, int8_gain, answer, tmp_path, cache,
                                                                       monkeypatch):  # fmt: skip
    executor = QualityByCombination(drop_cost, int8_gain)
    monkeypatch.setattr(executors, "make_executor", lambda kind, count: executor)
    path = tmp_path / "t.surg"
    path.write_text(TRADE.format(mb=0.05, limit=5))
    compiled = compile_recipe(str(path), verify=False, search=SearchSettings(workers=1))
    (search,) = compiled.searches
    assert [c.count for c in search.candidates] == [0, 1, 2, 3] and len(executor.texts) == 4
    assert search.answer.count == answer  # ties (2 against 2) go to fewer drops
    steps = {s.action: s for s in compiled.plan.steps}
    dropped = steps["drop attention"].layers if answer else ()
    assert len(dropped) == answer and (not answer or steps["drop attention"].source.line == 6)
    widths = {layer: s.format.bits for s in compiled.plan.steps if s.action == "quantize kv-cache"
              for layer in s.layers}  # fmt: skip
    assert sorted(widths) == sorted(set(range(6)) - set(dropped))  # every kept layer has a width
    assert sorted(widths.values()) == [4] * (6 - 2 * answer) + [8] * answer


def test_a_budget_no_combination_keeps_is_an_error_at_the_block(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(executors, "make_executor", lambda kind, count: QualityByCombination(1.0, 0.0))
    path = tmp_path / "t.surg"
    path.write_text(TRADE.format(mb=0.05, limit=1))  # 4% at best
    result = run_cli("plan", str(path))
    assert result.code != 0 and "no count meets every budget: the closest, 0 attention layers dropped" in result.err
    path.write_text(TRADE.format(mb=0.001, limit=5))
    result = run_cli("plan", str(path))
    assert result.code != 0 and "no number of dropped attention layers fits `kv-cache at most 0.001 MB" in result.err
    assert "t.surg:7:" in result.err


@pytest.mark.parametrize(("change", "message"), [
    (("    kv-cache at most 0.05 MB at 256 tokens\n", ""), "`or drop attention` needs a kv-cache budget"),
    (('    perplexity on "wikitext-2-test" max-increase 5% tokens 256 window 64\n', "    size at most 1 GB\n"),
     "`or drop attention` needs a quality budget"),
    (("or drop attention least", "or drop attention most"), "only the least important attention layers"),
    (("least important\n    kv", "least important up to 0\n    kv"), "`up to` needs at least one drop"),
    (("\n}\n", "\n    rescore\n}\n"), "`rescore` does not apply with `or drop attention`"),
    ((" as many as fit {", " {"), "budgets in a grouped quantize need `as many as fit`"),
])  # fmt: skip
def test_check_says_what_the_trade_needs(change, message, tmp_path):
    path = tmp_path / "t.surg"
    path.write_text(TRADE.format(mb=0.05, limit=5).replace(*change))
    result = run_cli("check", str(path))
    assert result.code != 0 and message in result.err, result.err


@pytest.mark.slow
def test_apply_drops_attention_and_widens_caches_within_the_budget(tmp_path, cache):
    path = tmp_path / "t.surg"
    path.write_text(TRADE.format(mb=0.05, limit=200))
    result = run_cli("apply", str(path), "-o", str(tmp_path / "out"))
    assert result.code == 0, result.err
    assert "int8 caches" in result.out  # the search table's column
    out = Path(tmp_path, "out")
    report = json.loads((out / "surgery.json").read_text())
    search = json.loads((out / "search.json").read_text())["searches"][0]
    assert [c["count"] for c in search["candidates"]] == [0, 1, 2, 3]
    assert [c["kv_first_rule_layers"] for c in search["candidates"]] == [0, 1, 2, 3]
    answer = search["answer"]["count"]
    best = min(search["candidates"], key=lambda c: (c["values"][next(k for k in c["values"] if "perplexity" in k)],
                                                    c["count"]))  # fmt: skip
    assert answer == best["count"]
    assert report["kv_cache"]["after"]["bytes_per_token"] * 256 <= 50_000
    assert len(report["kv_cache"]["slots"]) == 6 - answer and report["verification"]["passed"]
    bits = sorted(f["bits"] for f in report["kv_cache"]["formats"].values())
    assert bits == [4] * (6 - 2 * answer) + [8] * answer

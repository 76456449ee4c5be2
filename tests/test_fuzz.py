"""Fuzzing `surgery check` (tests/fuzzer.py): generated and mutated recipes and importance files
never crash the checker, never put a diagnostic on the wrong line, and never take long.

CI runs 480 cases; `python benchmarks/fuzz_check.py` runs 10,000 and prints the counts by outcome.
"""

from __future__ import annotations

import collections

import pytest
from fuzzer import GENERATORS, make_case, prepare_folder, run_case, warm_up

CASES = 480
# Loose on purpose (a shared 2-core CI machine); benchmarks/fuzz_check.py holds cases to 1 s.
SECONDS = 5.0


@pytest.fixture(scope="module")
def folder(tmp_path_factory, monkeypatch_module):
    path = tmp_path_factory.mktemp("fuzz")
    prepare_folder(path)
    warm_up(path)
    return path


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")  # a case may name any hub id
        yield patch


def test_cases_are_reproducible():
    assert make_case(123).recipe == make_case(123).recipe
    assert {make_case(n).generator for n in range(40)} == set(GENERATORS)


@pytest.mark.parametrize("block", range(8))
def test_fuzzed_recipes_end_in_a_message(folder, block):
    outcomes: collections.Counter = collections.Counter()
    problems = []
    per_block = CASES // 8
    for number in range(block * per_block, (block + 1) * per_block):
        result = run_case(make_case(number), folder)
        outcomes[result.outcome] += 1
        if result.outcome in ("crash", "wrong-line") or result.seconds > SECONDS:
            problems.append((number, result.case.generator, result.outcome, round(result.seconds, 2), result.detail))
    assert not problems, problems
    assert outcomes["error"] > 0

"""`surgery run`'s token choice: greedy by default, sampled with a temperature and top-p, seeded."""

from __future__ import annotations

import numpy as np

from conftest import run_cli, write
from surgery.backend.sampling import token_chooser

LOGITS = np.log(np.array([0.05, 0.6, 0.3, 0.05]))


def test_greedy_is_the_argmax():
    assert token_chooser()(LOGITS) == 1


def test_a_tight_nucleus_leaves_only_the_most_likely_token():
    choose = token_chooser(temperature=1.0, top_p=0.5, seed=1)
    assert {choose(LOGITS) for _ in range(50)} == {1}


def test_sampling_follows_the_distribution_and_repeats_with_its_seed():
    draws = [token_chooser(1.0, 1.0, seed=7) for _ in range(2)]
    first, second = ([choose(LOGITS) for _ in range(2000)] for choose in draws)
    assert first == second
    shares = np.bincount(first, minlength=4) / len(first)
    assert np.allclose(shares, [0.05, 0.6, 0.3, 0.05], atol=0.04)


def test_run_samples_with_a_seed(in_tmp):
    recipe = write(in_tmp / "r.surg", 'model "tiny-llama"\ndrop attention layers 1\n')
    assert run_cli("apply", recipe, "-o", "out", "--no-verify").code == 0
    args = ("run", "out", "--prompt", "hello", "--max-new-tokens", "8", "--temperature", "1.5", "--seed")
    runs = [run_cli(*args, seed).out for seed in ("1", "1", "2")]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert run_cli("run", "out", "--prompt", "x", "--top-p", "0").code == 2  # a usage error

"""Layer-set helpers: even spacing and compact formatting."""

from __future__ import annotations

import pytest

from surgery.layers import evenly_spaced, format_layers


@pytest.mark.parametrize("layers", [4, 6, 30, 32, 80])
def test_evenly_spaced_never_first_or_last_and_distinct(layers):
    for count in range(1, layers - 1):
        chosen = evenly_spaced(count, layers)
        assert len(chosen) == count == len(set(chosen))
        assert 0 not in chosen and layers - 1 not in chosen
        assert chosen == sorted(chosen)


def test_evenly_six_of_thirty():
    assert evenly_spaced(6, 30) == [4, 8, 12, 17, 21, 25]


def test_format_layers():
    assert format_layers([29, 20, 21, 22, 3, 5, 4]) == "3..5, 20..22, 29"
    assert format_layers([]) == "none"

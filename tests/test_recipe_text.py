"""Recipe files as bytes: UTF-8 with errors at the offending byte, a BOM accepted, lines broken at
`\\n`, `\\r\\n` and `\\r` only, bounded sizes and numbers, and checking in linear time."""

from __future__ import annotations

import time

import pytest

from conftest import run_cli


def _check(tmp_path, data: bytes):
    recipe = tmp_path / "r.surg"
    recipe.write_bytes(data)
    return run_cli("check", str(recipe)), str(recipe)


def test_a_bom_is_accepted(tmp_path):
    result, _ = _check(tmp_path, '\ufeffmodel "tiny-llama"\ndrop attention layers 1\n'.encode())
    assert result.code == 0, result.err


def test_a_bom_does_not_shift_columns(tmp_path):
    result, path = _check(tmp_path, '\ufeffmodel "tiny-llama"\ndrop attention layers 9\n'.encode())
    assert f"{path}:2:23: error: layer 9 is out of range" in result.err


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r"])
def test_every_line_ending_gives_the_same_positions(tmp_path, ending):
    text = ending.join(['model "tiny-llama"', "# a comment", "drop attention layers 1, 99"]) + ending
    result, path = _check(tmp_path, text.encode())
    assert result.code == 1
    assert f"{path}:3:26: error: layer 99 is out of range" in result.err
    assert "3 | drop attention layers 1, 99\n" in result.err


@pytest.mark.parametrize("separator", ["\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029"])
def test_other_separators_do_not_break_lines(tmp_path, separator):
    # Python's str.splitlines breaks at these; the recipe language does not, so the error stays
    # on the line an editor shows, and the character is shown visibly.
    text = f'model "tiny-llama"\n# note{separator}still the comment line\ndrop attention layers 99\n'
    result, path = _check(tmp_path, text.encode())
    assert result.code == 1
    assert f"{path}:3:23: error: layer 99 is out of range" in result.err
    outside = f'model "tiny-llama"\ndrop attention{separator} layers 1\n'
    result, path = _check(tmp_path, outside.encode())
    assert result.code == 1 and f"{path}:2:15: error: unexpected" in result.err
    assert "2 | drop attention\ufffd layers 1" in result.err


def test_invalid_utf8_is_an_error_at_its_byte(tmp_path):
    result, path = _check(tmp_path, b'model "tiny-llama"\ndrop attention layers 1 \xff\xfe\n')
    assert result.code == 1
    assert f"{path}:2:25: error: recipe is not valid UTF-8: byte 0xff cannot start or continue a character" in (
        result.err
    )
    assert "2 | drop attention layers 1 \ufffd\ufffd" in result.err and "Traceback" not in result.err


def test_a_folder_or_a_device_as_the_recipe_is_a_message(tmp_path):
    folder = run_cli("check", str(tmp_path))
    assert folder.code == 1 and "is a folder, not a file" in folder.err
    device = run_cli("check", "/dev/zero")
    assert device.code == 1 and "is not a regular file" in device.err


def test_recipes_are_limited_in_size(tmp_path):
    result, _ = _check(tmp_path, b'model "tiny-llama"\n' + b"# padding\n" * 200_000)
    assert result.code == 1 and "is larger than 1 MiB" in result.err


@pytest.mark.parametrize(
    "statement, message",
    [
        ("drop attention layers " + "9" * 5000, "is too large"),
        ("drop attention layers 1, " + "7" * 40, "is too large"),
        ('calibrate on "valid" samples 99999999999 length 4', "is too large"),
        ("fuse layer 3 into head weight 0." + "5" * 2000, "is too long"),
        ("merge experts layers * to 2 rank 12345678901%", "is too large"),
    ],
)
def test_numbers_beyond_any_sensible_value_are_diagnostics(tmp_path, statement, message):
    result, path = _check(tmp_path, f'model "tiny-mixtral"\n{statement}\n'.encode())
    assert result.code == 1 and message in result.err and "Traceback" not in result.err
    assert f"{path}:2:" in result.err


def test_leading_zeros_are_not_large(tmp_path):
    result, _ = _check(tmp_path, b'model "tiny-llama"\ndrop attention layers 00000000000001\n')
    assert result.code == 0, result.err


def test_overlong_names_are_messages(tmp_path):
    for statement in (f'model "{"m" * 5000}"', f'calibrate on "{"t" * 5000}"', 'model "a\x00b"'):
        result, _ = _check(tmp_path, f"{statement}\ndrop attention layers 1\n".encode())
        assert result.code == 1 and "Traceback" not in result.err and "internal error" not in result.err


def test_control_characters_in_a_recipe_are_not_echoed_raw(tmp_path):
    result, _ = _check(tmp_path, b'model "tiny-llama"\n\x1b[2Jdrop attention layers 1\n')
    assert result.code == 1 and "\x1b" not in result.err


def _timed_check(tmp_path, text: str) -> tuple[float, int]:
    recipe = tmp_path / "big.surg"
    recipe.write_text(text)
    start = time.perf_counter()
    code = run_cli("check", str(recipe)).code
    return time.perf_counter() - start, code


def test_checking_is_linear_in_the_recipe(tmp_path):
    # Each of these took 6 to 22 s when checking was quadratic; linear, each is a fraction of a
    # second on a laptop. The bound is loose for slow CI machines; benchmarks/fuzz_check.py
    # measures against 1 s.
    (tmp_path / "warm.surg").write_text('model "tiny-llama"\n')
    run_cli("check", str(tmp_path / "warm.surg"))
    items = ", ".join(f"{i % 30}..{i % 30}" if i % 3 else str(i % 30) for i in range(30_000))
    seconds, code = _timed_check(tmp_path, f'model "smollm2-135m"\ndrop attention layers {items}\n')
    assert code == 1 and seconds < 5, seconds  # the list selects every layer: an error, with a warning
    bad = "".join(f"drop attention layers {100 + i}\n" for i in range(10_000))
    seconds, code = _timed_check(tmp_path, 'model "tiny-llama"\n' + bad)
    assert code == 1 and seconds < 5, seconds
    misspelt = "".join(f"drop attentoin layers {i}\n" for i in range(10_000))
    seconds, code = _timed_check(tmp_path, 'model "tiny-llama"\n' + misspelt)
    assert code == 1 and seconds < 5, seconds

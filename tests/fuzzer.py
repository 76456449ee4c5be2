"""A seeded recipe fuzzer: generated and mutated recipes (and importance files) through `surgery check`.

Cases come from four generators, chosen per case by a seeded RNG so a case number always
gives the same bytes:

- `grammar`: statements built from the recipe grammar with hostile values: numbers from 0 to
  thousands of digits, selector lists of up to 30,000 items, paths to devices, folders, the
  process environment, overlong and NUL-bearing names, misspelt keywords, deep blocks;
- `bytes`: byte-level mutations of the examples and golden recipes (flips, insertions of
  `\\x0b`, `\\x0c`, U+0085, U+2028, BOMs, lone `\\r`, invalid UTF-8, NUL; duplicated and spliced
  lines);
- `tokens`: a seed recipe with one number or string replaced by a hostile one;
- `importance`: a recipe ranking by an importance file that is itself mutated (truncated,
  deeply nested, huge numbers, wrong types, not UTF-8, not JSON at all).

`run_case` runs one case in-process through `surgery.cli.main` and classifies it: `ok` (exit
0), `error` (exit 1 with a message), `usage` (2), `crash` (exit 4, an exception escaping
`main`, a traceback on stderr, or exit 1 with nothing said), `wrong-line` (a diagnostic whose
`file:line:col` or quoted line does not match the recipe under the `\\n`/`\\r\\n`/`\\r` rule),
and `slow` (over the time limit) is recorded beside the outcome.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEED_RECIPES = sorted(
    [*REPO.glob("examples/*.surg"), *REPO.glob("tests/golden/errors/*.surg"), *REPO.glob("tests/golden/plans/*.surg")]
)
SEED_JSON = sorted(REPO.glob("tests/golden/errors/*.json"))
TINY = ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral", "tiny-mixtral", "tiny-olmoe", "tiny-qwen2-moe")
MODELS = (*TINY, "smollm2-135m")
GENERATORS = ("grammar", "bytes", "tokens", "importance")

_SPECIAL = [
    b"\x0b", b"\x0c", b"\x1c", b"\x1d", b"\x1e", "\x85".encode(), "\u2028".encode(), "\u2029".encode(),
    "\ufeff".encode(), b"\r", b"\r\n", b"\n", b"\t", b"\x00", b"\xff", b"\xc3", b"\xe2\x82", b"\xf0\x9f\x98",
    b"\x1b[2J", b"{", b"}", b"#", b'"', b"..", b"%", b"-", b"*", b",", "é".encode(), "字".encode(),
]  # fmt: skip


def _number(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.4:
        return str(rng.randint(0, 40))
    if kind < 0.6:
        return str(rng.choice([-1, -30, 31, 63, 64, 65, 100, 255, 256, 257, 4096, 10**6, 2**31, 2**63, 10**9]))
    if kind < 0.75:
        return str(rng.randint(1, 9)) * rng.choice([10, 20, 100, 4301, 5000])  # past int()'s digit limit
    if kind < 0.85:
        return "0" * rng.randint(10, 3000) + str(rng.randint(0, 9))
    if kind < 0.95:
        return f"{rng.randint(0, 9)}.{'5' * rng.choice([1, 3, 40, 2000])}"
    return rng.choice(["-0", "+5", "1e9", "0x10", "1_000", "٣", "NaN", ""])


def _path(rng: random.Random) -> str:
    return rng.choice(
        [
            "/dev/zero", "/dev/null", "/proc/self/environ", "/etc/passwd", "/", ".", "..", "/root", "/tmp",
            "x" * rng.choice([255, 256, 4096, 20000]), "a/" * 3000 + "b", "nul\x00byte", "missing.json",
            "bad-importance.json", "two-metrics.json", "wikitext-2-valid", "valid", "test", "wikitext-2-test",
            "~/nothing", "../../../../../../etc/shadow", "imp.json", "data.txt", "dir", "fifo", "recipe.surg",
            "\u2028", "é.txt", "a b", "",
        ]
    )  # fmt: skip


def _selector(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.15:
        return "layers *"
    if kind < 0.3:
        return f"layers {rng.choice(['first', 'last', 'evenly'])} {_number(rng)}"
    if kind < 0.5:
        rank, amount = rng.choice(["most", "least", "mid"]), _number(rng) + rng.choice(["", "%"])
        source = rng.choice([f"by {rng.choice(['similarity', 'lim', 'zd', 'iks', 'simlarity', 'x' * 500])}",
                             f'by "{_path(rng)}"', f'by lim in "{_path(rng)}"'])  # fmt: skip
        return f"{rank} important {amount} {source}"
    count = rng.choice([1, 2, 5, 50, 1000, 30000]) if rng.random() < 0.9 else 1
    items = []
    for _ in range(count):
        a = _number(rng) if rng.random() < 0.05 else str(rng.randint(-40, 40))
        items.append(a if rng.random() < 0.7 else f"{a}..{rng.randint(-40, 40)}")
    return "layers " + ", ".join(items)


def _statement(rng: random.Random) -> str:
    n = _number
    choices = [
        lambda: f'model "{rng.choice(MODELS) if rng.random() < 0.8 else _path(rng)}"',
        lambda: f"drop {rng.choice(['attention', 'mlp', 'block', 'heads', ''])} {_selector(rng)}",
        lambda: f'calibrate on "{_path(rng)}" samples {n(rng)} length {n(rng)} seed {n(rng)}',
        lambda: (
            f"quantize {rng.choice(['layers', 'attention', 'mlp', 'head'])} {_selector(rng)} to "
            f"{rng.choice(['int4', 'int8', 'int3'])} block {n(rng)}" + rng.choice(["", " symmetric"])
        ),
        lambda: (
            f"quantize layers by {rng.choice(['lim', 'zd', 'similarity', chr(34) + _path(rng) + chr(34)])} {{\n"
            + "".join(f"    most important {n(rng)}% -> int8\n" for _ in range(rng.choice([0, 1, 2, 500])))
            + "    rest -> int4\n}"
        ),
        lambda: f'verify perplexity on "{_path(rng)}" max-increase {n(rng)}% tokens {n(rng)}',
        lambda: (
            f"fuse layer {rng.choice([n(rng), 'auto', 'dynamic'])} into head weight {n(rng)} "
            f"candidates {n(rng)}..{n(rng)}"
        ),
        lambda: f"split mlp {_selector(rng)} into {n(rng)} experts top {n(rng)}",
        lambda: f"prune experts {_selector(rng)} to {n(rng)}" + rng.choice(["", " by frequency"]),
        lambda: (
            f"merge experts {_selector(rng)} to {n(rng)} grouping {rng.choice(['output', 'router'])} "
            f"weighting {rng.choice(['frequency', 'uniform'])} rank {n(rng)}{rng.choice(['', '%'])}"
        ),
        lambda: f"export onnx opset {n(rng)}" + rng.choice(["", " without kv-cache", " with position-ids"]),
        lambda: rng.choice(["{" * 2000, "}" * 50, "# comment", "", "drop", "model", '"unterminated', "\t\t"]),
        lambda: "x" * rng.choice([100, 70000]),
    ]
    return rng.choice(choices)()


def _grammar_case(rng: random.Random) -> bytes:
    lines = []
    if rng.random() < 0.9:
        lines.append(f'model "{rng.choice(MODELS)}"')
    for _ in range(rng.choice([1, 2, 3, 5, 10])):
        lines.append(_statement(rng))
    if rng.random() < 0.05:  # many bad lines: rendering every error must stay linear
        lines.extend(["drop attention layers 99"] * rng.choice([1000, 10000]))
    ending = rng.choice(["\n", "\n", "\r\n", "\r"])
    return ending.join(lines).encode("utf-8", "surrogatepass")


def _mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rng.choice([1, 1, 1, 2, 2, 4, 8, 16])):
        op = rng.random()
        at = rng.randint(0, len(data)) if data else 0
        if op < 0.35:
            data[at:at] = rng.choice(_SPECIAL)
        elif op < 0.5 and data:
            del data[at : at + rng.randint(1, 8)]
        elif op < 0.65 and data:
            data[min(at, len(data) - 1)] = rng.randint(0, 255)
        elif op < 0.75:
            other = SEED_RECIPES[rng.randrange(len(SEED_RECIPES))].read_bytes()
            cut = rng.randint(0, len(other))
            data[at:at] = other[cut : cut + rng.randint(1, 200)]
        elif op < 0.85 and data:
            lines = bytes(data).split(b"\n")
            line = lines[rng.randrange(len(lines))]
            data[at:at] = (line + b"\n") * rng.choice([2, 10, 1000])
        else:
            data[at:at] = _number(rng).encode()
    if rng.random() < 0.1:
        data[:0] = "\ufeff".encode()
    return bytes(data)


_TOKEN = re.compile(rb'"[^"\n]*"|[0-9]+(?:\.[0-9]+)?%?')


def _mutate_tokens(data: bytes, rng: random.Random) -> bytes:
    tokens = list(_TOKEN.finditer(data))
    for _ in range(rng.choice([1, 2, 3])):
        if not tokens:
            break
        token = tokens[rng.randrange(len(tokens))]
        if token.group().startswith(b'"'):
            replacement = f'"{_path(rng)}"'.encode("utf-8", "surrogatepass")
        else:
            replacement = _number(rng).encode()
        data = data[: token.start()] + replacement + data[token.end() :]
        tokens = list(_TOKEN.finditer(data))
    return data


def _importance_json(rng: random.Random) -> bytes:
    base = SEED_JSON[rng.randrange(len(SEED_JSON))].read_bytes() if SEED_JSON else b"{}"
    kind = rng.random()
    if kind < 0.15:
        return b"[" * rng.choice([100, 1000, 100000]) + b"1" + b"]" * rng.choice([0, 100])
    if kind < 0.3:
        return base.replace(b"0.1", b"1" * rng.choice([400, 5000]), 1)
    if kind < 0.4:
        return base[: rng.randint(0, len(base))]
    if kind < 0.5:
        return rng.choice([b"\xff\xfe\x00", b"SECRET=hunter2\n", b"", b"null", b'"x"', b"NaN", b"{}" * 1000])
    if kind < 0.6:
        return (
            b'{"format": "surgery-importance", "version": 1, "metrics": {"m": {"more_important": "higher", '
            b'"scores": {"block": [' + b", ".join([b"1e999", b"-1e999", b"NaN", b"true", b'"x"', b"[]"] * 3) + b"]}}}}"
        )
    return _mutate_bytes(base, rng)


@dataclass
class Case:
    """One fuzz case: the recipe's bytes and, for `importance`, the importance file's."""

    number: int
    generator: str
    recipe: bytes
    importance: bytes | None = None


def make_case(number: int, seed: int = 0) -> Case:
    """The case with this number (the same bytes on every machine for the same seed)."""
    rng = random.Random(f"{seed}:{number}")
    generator = GENERATORS[rng.randrange(len(GENERATORS))]
    if generator == "grammar":
        return Case(number, generator, _grammar_case(rng))
    if generator == "bytes":
        seed_recipe = SEED_RECIPES[rng.randrange(len(SEED_RECIPES))].read_bytes()
        return Case(number, generator, _mutate_bytes(seed_recipe, rng))
    if generator == "tokens":
        seed_recipe = SEED_RECIPES[rng.randrange(len(SEED_RECIPES))].read_bytes()
        return Case(number, generator, _mutate_tokens(seed_recipe, rng))
    model = rng.choice(MODELS)
    recipe = (
        f'model "{model}"\ndrop block least important 1 by "imp.json"\nquantize layers by "imp.json" {{\n'
        "    most important 25% -> int8\n    rest -> int4\n}\n"
    )
    return Case(number, generator, recipe.encode(), _importance_json(rng))


@dataclass
class Outcome:
    """What one case did."""

    case: Case
    outcome: str  # ok, error, usage, crash, wrong-line
    code: int | None
    seconds: float
    detail: str = ""


# `FILE:LINE:COL: error: ...`, the gutter line, then `LINE | quoted text`.
_LOCATION = re.compile(
    r"^(?P<file>[^\n:]*recipe\.surg):(?P<line>\d+):(?P<col>\d+): (?:error|warning): .*\n"
    r".*\n(?P<no>\d+) \| (?P<text>.*)$",
    re.M,
)


def _recipe_lines(data: bytes) -> list[str] | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    text = text.removeprefix("\ufeff")
    return re.sub(r"\r\n?", "\n", text).split("\n")


def _wrong_lines(recipe: bytes, stderr: str) -> str:
    """A description of the first diagnostic whose location or quoted line disagrees with the recipe."""
    from surgery.diagnostics import _clip, printable

    lines = _recipe_lines(recipe)
    if lines is None:
        return ""
    for match in _LOCATION.finditer(stderr):
        line, col = int(match["line"]), int(match["col"])
        if not 1 <= line <= len(lines) or int(match["no"]) != line:
            return f"line {line} of a recipe with {len(lines)} lines"
        expected, _ = _clip(printable(lines[line - 1]), col)
        if match["text"] != expected:
            return f"line {line} quoted as {match['text'][:60]!r}, the recipe has {expected[:60]!r}"
        if col > len(lines[line - 1]) + 1:
            return f"column {col} past the end of line {line}"
    return ""


def prepare_folder(folder: Path) -> None:
    """The side files cases may name: a folder, a FIFO, a text, an importance file, seed JSON files."""
    (folder / "dir").mkdir(exist_ok=True)
    if not (folder / "fifo").exists():
        os.mkfifo(folder / "fifo")
    (folder / "data.txt").write_text("tiny text\n" * 3)
    for seed_json in SEED_JSON:
        (folder / seed_json.name).write_bytes(seed_json.read_bytes())


def warm_up(folder: Path) -> None:
    """Load what a process loads once (the libraries, the parser, SmolLM2's and the tiny models'
    tokenizers and calibration counts), so that case times measure the checker itself."""
    for text in (
        'model "tiny-llama"\ndrop attention least important 1 by similarity\n',
        'model "smollm2-135m"\ndrop attention least important 1 by similarity\n'
        'verify perplexity on "wikitext-2-test" max-increase 10%\n',
    ):
        run_case(Case(-1, "warm-up", text.encode()), folder)


def run_case(case: Case, folder: Path, limit: float = 1.0) -> Outcome:
    """Run `surgery check` on the case in `folder` (the working directory is left unchanged)."""
    from surgery.cli import main

    recipe = folder / "recipe.surg"
    recipe.write_bytes(case.recipe)
    if case.importance is not None:
        (folder / "imp.json").write_bytes(case.importance)
    elif (folder / "imp.json").exists():
        (folder / "imp.json").unlink()
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["check", str(recipe)])
    except BaseException as error:  # noqa: BLE001 - anything escaping main is the finding
        return Outcome(case, "crash", None, time.perf_counter() - start, f"{type(error).__name__}: {error}"[:300])
    seconds = time.perf_counter() - start
    stderr = err.getvalue()
    if code == 4 or "Traceback" in stderr or (code == 1 and not stderr.strip()):
        return Outcome(case, "crash", code, seconds, stderr[-400:])
    wrong = _wrong_lines(case.recipe, stderr)
    if wrong:
        return Outcome(case, "wrong-line", code, seconds, wrong)
    return Outcome(case, {0: "ok", 1: "error", 2: "usage"}.get(code, "crash"), code, seconds, stderr[-200:])

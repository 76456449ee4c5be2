"""Progress a user can trust: phase lines, and counted work with an estimate of the time left.

A command's `progress` is a callable that prints one phase line (`progress("loading ...")`).
Work that takes more than a couple of seconds is also counted:

    with counted(progress, "importance: similarity, lim", total=30, unit="layer"):
        ...  # wherever the work finishes a layer, `advance("layer")` is called

`advance(unit)` moves the innermost counter of that unit; the decoder graph's layer iterator
calls it for every layer it hands out, so every layer-major pass (importance, calibration,
export, verification, GPTQ) counts its layers without passing a callback down. Counting is
shown by `ProgressLines`: on a terminal a tqdm bar that updates in place (count, elapsed, time
left); elsewhere (a log, CI) a line when the work starts, one after 5 s and every 30 s after
with the count and the time left, and one with the time taken when that was 2 s or more. Any
other `progress` callable (a test's, a library caller's) gets the phase line only.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import TextIO

# Off a terminal: the first count after FIRST_LINE_S, then one every LINE_INTERVAL_S, and a last
# line with the time taken unless the work took less than QUIET_BELOW_S.
FIRST_LINE_S = 5.0
LINE_INTERVAL_S = 30.0
QUIET_BELOW_S = 2.0


class _Counter:
    """One counted piece of work: its unit, and what to do when some of it is done."""

    def __init__(self, unit: str, update: Callable[[int], None]):
        self.unit = unit
        self.update = update


_active: ContextVar[tuple[_Counter, ...]] = ContextVar("surgery_progress_counters", default=())


def advance(unit: str, n: int = 1) -> None:
    """Count `n` more `unit`s done for the innermost counter of that unit (none: nothing happens)."""
    for counter in reversed(_active.get()):
        if counter.unit == unit:
            counter.update(n)
            return


@contextlib.contextmanager
def counted(progress: Callable[[str], None], description: str, total: int | None, unit: str) -> Iterator[None]:
    """Count `total` `unit`s of work under `description`: shown by a `progress` that can
    (`ProgressLines`), a phase line otherwise."""
    show = getattr(progress, "counter", None)
    if show is None:
        progress(description)
        update: Callable[[int], None] = lambda n: None  # noqa: E731
        display: contextlib.AbstractContextManager = contextlib.nullcontext(update)
    else:
        display = show(description, total, unit)
    with display as update:
        token = _active.set((*_active.get(), _Counter(unit, update)))
        try:
            yield
        finally:
            _active.reset(token)


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds}s"


class ProgressLines:
    """Phase lines on stderr with the time since the start, and counted work (see the module)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.start = time.perf_counter()
        self._stream = stream

    @property
    def stream(self) -> TextIO:
        """Where the lines go: the given stream, else stderr as it is now (tests redirect it)."""
        return self._stream if self._stream is not None else sys.stderr

    def _stamp(self) -> str:
        return f"[{time.perf_counter() - self.start:6.1f}s]"

    def __call__(self, message: str) -> None:
        """Print one phase line."""
        print(f"{self._stamp()} {message}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def counter(self, description: str, total: int | None, unit: str) -> Iterator[Callable[[int], None]]:
        """Show counted work: a tqdm bar on a terminal, sparse lines elsewhere."""
        stream = self.stream
        if getattr(stream, "isatty", lambda: False)():
            with self._bar(stream, description, total, unit) as update:
                yield update
        else:
            with self._lines(description, total, unit) as update:
                yield update

    @contextlib.contextmanager
    def _bar(self, stream: TextIO, description: str, total: int | None, unit: str) -> Iterator[Callable[[int], None]]:
        from tqdm import tqdm

        # disable=False: `quiet_console` sets TQDM_DISABLE for other libraries' bars, not ours.
        bar = tqdm(total=total, desc=f"{self._stamp()} {description}", unit=f" {unit}s", file=stream,
                   disable=False, leave=True, dynamic_ncols=True, mininterval=0.5,
                   bar_format="{desc}: {n_fmt}/{total_fmt}{unit} [{elapsed}<{remaining}]")  # fmt: skip
        try:
            yield bar.update
        finally:
            bar.close()

    @contextlib.contextmanager
    def _lines(self, description: str, total: int | None, unit: str) -> Iterator[Callable[[int], None]]:
        started = time.perf_counter()
        # The rate is measured from the first unit done on (no estimate before a second one): a
        # counter nested in another starts with it but may see its first unit only when the
        # outer work is done, and its own units are what the time left is made of.
        state = {"done": 0, "next": started + FIRST_LINE_S, "first_at": 0.0, "first_done": 0}
        of = f"/{total}" if total else ""
        self(description)

        def update(n: int) -> None:
            now = time.perf_counter()
            if not state["done"]:
                state["first_at"], state["first_done"] = now, n
            state["done"] += n
            if now < state["next"]:
                return
            state["next"] = now + LINE_INTERVAL_S
            done, since = state["done"] - state["first_done"], now - state["first_at"]
            left = f", ~{_duration(since / done * (total - state['done']))} left" if total and done and since else ""
            self(f"{description}: {state['done']}{of} {unit}s{left}")

        try:
            yield update
        finally:
            took = time.perf_counter() - started
            if took >= QUIET_BELOW_S:  # a quick step stays one line, as any phase
                self(f"{description}: {state['done']}{of} {unit}s in {_duration(took)}")

"""What reaches the user's terminal: our progress and results, not our dependencies' chatter.

`quiet_console` is entered around every command. Unless `--verbose` is given it keeps out
Python warnings (transformers' `past_key_values is deprecated` and the like), transformers'
log lines and progress bars, tqdm bars of other libraries, and onnxruntime's own log lines.
`report_internal_error` turns an unexpected exception into one line and a report file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import platform
import sys
import tempfile
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path

# Read by surgery.backend.runtime when it opens onnxruntime sessions.
state = {"verbose": False}

_PACKAGE_ROOT = Path(__file__).resolve().parent


@contextlib.contextmanager
def quiet_console(verbose: bool) -> Iterator[None]:
    """Run a command with the dependencies' output kept off the console (unless `verbose`)."""
    saved_env = {name: os.environ.get(name) for name in ("TQDM_DISABLE", "TRANSFORMERS_VERBOSITY")}
    state["verbose"] = verbose
    if not verbose:
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    loggers = {name: logging.getLogger(name).level for name in ("onnxruntime", "gguf", "accelerate")}
    with warnings.catch_warnings():
        if not verbose:
            warnings.simplefilter("ignore")
            for name in loggers:
                logging.getLogger(name).setLevel(logging.ERROR)
        _set_transformers_verbosity(verbose)
        try:
            yield
        finally:
            for name, level in loggers.items():
                logging.getLogger(name).setLevel(level)
            for name, value in saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            state["verbose"] = False


def _set_transformers_verbosity(verbose: bool) -> None:
    """transformers' own verbosity. Quiet, a transformers not loaded yet reads the environment
    set above when it is (importing it here would cost every quiet command half a second)."""
    if not verbose and "transformers" not in sys.modules:
        return
    from transformers.utils import logging as hf_logging

    if verbose:
        hf_logging.set_verbosity_warning()
        hf_logging.enable_progress_bar()
    else:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def onnxruntime_log_level() -> int:
    """onnxruntime's session log severity: warnings with --verbose, else errors only."""
    return 2 if state["verbose"] else 3


def _our_frame(error: BaseException) -> str:
    """`file:line in function` of the innermost frame in surgery's own code (else the innermost)."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "unknown location"
    ours = [f for f in frames if _PACKAGE_ROOT in Path(f.filename).resolve().parents or "passes" in f.filename]
    frame = (ours or frames)[-1]
    try:
        shown = Path(frame.filename).resolve().relative_to(_PACKAGE_ROOT.parent)
    except ValueError:
        shown = Path(frame.filename)
    return f"{shown}:{frame.lineno} in {frame.name}"


def report_dir() -> Path:
    """Where internal-error reports go: $SURGERY_CACHE/reports (default ~/.cache/surgery/reports)."""
    from surgery.models.builtin import cache_dir

    return cache_dir() / "reports"


def report_internal_error(error: BaseException, argv: list[str]) -> str:
    """Write a full report of an unexpected exception; returns the one line to print."""
    from surgery import __version__

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    body = [
        f"surgery {__version__} internal error, {_dt.datetime.now().isoformat(timespec='seconds')}",
        f"command: surgery {' '.join(argv)}",
        f"python {platform.python_version()} on {platform.platform()}",
        "packages: " + ", ".join(_versions()),
        "",
        "".join(traceback.format_exception(type(error), error, error.__traceback__)),
    ]
    path = None
    for folder in (report_dir(), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(prefix=f"surgery-error-{stamp}-", suffix=".txt", dir=folder)
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write("\n".join(body))
            path = name
            break
        except OSError:
            continue
    where = _our_frame(error)
    line = f"internal error: this is a bug in surgery: {type(error).__name__} at {where}"
    if path:
        line += f"\n  full report: {path} (please attach it to a bug report)"
    return line


def _versions() -> list[str]:
    from importlib import metadata

    found = []
    for name in ("torch", "transformers", "onnx", "onnxruntime", "onnx-ir", "lark", "numpy"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return found


def print_error(message: str) -> None:
    """One error message on stderr."""
    print(message, file=sys.stderr, flush=True)

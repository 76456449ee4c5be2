"""Compiled bytecode for read-only installs.

Python caches each module's compiled bytecode beside its source (`__pycache__`). Where the
installed packages are read-only and shipped without it (a shared environment installed with
`pip install --no-compile`, a container image built that way), every process compiles torch's
and transformers' thousands of modules again: measured on the lent GPU host, 2,972 modules
and about 6 s of every `surgery` command. There, surgery keeps the bytecode under its own
cache instead (`sys.pycache_prefix`, the mechanism Python itself provides for this), so only
the first command pays. Nothing changes where Python can write its bytecode or finds it.
"""

from __future__ import annotations

import importlib.util
import os
import sys

# The largest dependencies: if their bytecode is cached (or cacheable), the rest is too.
_PROBES = ("torch", "transformers")


def _uncacheable(module: str) -> bool:
    """Whether `module`'s bytecode is neither beside its source nor writable there."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return False
    cached = importlib.util.cache_from_source(spec.origin)
    if os.path.exists(cached):
        return False
    folder = os.path.dirname(cached)
    return not os.access(folder if os.path.isdir(folder) else os.path.dirname(folder), os.W_OK)


def cache_bytecode_if_read_only(cache_root: str | None = None) -> str | None:
    """Point `sys.pycache_prefix` at `<surgery cache>/bytecode` when the dependencies' bytecode
    cannot be cached beside them; returns the prefix set (None: nothing changed). Call before
    importing torch."""
    if sys.pycache_prefix is not None or sys.dont_write_bytecode:
        return None
    if not any(_uncacheable(module) for module in _PROBES):
        return None
    root = cache_root or os.environ.get("SURGERY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "surgery")
    prefix = os.path.join(root, "bytecode")
    try:
        os.makedirs(prefix, exist_ok=True)
    except OSError:
        return None
    sys.pycache_prefix = prefix
    return prefix

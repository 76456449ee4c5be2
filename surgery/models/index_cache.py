"""The model index of a config read before, kept so that `check` answers without transformers.

Reading a config goes through transformers (its config classes fill defaults and normalize
fields), and importing transformers costs seconds. The index that `check` and `plan` need is a
few dozen numbers. The built-in models' indices ship with the package (builtin_indices.json,
written by `python -m surgery.models.index_cache`; a test holds it equal to what their configs
give), so checking a recipe on a built-in model writes nothing. A folder's or a GGUF file's is
kept as JSON under the cache folder, keyed by what it was read from (a folder's config.json
bytes, a GGUF file's path, size and time) and by the code that turns a config into an index
(surgery/models/index.py and the architecture descriptions). Hub models are not kept (their
config may change upstream). A damaged cache entry is read as a miss.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, fields
from functools import cache
from importlib import metadata
from pathlib import Path

from surgery.models.index import ModelIndex

BUILTIN_INDICES = Path(__file__).with_name("builtin_indices.json")


def cached_index(spec, text: str) -> ModelIndex | None:
    """The index kept for `spec` (named `text`), or None."""
    try:
        if spec.kind == "builtin":
            data = json.loads(BUILTIN_INDICES.read_text(encoding="utf-8")).get(spec.location)
        else:
            path = _entry(spec)
            data = json.loads(path.read_text(encoding="utf-8")) if path is not None and path.is_file() else None
        return None if data is None else _index(text, data)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _index(name: str, data: dict) -> ModelIndex:
    values = {f.name: data[f.name] for f in fields(ModelIndex) if f.name != "name"}
    values["layer_sliding"] = tuple(values["layer_sliding"])
    return ModelIndex(name=name, **values)


def _plain(index: ModelIndex) -> dict:
    data = asdict(index)
    data.pop("name")
    return data


def keep_index(spec, index: ModelIndex) -> None:
    """Keep `index` for `spec` (best effort: a read-only cache folder only costs the next check
    time). Built-in models' indices ship with the package instead."""
    path = _entry(spec)
    if path is None:
        return
    from surgery.backend.output import write_atomically

    data = _plain(index)
    with contextlib.suppress(OSError):
        write_atomically(str(path), lambda temporary: Path(temporary).write_text(json.dumps(data), encoding="utf-8"))


def _entry(spec) -> Path | None:
    """The cache file of `spec`, or None when its config is not kept."""
    from surgery.models.builtin import cache_dir

    if spec.kind == "folder":
        try:
            source = "folder:" + hashlib.sha256(Path(spec.location, "config.json").read_bytes()).hexdigest()
        except OSError:
            return None
    elif spec.kind == "gguf":
        try:
            stat = os.stat(spec.location)
        except OSError:
            return None
        source = f"gguf:{spec.location}:{stat.st_size}:{stat.st_mtime_ns}"
    else:
        return None
    key = hashlib.sha256(f"{source}\n{_code_version()}".encode()).hexdigest()[:32]
    return cache_dir() / "index" / f"{key}.json"


@cache
def _code_version() -> str:
    """What the index depends on besides the config: transformers' version and our own code."""
    digest = hashlib.sha256()
    with contextlib.suppress(metadata.PackageNotFoundError):
        digest.update(metadata.version("transformers").encode())
    here = Path(__file__).resolve().parent
    sources = [here / "index.py", *sorted((here.parent / "architectures").glob("*.py"))]
    for source in sources:
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()


def builtin_indices() -> dict[str, dict]:
    """Every built-in model's index, read from its config through transformers."""
    from surgery.models import builtin
    from surgery.models.loading import load_config
    from surgery.models.specs import ModelSpec

    return {
        name: _plain(ModelIndex.from_config(name, load_config(ModelSpec(name, "builtin", name))))
        for name in builtin.BUILTIN_NAMES
    }


if __name__ == "__main__":  # regenerate builtin_indices.json after a change to a config or to index.py
    BUILTIN_INDICES.write_text(json.dumps(builtin_indices(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {BUILTIN_INDICES}")

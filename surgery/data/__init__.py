"""Text shipped with surgery: WikiText-2 validation and test splits (CC BY-SA 3.0, see NOTICE).

`resolve_text` turns what a user wrote (`"wikitext-2-valid"`, `valid`, or a file path) into a
`TextSource` with a content hash, which goes into every importance file and report so a result
can be traced to the exact text it was computed on.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from importlib import resources

from surgery.diagnostics import HintedError

BUILTIN_TEXTS = {
    "wikitext-2-valid": "wikitext-2-valid.txt",
    "wikitext-2-test": "wikitext-2-test.txt",
}
# Short names accepted on the command line and in recipes.
ALIASES = {"valid": "wikitext-2-valid", "test": "wikitext-2-test"}
DEFAULT_CALIBRATION_TEXT = "wikitext-2-valid"
DEFAULT_EVALUATION_TEXT = "wikitext-2-test"


class TextSourceError(HintedError):
    """A text that cannot be used: missing file, empty, or not UTF-8."""


@dataclass(frozen=True)
class TextSource:
    """A resolved text: its name as written, where it lives, and its SHA-256."""

    name: str
    path: str
    builtin: bool
    sha256: str

    def read(self) -> str:
        """The whole text."""
        with open(self.path, encoding="utf-8") as handle:
            return handle.read()

    def to_json(self) -> dict[str, object]:
        """Provenance record."""
        return {"name": self.name, "builtin": self.builtin, "sha256": self.sha256}


def resolve_text(name: str, base_dir: str | None = None) -> TextSource:
    """A built-in text by name, else a file (relative paths from `base_dir`, else the cwd).

    An existing file wins over a built-in name, so `./valid` always means the file.
    """
    path = name if os.path.isabs(name) or base_dir is None else os.path.join(base_dir, name)
    if os.path.isfile(path):
        return TextSource(name, path, False, _sha256(path))
    builtin = ALIASES.get(name, name)
    if builtin in BUILTIN_TEXTS:
        with resources.as_file(resources.files("surgery.data").joinpath(BUILTIN_TEXTS[builtin])) as found:
            return TextSource(builtin, str(found), True, _sha256(str(found)))
    raise TextSourceError(
        f"no text '{name}': not a file and not a built-in text",
        "built-in texts: " + ", ".join(BUILTIN_TEXTS) + " (short: valid, test)",
    )


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

"""Text shipped with surgery: WikiText-2 validation and test splits (CC BY-SA 3.0, see NOTICE).

`resolve_text` turns what a user wrote (`"wikitext-2-valid"`, `valid`, or a file path) into a
`TextSource` with a content hash, which goes into every importance file and report so a result
can be traced to the exact text it was computed on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources

from surgery.diagnostics import HintedError
from surgery.files import InputFileError, path_exists, scan_text_file

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
        """The whole text (checked to be UTF-8 when it was resolved)."""
        try:
            with open(self.path, encoding="utf-8") as handle:
                return handle.read()
        except (OSError, UnicodeDecodeError) as error:  # changed or removed since it was resolved
            raise TextSourceError(f"text '{self.name}' can no longer be read ({type(error).__name__})") from None

    def to_json(self) -> dict[str, object]:
        """Provenance record."""
        return {"name": self.name, "builtin": self.builtin, "sha256": self.sha256}


def text_file(name: str, base_dir: str | None = None) -> str | None:
    """The file a user-named text refers to when it names a file (not a built-in), without reading it."""
    path = name if os.path.isabs(name) or base_dir is None else os.path.join(base_dir, name)
    return path if path_exists(path) else None


def resolve_text(name: str, base_dir: str | None = None) -> TextSource:
    """A built-in text by name, else a file (relative paths from `base_dir`, else the cwd).

    An existing path wins over a built-in name, so `./valid` always means the file; it must be
    a regular UTF-8 file of at most 512 MiB (checked here, once, while hashing it).
    """
    path = text_file(name, base_dir)
    if path is not None:
        try:
            return TextSource(name, path, False, scan_text_file(path, "text"))
        except InputFileError as problem:
            raise TextSourceError(str(problem), problem.hint) from None
    builtin = ALIASES.get(name, name)
    if builtin in BUILTIN_TEXTS:
        with resources.as_file(resources.files("surgery.data").joinpath(BUILTIN_TEXTS[builtin])) as found:
            return TextSource(builtin, str(found), True, scan_text_file(str(found), "text"))
    raise TextSourceError(
        f"no text '{name}': not a file and not a built-in text",
        "built-in texts: " + ", ".join(BUILTIN_TEXTS) + " (short: valid, test)",
    )

"""A model's tokenizer as a run needs it: its files always, the transformers tokenizer only when used.

Loading a tokenizer through `AutoTokenizer` imports transformers' auto classes, and with some
transformers releases those import its generation utilities, torch's distributed and compiler
modules and whatever optional packages are installed (scikit-learn, torchaudio): 3-5 s on the
lent GPU host with transformers 5.17, for an export that never tokenizes a word. A run that
calibrates, verifies or evaluates tokenizes and loads it then; one that only exports copies the
tokenizer's files into its output as they are, the files `save_pretrained` would write (for a
folder surgery converted, byte for byte the same; for any other folder, the author's own files,
which is what onnxruntime-genai reads).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

# What transformers reads as a folder's tokenizer (and `save_pretrained` writes): copied when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
# Without these, the files alone are not a tokenizer onnxruntime-genai can read: the folder's
# tokenizer is loaded and saved instead (a sentencepiece-only folder gets its tokenizer.json).
_REQUIRED = ("tokenizer.json", "tokenizer_config.json")


class ModelTokenizer:
    """A model's tokenizer: `get()` loads it (once) through `load`; `save(folder)` writes its
    files, copied when the source folder has them (whether or not it was loaded, so an output's
    tokenizer files never depend on what else the run did) and saved from the loaded tokenizer
    otherwise."""

    def __init__(self, load: Callable[[], Any], folder: str | None = None):
        self._load = load
        self._loaded: Any = None
        self.folder = folder

    @classmethod
    def loaded(cls, tokenizer: Any) -> ModelTokenizer:
        """A tokenizer already in memory (a built-in model's, made in code)."""
        handle = cls(lambda: tokenizer)
        handle._loaded = tokenizer
        return handle

    def copyable(self) -> bool:
        """Whether the source folder's own files make the tokenizer an output needs."""
        return self.folder is not None and all((Path(self.folder) / name).is_file() for name in _REQUIRED)

    def get(self) -> Any:
        """The transformers tokenizer, loaded on first use (its load's errors pass through)."""
        if self._loaded is None:
            self._loaded = self._load()
        return self._loaded

    def save(self, folder: str | Path) -> None:
        """Write the tokenizer's files into `folder`: the source's own when it has them, without
        loading the tokenizer; otherwise `save_pretrained` of the loaded one."""
        if self.copyable():
            for name in TOKENIZER_FILES:
                source = Path(self.folder) / name
                if source.is_file():
                    shutil.copyfile(source, Path(folder) / name)
            return
        self.get().save_pretrained(str(folder))

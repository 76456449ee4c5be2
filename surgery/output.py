"""Output folders that appear only when complete, and never clobber inputs.

Everything is written into a temporary sibling folder; `commit` renames it into place (an
existing folder is replaced only with --force, and only after the new one is complete).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


class OutputError(Exception):
    """The output folder cannot be used (exists without --force, or would touch an input)."""


class OutputFolder:
    """A temporary folder next to `target`, renamed to `target` on commit."""

    def __init__(self, target: str | os.PathLike, force: bool, protected: list[str | os.PathLike] = ()):
        self.target = Path(target).resolve()
        if self.target.exists() and not force:
            raise OutputError(f"output folder '{target}' already exists (use --force to replace it)")
        if self.target.exists() and not self.target.is_dir():
            raise OutputError(f"output '{target}' exists and is not a folder")
        for path in protected:
            path = Path(path).resolve()
            if path == self.target or self.target in path.parents:
                raise OutputError(f"output folder '{target}' would replace an input ({path}); choose another -o")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-", dir=self.target.parent))

    def commit(self) -> Path:
        """Move the finished folder into place; an older one is removed only afterwards."""
        # mkdtemp (and some writers) create owner-only entries; give the result the usual
        # permissions a folder made by the user would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.path, 0o777 & ~umask)
        for entry in self.path.iterdir():
            if entry.is_file():
                os.chmod(entry, 0o666 & ~umask)
        old = None
        if self.target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.old-", dir=self.target.parent))
            os.replace(self.target, old / "previous")
        os.replace(self.path, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.target

    def discard(self) -> None:
        """Remove the temporary folder (on failure)."""
        shutil.rmtree(self.path, ignore_errors=True)

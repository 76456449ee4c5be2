"""Files a user names (recipes, importance files, calibration and evaluation texts), read safely.

Every such file must be a regular file (not a folder, device, pipe or socket: `/dev/zero` or a
FIFO would never end), no larger than its kind's limit (read with a bound, not trusting the
size the file system reports), and valid UTF-8; a byte-order mark is accepted. A problem is an
`InputFileError` that names the file and, for bad bytes, the line and column, and never quotes
the file's contents.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import stat

from surgery.diagnostics import HintedError
from surgery.source import Source, Span, normalize_text

MiB = 1 << 20
RECIPE_LIMIT = 1 * MiB  # a recipe is a few lines; 1 MiB is tens of thousands of statements
IMPORTANCE_LIMIT = 1 * MiB  # scores for a few hundred layers are a few KB
TEXT_LIMIT = 512 * MiB  # calibration and evaluation texts (WikiText-2 is about 1 MB)


class InputFileError(HintedError):
    """A named file that cannot be used. `span` points at a bad byte when there is one."""

    def __init__(self, message: str, hint: str | None = None, span: Span | None = None):
        super().__init__(message, hint)
        self.span = span


def path_exists(path: str) -> bool:
    """Whether anything is at `path` (a link counts); an overlong name or a NUL byte names nothing."""
    try:
        return os.path.lexists(path)
    except (OSError, ValueError):
        return False


def _size(limit: int) -> str:
    return f"{limit / MiB:g} MiB"


def _unreadable(what: str, shown: str, error: BaseException) -> InputFileError:
    """The message for an OSError (or ValueError, for a NUL byte in the name) about a named file."""
    if isinstance(error, FileNotFoundError):
        return InputFileError(f"{what} '{shown}' not found")
    if isinstance(error, NotADirectoryError):
        return InputFileError(f"{what} '{shown}' not found (a part of the path is a file, not a folder)")
    reason = getattr(error, "strerror", None) or "not a usable path"
    return InputFileError(f"{what} '{shown}' cannot be read: {reason.lower()}")


def _too_large(what: str, shown: str, limit: int) -> InputFileError:
    return InputFileError(f"{what} '{shown}' is larger than {_size(limit)}", f"{what}s are limited to {_size(limit)}")


def check_regular_file(path: str, what: str, shown: str | None = None) -> os.stat_result:
    """The file's status, or an InputFileError saying why `path` is not a readable regular file.

    `shown` is the path as messages give it (default: `path`).
    """
    shown = shown or path
    try:
        status = os.stat(path)
    except (OSError, ValueError) as error:  # missing, a name too long, a NUL byte, a loop of links
        raise _unreadable(what, shown, error) from None
    if stat.S_ISDIR(status.st_mode):
        raise InputFileError(f"{what} '{shown}' is a folder, not a file")
    if not stat.S_ISREG(status.st_mode):
        raise InputFileError(f"{what} '{shown}' is not a regular file (a device, pipe or socket)")
    return status


def read_bounded(path: str, what: str, limit: int, shown: str | None = None) -> bytes:
    """The bytes of a regular file of at most `limit` bytes."""
    shown = shown or path
    check_regular_file(path, what, shown)
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as error:
        raise _unreadable(what, shown, error) from None
    if len(data) > limit:
        raise _too_large(what, shown, limit)
    return data


def decode_utf8(data: bytes, name: str, what: str) -> Source:
    """The text of `data` as a Source named `name`; bad UTF-8 is an error at its line and column."""
    try:
        return Source(name, data.decode("utf-8"))
    except UnicodeDecodeError as error:
        # Everything before the first bad byte decodes; the shown text replaces bad bytes.
        offset = len(normalize_text(data[: error.start].decode("utf-8")))
        source = Source(name, data.decode("utf-8", errors="replace"))
        raise InputFileError(
            f"{what} is not valid UTF-8: byte 0x{data[error.start]:02x} cannot start or continue a character",
            "save the file as UTF-8",
            span=source.span(offset, offset + 1),
        ) from None


def read_source(path: str, what: str, limit: int, name: str | None = None) -> Source:
    """A bounded, UTF-8 file as a Source (reported under `name`, default the path)."""
    return decode_utf8(read_bounded(path, what, limit, name), name or path, what)


def scan_text_file(path: str, what: str, limit: int = TEXT_LIMIT) -> str:
    """The SHA-256 of a (possibly large) text file, checking on the way, block by block, that it
    is a regular file within `limit` bytes and valid UTF-8."""
    check_regular_file(path, what)
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")()
    done = 0
    lines = 1
    try:
        with open(path, "rb") as handle:
            while block := handle.read(MiB):
                done += len(block)
                if done > limit:
                    raise _too_large(what, path, limit)
                digest.update(block)
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as error:
                    lines += block.count(b"\n", 0, max(error.start, 0))
                    raise InputFileError(
                        f"{what} '{path}' is not valid UTF-8 (line {lines})", "give a UTF-8 text file"
                    ) from None
                lines += block.count(b"\n")
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise InputFileError(f"{what} '{path}' is not valid UTF-8 (it ends inside a character)") from None
    except OSError as error:
        raise _unreadable(what, path, error) from None
    return digest.hexdigest()

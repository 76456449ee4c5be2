"""Output folders: they appear complete or not at all, one run at a time, and only ours are replaced.

The protocol, for a target `DIR/NAME`:

- **Refusals** (exit 1, nothing written): a target that is, contains or lies inside an input
  (the recipe, the model folder or file, importance files, texts), the working directory or
  one of its parents, a target under a file, a symbolic link, a file, or an existing folder
  without `--force`. With `--force` a folder is replaced only if a previous `surgery apply`
  wrote it: it holds the marker file `.surgery-output` and `surgery.json`.
- **Lock**: `DIR/.NAME.lock`, held with `flock` for the whole run. A second run to the same
  target finds it held and exits 1 naming the holder's process id. The kernel releases the lock
  when its holder dies, even by `kill -9`, so a crashed run never blocks the next one. The lock
  path is opened with `O_NOFOLLOW` and must be a regular file (a symbolic link or FIFO planted
  there is refused, never followed), and a lock file that cannot be written (a full disk) is
  removed again.
- **Staging**: everything is written into `DIR/.NAME.partial-XXXX` (marked as ours the moment
  it is created), then renamed onto the target. An existing target is swapped out atomically
  (`renameat2(RENAME_EXCHANGE)` on Linux; elsewhere moved aside to `DIR/.NAME.old-XXXX` first,
  so the target is briefly absent but never partial) and then deleted.
- **Recovery**: holding the lock, a run removes the `.NAME.partial-*` and `.NAME.old-*` folders
  that killed runs left (a live run would hold the lock) and says so, before any refusal of the
  target, so a refused run still clears them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from surgery import __version__

MARKER = ".surgery-output"
REPORT = "surgery.json"
_RENAME_EXCHANGE = 2  # linux/fs.h


class OutputError(Exception):
    """The output cannot be written where asked (exists, not ours, an input, locked by another run)."""


def _absolute(path: str | os.PathLike) -> Path:
    """An absolute path with `..` and symbolic links of the parents resolved, the last part kept."""
    path = Path(os.path.abspath(os.fspath(path)))
    return path.parent.resolve() / path.name


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


def is_our_output(folder: Path) -> bool:
    """Whether `folder` was written by `surgery apply`: it carries our marker and a report."""
    return _is_marked(folder) and (folder / REPORT).is_file()


def _write_marker(folder: Path) -> None:
    with open(folder / MARKER, "w", encoding="utf-8") as handle:
        json.dump({"written_by": "surgery", "version": __version__}, handle)
        handle.write("\n")


def _remove_marked(folder: Path) -> None:
    """Delete one of our folders so that, killed at any moment, what is left of it still carries
    the marker until it is empty: the next run then knows it as ours and removes the rest (an
    unmarked folder that is not empty is never touched)."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.name == MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
    with contextlib.suppress(OSError):
        (folder / MARKER).unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()


def _is_marked(folder: Path) -> bool:
    """Whether `folder` carries our marker (a staging folder does from the moment it exists)."""
    try:
        with open(folder / MARKER, encoding="utf-8") as handle:
            marker = json.load(handle)
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("written_by") == "surgery"


class _Lock:
    """An exclusive `flock` on a lock file, removed on release (safe against a racing unlink)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None

    def acquire(self, what: str) -> None:
        """Take the lock or raise OutputError naming the process that holds it.

        The lock path is never followed when it is a symbolic link, and never used when it is
        not a regular file (a link planted there would have us truncate the file it points
        to; a FIFO would block)."""
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip()
                os.close(fd)
                who = f" (process {holder})" if holder.isdigit() else ""
                raise OutputError(
                    f"another surgery run{who} is writing '{what}'; wait for it to finish or choose another -o"
                ) from None
            # The holder we waited for may have removed the file after we opened it; a lock on
            # a removed file guards nothing, so make sure the path is still our file.
            try:
                same = os.path.samestat(os.fstat(fd), os.lstat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as error:  # a full disk: no lock file is left behind
            self.release()
            raise OutputError(f"cannot write the lock file '{self.path}': {error.strerror}") from None

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise OutputError(
                    f"the lock file '{self.path}' is a symbolic link; surgery does not follow it: remove it"
                ) from None
            raise OutputError(f"cannot create the lock file '{self.path}': {error.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OutputError(f"the lock file '{self.path}' is not a regular file; remove it")
        return fd

    def release(self) -> None:
        """Remove the lock file and let go of the lock."""
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system cannot."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # a file system without exchange
        return False
    raise OSError(code, os.strerror(code), str(b))


class OutputFolder:
    """A staging folder next to `target`, renamed onto it on `commit`; see the module docstring.

    `protected` are the run's inputs: the target may not be, contain, or lie inside any of them.
    `progress` hears about leftovers of killed runs that were removed.
    """

    def __init__(
        self,
        target: str | os.PathLike,
        force: bool,
        protected: Iterable[str | os.PathLike] = (),
        progress: Callable[[str], None] = lambda message: None,
    ):
        self.shown = os.fspath(target)
        self.target = _absolute(target)
        self.force = force
        self._refuse_unsafe_target(protected)
        self.parent = self.target.parent
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot create the folder for '{self.shown}': {error.strerror}") from None
        self.lock = _Lock(self.parent / f".{self.target.name}.lock")
        self.lock.acquire(self.shown)
        try:
            # Leftovers first: they are ours to clear even when this run is then refused.
            self.removed_leftovers = self._remove_leftovers()
            if self.removed_leftovers:
                progress(
                    f"removed {len(self.removed_leftovers)} unfinished folder(s) of an interrupted earlier run: "
                    + ", ".join(path.name for path in self.removed_leftovers)
                )
            self._refuse_existing()
            self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-", dir=self.parent))
            _write_marker(self.path)
            self._scratch: Path | None = None
        except BaseException:
            self.lock.release()
            raise

    def _refuse_unsafe_target(self, protected: Iterable[str | os.PathLike]) -> None:
        target, shown = self.target, self.shown
        if target.name in ("", ".", "..") or target.parent == target:
            raise OutputError(f"'{shown}' cannot be an output folder; name a new folder, e.g. out/my-model")
        for ancestor in target.parents:
            if ancestor.exists() and not ancestor.is_dir():
                raise OutputError(f"output '{shown}' would be under '{ancestor}', which is a file, not a folder")
        if target.is_symlink():
            raise OutputError(f"output '{shown}' is a symbolic link; give the folder itself")
        if target.exists() and not target.is_dir():
            raise OutputError(f"output '{shown}' exists and is not a folder")
        real = _resolved(target)
        for path in protected:
            path = _resolved(path)
            if path == real or real in path.parents:
                raise OutputError(f"output folder '{shown}' would replace an input ({path}); choose another -o")
            if path in real.parents:
                raise OutputError(f"output folder '{shown}' lies inside an input ({path}); choose another -o")
        cwd = _resolved(os.getcwd())
        if real == cwd or real in cwd.parents:
            raise OutputError(f"output '{shown}' is the working folder or contains it; choose another -o")

    def _refuse_existing(self) -> None:
        if not self.target.exists():
            return
        if not self.force:
            raise OutputError(
                f"output folder '{self.shown}' already exists (use --force to replace an earlier output of surgery)"
            )
        if not is_our_output(self.target):
            raise OutputError(
                f"output folder '{self.shown}' exists and was not written by `surgery apply` (it has no {MARKER} "
                f"and {REPORT}); --force replaces only surgery's own outputs: move it away or choose another -o"
            )

    def _remove_leftovers(self) -> list[Path]:
        """Staging and swap folders of killed runs to this target (we hold the lock: no one else's)."""
        removed = []
        name = self.target.name
        for entry in self.parent.iterdir():
            if not entry.name.startswith((f".{name}.partial-", f".{name}.old-")):
                continue
            if entry.is_symlink() or not entry.is_dir():
                continue
            # Ours if marked; an unmarked one is empty (killed between creating and marking it).
            if _is_marked(entry) or not any(entry.iterdir()):
                _remove_marked(entry)
                removed.append(entry)
        return removed

    def scratch(self) -> Path:
        """A folder beside the staging one for intermediate files that never reach the output
        (a pass's rewritten layers), made on the first call. It is removed on commit and on
        discard, and, like a staging folder, as a leftover by the next run after a kill."""
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-", dir=self.parent))
            _write_marker(self._scratch)
        return self._scratch

    def _remove_scratch(self) -> None:
        if self._scratch is not None:
            _remove_marked(self._scratch)

    def commit(self) -> Path:
        """Move the finished folder onto the target; an older output is deleted only afterwards."""
        try:
            # mkdtemp (and some writers) create owner-only entries; give the result the usual
            # permissions a folder made by the user would have.
            umask = _umask()
            os.chmod(self.path, 0o777 & ~umask)
            for entry in self.path.iterdir():
                if entry.is_file():
                    os.chmod(entry, 0o666 & ~umask)
            if self.target.exists() or self.target.is_symlink():
                # Something may have appeared there while we ran (not a surgery run: we hold the lock).
                self._refuse_existing()
                if self.target.is_symlink() or not self.target.is_dir():
                    raise OutputError(f"output '{self.shown}' appeared as a file while surgery ran")
                self._swap_in()
            else:
                os.rename(self.path, self.target)
        finally:
            self._remove_scratch()
            self.lock.release()
        return self.target

    def _swap_in(self) -> None:
        if _exchange(self.path, self.target):
            _remove_marked(self.path)  # now the previous output
            return
        old = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.old-", dir=self.parent))
        _write_marker(old)
        os.replace(self.target, old / "previous")
        os.replace(self.path, self.target)
        _remove_marked(old)

    def discard(self) -> None:
        """Remove the staging folder and release the lock (on failure)."""
        try:
            _remove_marked(self.path)
            self._remove_scratch()
        finally:
            self.lock.release()


def check_replaceable_file(path: str, what: str, is_ours: Callable[[bytes], bool], protected=()) -> None:
    """Refuse to write a single-file output (`importance -o`, `--plot`) over something not ours.

    An existing file is replaced only when `is_ours` recognizes its first bytes (an importance
    file, a PNG); a folder, a device, a file under a file, or an input is refused.
    """
    target = _absolute(path)
    for ancestor in target.parents:
        if ancestor.exists() and not ancestor.is_dir():
            raise OutputError(f"{what} '{path}' would be under '{ancestor}', which is a file, not a folder")
    for item in protected:
        if _resolved(item) == _resolved(target):
            raise OutputError(f"{what} '{path}' is an input of this command; choose another path")
    if not (target.exists() or target.is_symlink()):
        return
    if target.is_symlink() or not target.is_file():
        raise OutputError(f"{what} '{path}' exists and is not a regular file; choose another path")
    try:
        with open(target, "rb") as handle:
            head = handle.read(1 << 16)
    except OSError as error:
        raise OutputError(f"{what} '{path}' exists and cannot be read: {error.strerror}") from None
    if not is_ours(head):
        raise OutputError(
            f"{what} '{path}' exists and is not a file surgery wrote; surgery replaces only its own files: "
            "move it away or choose another path"
        )


def write_atomically(path: str, write: Callable[[str], None], suffix: str = "") -> None:
    """Call `write(temporary_path)` next to `path`, then rename onto it: `path` is never partial."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.partial-", suffix=suffix, dir=folder)
    os.close(handle)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

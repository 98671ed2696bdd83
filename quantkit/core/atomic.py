"""Atomic saves: an output appears at its path complete or not at all, whatever kills the writer.

A save writes into a temporary sibling ``.NAME.quantkit-tmp-HEX`` that its writer holds an
``flock`` on from creation to the end (the kernel releases it when the process dies, which tells
a dead writer's leftovers from a live writer's work), then puts it in place in one step:

- a file: ``rename``, which replaces an existing file atomically;
- a folder, on Linux: ``renameat2`` with ``RENAME_NOREPLACE`` for a first save and
  ``RENAME_EXCHANGE`` over an existing folder, which swaps the two folders in one step; the old
  one, now at the temporary's name, is deleted. Concurrent writers each swap in a complete
  folder; the last one wins;
- a folder where the kernel or filesystem has no ``renameat2`` (macOS, some network filesystems):
  under an ``flock`` on the parent folder, the old folder is renamed aside to
  ``.NAME.quantkit-old-HEX`` and the new one renamed in. A writer killed between the two renames
  leaves ``NAME`` missing; :func:`recover` renames the aside back.

:func:`recover` runs at the start of every save and of ``quantkit.load``: it deletes temporaries
no live process holds and old folders set aside, restoring one where ``NAME`` is missing (also
the ``.NAME.old-PID`` that earlier quantkit versions left when killed mid-save, once PID has exited).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil
from safetensors import SafetensorError

from .errors import QuantkitError, SaveError

TEMPORARY = "tmp"
ASIDE = "old"

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}
_OPEN_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def _libc_renameat2():
    """libc's ``renameat2`` (Linux, glibc 2.28+ or musl), or None."""
    if not sys.platform.startswith("linux"):
        return None
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        function.restype = ctypes.c_int
    return function


_LIBC_RENAMEAT2 = _libc_renameat2()


@contextmanager
def atomic_path(path: Path, *, directory: bool) -> Iterator[Path]:
    """Yield a temporary path to write a folder (``directory=True``) or a file into; when the block
    ends without an exception, put it at ``path`` in one step.

    ``path`` holds the complete old output or the complete new one at every moment (or, on a
    filesystem without ``renameat2``, briefly nothing, which :func:`recover` repairs), never a mix.
    A failed write (disk full, file-size limit, read-only or blocked target) raises
    :class:`SaveError` naming ``path``; any other exception passes through. Either way the
    temporary is removed and the old output kept. What is put in place gets the modes the umask
    gives new files and folders (the temporary folder is private while it is written).
    """
    path = Path(path)
    with _as_save_error(path, "nothing was written"):
        path.parent.mkdir(parents=True, exist_ok=True)
        recover(path)
        tmp, lock = _temporary(path)
    try:
        target = tmp if directory else tmp / path.name
        with _as_save_error(path, "the previous output, if any, is unchanged"):
            umask = _umask(tmp)
            yield target
            _apply_umask(target, umask)
            _fsync_tree(target)
            if directory:
                _commit_folder(tmp, path)
            else:
                os.replace(target, path)
        with _as_save_error(path, "the new output is in place but may not be on disk yet"):
            fsync_path(path.parent)
    finally:
        _remove(tmp)  # what is left of the temporary, or the old folder swapped out to its name
        os.close(lock)


def recover(path: Path) -> None:
    """Clean up after writers of ``path`` that died: delete their temporaries and the old folders
    they set aside, first renaming one back to ``path`` if ``path`` is missing. Work of live writers
    is left alone. Costs one listing of the parent folder when there is nothing to do."""
    path = Path(path)
    temporaries, asides = _leftovers(path)
    for tmp in temporaries:
        lock = _try_lock(tmp)
        if lock is not None:
            try:
                _remove(tmp)
            finally:
                os.close(lock)
    if not asides:
        return
    with (
        _as_save_error(path, "an interrupted save set it aside under a hidden name beside it", doing="restore"),
        _locked(path.parent),
    ):
        for aside in sorted(asides, key=_changed, reverse=True):
            if not os.path.lexists(aside):
                continue  # removed meanwhile by the writer that set it aside
            if not os.path.lexists(path):
                os.rename(aside, path)
                fsync_path(path.parent)
            else:
                _remove(aside)


def _leftovers(path: Path) -> tuple[list[Path], list[Path]]:
    """The temporaries and set-aside old folders of ``path`` in its parent folder."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"(?:quantkit-(tmp|old)-[0-9a-f]{16}|old-(\d+))")
    temporaries, asides = [], []
    try:
        names = os.listdir(path.parent)
    except OSError:  # a missing or unreadable folder holds nothing quantkit can clean
        return [], []
    for name in names:
        match = pattern.fullmatch(name)
        if match is None:
            continue
        kind, legacy_pid = match.groups()
        if kind == TEMPORARY:
            temporaries.append(path.parent / name)
        elif kind == ASIDE or not psutil.pid_exists(int(legacy_pid)):
            asides.append(path.parent / name)
    return temporaries, asides


def _temporary(path: Path) -> tuple[Path, int]:
    """A new private folder beside ``path`` and the descriptor holding its lock."""
    while True:
        tmp = path.with_name(f".{path.name}.quantkit-{TEMPORARY}-{secrets.token_hex(8)}")
        try:
            os.mkdir(tmp, 0o700)
        except FileExistsError:
            continue
        try:
            lock = os.open(tmp, _OPEN_DIRECTORY)
        except FileNotFoundError:
            continue  # deleted by a recover() that found it before it was locked
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits while such a recover() deletes it
        try:
            if os.path.samestat(os.fstat(lock), os.lstat(tmp)):
                return tmp, lock
        except FileNotFoundError:
            pass
        os.close(lock)


def _try_lock(folder: Path) -> int | None:
    """A descriptor holding ``folder``'s lock, or None if a live process holds it (or it is no folder)."""
    try:
        lock = os.open(folder, _OPEN_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock)
        return None
    return lock


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (serialising rename-aside commits and their recovery)."""
    lock = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)


def _commit_folder(tmp: Path, path: Path) -> None:
    """Put the folder ``tmp`` at ``path``; an old folder there ends up at ``tmp`` or is deleted."""
    try:  # one stat: another writer's rename-aside may take the old folder away at any moment
        is_folder = stat.S_ISDIR(os.stat(path).st_mode)
    except FileNotFoundError:
        is_folder = not os.path.lexists(path)  # gone meanwhile (fine) or a dangling link (not a folder)
    if not is_folder:
        raise NotADirectoryError(errno.ENOTDIR, "it exists and is not a folder")
    while True:
        try:
            if _renameat2(tmp, path, _RENAME_NOREPLACE):
                return
        except FileExistsError:
            try:
                if _renameat2(tmp, path, _RENAME_EXCHANGE):
                    return
            except FileNotFoundError:
                continue  # the old folder vanished between the two calls: a first save again
        break
    with _locked(path.parent):
        aside = path.with_name(f".{path.name}.quantkit-{ASIDE}-{secrets.token_hex(8)}")
        if os.path.lexists(path):
            os.rename(path, aside)
            try:
                os.rename(tmp, path)
            except OSError:
                os.rename(aside, path)
                raise
        else:
            os.rename(tmp, path)
        _remove(aside)


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """``renameat2(source, target, flags)``; False where the kernel or filesystem does not support it."""
    if _LIBC_RENAMEAT2 is None:
        return False
    if _LIBC_RENAMEAT2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(source), None, str(target))


def _remove(item: Path) -> None:
    """Delete a folder tree, file or link if it exists; failures leave it for the next :func:`recover`."""
    if item.is_dir() and not item.is_symlink():
        shutil.rmtree(item, ignore_errors=True)
    else:
        with suppress(OSError):
            item.unlink(missing_ok=True)


def _changed(item: Path) -> float:
    try:
        return item.lstat().st_ctime
    except FileNotFoundError:
        return 0.0


def fsync_path(item: Path) -> None:
    """Flush the file or folder ``item`` to disk."""
    descriptor = os.open(item, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(root: Path) -> None:
    """Flush the file ``root``, or every file and folder in the folder ``root``, to disk (contents first)."""
    for item in reversed([root, *root.rglob("*")] if root.is_dir() else [root]):
        fsync_path(item)


def _umask(scratch: Path) -> int:
    """The process umask, read from the mode of a new folder in the empty folder ``scratch``
    (``os.umask`` can only be read by setting it, which races with threads creating files)."""
    probe = scratch / "umask-probe"
    probe.mkdir(0o777)
    try:
        return 0o777 & ~stat.S_IMODE(probe.stat().st_mode)
    finally:
        probe.rmdir()


def _apply_umask(target: Path, umask: int) -> None:
    """Give ``target`` (a file, or a folder and everything in it) the modes new ones get."""
    for item in reversed([target, *target.rglob("*")] if target.is_dir() else [target]):
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


@contextmanager
def _as_save_error(path: Path, outcome: str, doing: str = "save") -> Iterator[None]:
    """Turn a failed write (an ``OSError``, or safetensors' wrapped I/O error) into a :class:`SaveError`."""
    try:
        yield
    except QuantkitError:
        raise
    except (OSError, SafetensorError) as exc:
        code = exc.errno if isinstance(exc, OSError) else _os_error_code(str(exc))
        reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
        message = f"cannot {doing} {str(path)!r}: {reason}; {outcome}"
        raise (SaveError(code, message) if code else SaveError(message)) from exc


def _os_error_code(text: str) -> int | None:
    """The errno in a Rust I/O error's text (``... (os error 28)``), as safetensors reports it."""
    match = re.search(r"\(os error (\d+)\)", text)
    return int(match.group(1)) if match else None

"""Atomic writes: build in a temporary sibling, publish by rename when complete, replace without a window.

Every directory a later run trusts (checkpoint, final adapter, merged model, cache entry, built model) goes
through here, so a crash or kill at any moment leaves either the old complete directory or the new one under
its name. Replacing a directory swaps old and new in one ``renameat2(RENAME_EXCHANGE)`` where Linux and the
filesystem support it. Elsewhere it takes two renames (old aside as ``.NAME.old-PID``, new into place); a kill
between them leaves no ``NAME``, and ``recover_directory`` (run before every write of ``NAME``) puts the complete
hidden copy back and says so. ``.NAME.tmp-PID`` is a directory being built: never trusted, only deleted.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from axlora.core.errors import UserError

Log = Callable[[str], None]

_TMP_TAG = ".tmp-"
_OLD_TAG = ".old-"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# renameat2's flag is unknown to this kernel or filesystem: fall back to two renames.
_EXCHANGE_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}
# What writing to a path can hit that is the user's to fix (and no bug of ours): reported as bad input.
_FILESYSTEM_ERRORS = {
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST,
    errno.EFBIG, errno.EISDIR, errno.ENAMETOOLONG,
}


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def temp_sibling(target: Path, pid: int | None = None) -> Path:
    """Where ``target`` is built before it is published: ``.NAME.tmp-PID`` beside it."""
    return target.with_name(f".{target.name}{_TMP_TAG}{os.getpid() if pid is None else pid}")


def _old_sibling(target: Path) -> Path:
    return target.with_name(f".{target.name}{_OLD_TAG}{os.getpid()}")


def filesystem_error(exc: OSError, path: Path) -> UserError | None:
    """``exc`` as one line naming the path and the reason, when it is the disk's or the path's fault."""
    if exc.errno not in _FILESYSTEM_ERRORS:
        return None
    where = Path(exc.filename) if exc.filename else path
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        file = next((p for p in (where, *where.parents) if p.is_file()), None)
        where, reason = (file, "is a file, not a directory") if file else (where, "exists and is not a directory")
    else:
        reason = exc.strerror or os.strerror(exc.errno)
    context = "" if where == Path(path) else f" (while writing {path})"
    return UserError(f"{where}: {reason}{context}")


def make_directory(path: Path) -> None:
    """``mkdir -p`` that reports a read-only disk, a missing permission or a file in the way as bad input."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise (filesystem_error(exc, path) or exc) from None


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` to disk before the rename publishes it."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (renames, new files); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # glibc before 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in _EXCHANGE_UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def replace_directory(new: Path, target: Path) -> None:
    """Put the complete directory ``new`` in place of ``target`` (which may exist) without a window.

    An existing ``target`` is exchanged with ``new`` in one step and then deleted; where the filesystem cannot
    exchange, it is renamed aside to ``.NAME.old-PID`` first, which ``recover_directory`` restores after a kill.
    """
    fsync_dir(new)
    if not target.exists():
        os.rename(new, target)
    elif exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # now the old directory
    else:
        old = _old_sibling(target)
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        os.rename(new, target)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target.parent)


def _pid_of(hidden: Path, target: Path, tag: str) -> int | None:
    prefix = f".{target.name}{tag}"
    number = hidden.name[len(prefix):] if hidden.name.startswith(prefix) else ""
    return int(number) if number.isdigit() else None


def other_process_alive(pid: object) -> bool:
    """Whether ``pid`` names another live process on this machine (this process, or no pid at all, is not one:
    what it left behind was left by an earlier life of it, e.g. in a restarted container)."""
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _hidden(target: Path, tag: str) -> list[Path]:
    """``target``'s hidden siblings with ``tag`` whose writer is gone, newest first."""
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return []
    found = []
    for sibling in siblings:
        pid = _pid_of(sibling, target, tag)
        if pid is not None and sibling.is_dir() and not other_process_alive(pid):
            found.append(sibling)
    return sorted(found, key=lambda p: p.lstat().st_ctime_ns, reverse=True)


def recover_directory(target: Path, log: Log = _stderr) -> bool:
    """Undo a replacement killed half way: restore ``target`` from its complete hidden copy; True if it did.

    Only ``.NAME.old-PID`` copies are restored (each was a complete ``target`` before being renamed aside);
    copies of live processes are theirs and left alone. Once ``target`` exists, the dead writers' leftovers
    (old copies and half-built ``.tmp-`` directories) are deleted.
    """
    restored = False
    if not target.exists():
        for old in _hidden(target, _OLD_TAG):
            os.rename(old, target)
            fsync_dir(target.parent)
            log(f"{target}: restored the complete copy {old.name} that an interrupted replacement left hidden")
            restored = True
            break
    if target.exists():
        for leftover in _hidden(target, _OLD_TAG) + _hidden(target, _TMP_TAG):
            shutil.rmtree(leftover, ignore_errors=True)
    return restored


@contextmanager
def atomic_directory(target: Path, *, replace: bool = True, log: Log = _stderr) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``target`` when the block completes without error.

    With ``replace`` an existing ``target`` is replaced without a window (``replace_directory``); otherwise an
    existing ``target`` is left as it is and the new one discarded. A replacement an earlier process left half
    done is recovered first. A full, read-only or misplaced disk is reported as bad input naming the path.
    """
    make_directory(target.parent)
    recover_directory(target, log)
    tmp = temp_sibling(target)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        fsync_tree(tmp)
        if replace or not target.exists():
            replace_directory(tmp, target)
    except OSError as exc:
        raise (filesystem_error(exc, target) or exc) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a whole file or nothing: a temporary sibling, flushed, then renamed over ``path``."""
    tmp = temp_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except OSError as exc:
        raise (filesystem_error(exc, path) or exc) from exc
    finally:
        tmp.unlink(missing_ok=True)

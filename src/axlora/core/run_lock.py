"""One run per ``output_dir``: ``run.lock`` names the run that holds it (pid, host, start time).

Two runs writing one directory would interleave checkpoints, metrics and ``final/`` and leave the second
run's weights under the first one's name. The lock is an advisory ``flock`` on the file, held as long as
the process lives: the kernel (or a shared filesystem that supports it) lets it go when the holder dies,
however it dies, so a lock a killed run left behind is taken over, with a note naming that run. Where the
filesystem cannot lock, the file's content decides: a holder on this machine whose pid is gone is taken
over; a live one, or one on another machine, is refused, naming the file to delete once that run is gone.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from axlora.core.atomic import filesystem_error, make_directory, other_process_alive
from axlora.core.errors import UserError

Log = Callable[[str], None]


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def describe(holder: dict) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(fd, 4096):
        data += chunk
    try:
        holder = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


class RunLock:
    """The lock on one ``output_dir``; ``acquire`` before anything is written there, ``release`` at the end."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self, log: Log) -> None:
        make_directory(self.path.parent)
        while True:
            fd = self._open()
            try:
                locked = self._flock(fd)
                if self._still_linked(fd):
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the previous holder removed the file between our open and lock: try the new one
        try:
            note = self._take(fd, locked)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        if note:
            log(note)

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise (filesystem_error(exc, self.path) or exc) from None

    def _flock(self, fd: int) -> bool:
        """True when the filesystem locked the file for us; False where it cannot lock at all."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._held(_read(fd)) from None
        except OSError as exc:
            if exc.errno in (errno.ENOLCK, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                return False
            raise
        return True

    def _still_linked(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _take(self, fd: int, locked: bool) -> str | None:
        """Write this run into the file, after deciding about the holder it names; a note when taken over."""
        previous = _read(fd)
        note = None
        if previous.get("pid") is not None:
            same_host = previous.get("host") == socket.gethostname()
            if not locked and (not same_host or other_process_alive(previous.get("pid"))):
                raise self._held(previous)
            note = (f"lock: took over {self.path} from a run that is gone ({describe(previous)}; it ended "
                    "without releasing it)")
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(_me()) + "\n").encode("utf-8"))
            os.fsync(fd)
        except OSError as exc:
            raise (filesystem_error(exc, self.path) or exc) from None
        return note

    def _held(self, holder: dict) -> UserError:
        who = describe(holder) if holder else "a run that is still starting"
        return UserError(f"output_dir: {self.path.parent} is in use by another run ({who}; lock {self.path}). "
                         "One run writes an output_dir at a time: wait for it to finish, or set another output_dir. "
                         f"If that run is gone (on another machine), delete {self.path}.")

    def release(self) -> None:
        """Remove the file while still holding it, so no waiting run ever locks a removed file."""
        if self._fd is None:
            return
        try:
            if self._still_linked(self._fd):
                self.path.unlink()
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None


@contextmanager
def run_lock(path: Path, log: Log) -> Iterator[RunLock]:
    """Hold the lock on ``path``'s directory for the block."""
    lock = RunLock(path)
    lock.acquire(log)
    try:
        yield lock
    finally:
        lock.release()

"""Directory replacement without a window, recovery after a kill between its steps, filesystem errors as exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fs_faults import read_only_dir, small_disk

from axlora.core import atomic
from axlora.core.atomic import atomic_directory, recover_directory, replace_directory
from axlora.core.errors import UserError


def _tree(path: Path, content: str) -> Path:
    path.mkdir(parents=True)
    (path / "weights").write_text(content)
    return path


def _exchange_supported(tmp_path: Path) -> bool:
    first, second = _tree(tmp_path / "probe-a", "a"), _tree(tmp_path / "probe-b", "b")
    return atomic.exchange(first, second) and (first / "weights").read_text() == "b"


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_exchange_replaces_in_one_step(tmp_path, monkeypatch):
    if not _exchange_supported(tmp_path):
        pytest.skip("this filesystem has no renameat2(RENAME_EXCHANGE)")
    target = _tree(tmp_path / "final", "old")
    new = _tree(tmp_path / ".final.tmp-1", "new")

    def no_rename(*args):
        raise AssertionError("an existing directory must be exchanged, not renamed aside")

    monkeypatch.setattr(atomic.os, "rename", no_rename)
    replace_directory(new, target)
    assert (target / "weights").read_text() == "new"
    assert not new.exists()


def test_target_never_missing_while_replaced(tmp_path):
    if not _exchange_supported(tmp_path):
        pytest.skip("this filesystem has no renameat2(RENAME_EXCHANGE)")
    target = _tree(tmp_path / "final", "0")
    missing, done = [], threading.Event()

    def watch():
        while not done.is_set():
            if not (target / "weights").is_file():
                missing.append(True)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(1, 200):
            with atomic_directory(target) as tmp:
                (tmp / "weights").write_text(str(i))
    finally:
        done.set()
        watcher.join()
    assert not missing
    assert (target / "weights").read_text() == "199"
    assert _hidden(tmp_path) == []


def test_two_rename_fallback_replaces(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "exchange", lambda first, second: False)
    target = _tree(tmp_path / "final", "old")
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("new")
    assert (target / "weights").read_text() == "new"
    assert _hidden(tmp_path) == []


_CRASH_BETWEEN_RENAMES = """
import os, sys
from pathlib import Path
from axlora.core import atomic
atomic.exchange = lambda first, second: False   # a filesystem without RENAME_EXCHANGE
real_rename, calls = os.rename, []
def rename(src, dst):
    calls.append(src)
    if len(calls) == 2:    # the old directory is aside, the new one not yet in place: die like kill -9
        os._exit(9)
    real_rename(src, dst)
os.rename = rename
with atomic.atomic_directory(Path(sys.argv[1])) as tmp:
    (tmp / "weights").write_text("new")
"""


def test_kill_between_the_two_renames_is_recovered(tmp_path):
    target = _tree(tmp_path / "final", "old")
    crashed = subprocess.run([sys.executable, "-c", _CRASH_BETWEEN_RENAMES, str(target)])
    assert crashed.returncode == 9
    assert not target.exists()  # the window this module closes where it can
    assert any(".final.old-" in name for name in _hidden(tmp_path))

    logs: list[str] = []
    assert recover_directory(target, logs.append)
    assert (target / "weights").read_text() == "old"
    assert "restored the complete copy .final.old-" in logs[0]
    assert _hidden(tmp_path) == []  # the dead writer's half-published new copy is gone too


def test_next_write_recovers_before_it_replaces(tmp_path):
    target = _tree(tmp_path / "final", "old")
    os.rename(target, tmp_path / ".final.old-999999999")  # a dead pid's hidden complete copy
    logs: list[str] = []
    with atomic_directory(target, replace=False, log=logs.append) as tmp:
        (tmp / "weights").write_text("new")
    assert (target / "weights").read_text() == "old"  # restored, and replace=False keeps it
    assert len(logs) == 1 and "restored" in logs[0]


def test_live_writers_copies_are_left_alone(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _tree(tmp_path / f".final.old-{sleeper.pid}", "old")
        assert not recover_directory(tmp_path / "final", lambda line: None)
        assert not (tmp_path / "final").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_failed_block_keeps_the_old_directory(tmp_path):
    target = _tree(tmp_path / "final", "old")
    with pytest.raises(ValueError):
        with atomic_directory(target) as tmp:
            (tmp / "weights").write_text("half")
            raise ValueError("killed half way")
    assert (target / "weights").read_text() == "old"
    assert _hidden(tmp_path) == []


def test_target_under_a_regular_file_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"file: is a file, not a directory \(while writing .*file/out\)"):
        with atomic_directory(tmp_path / "file" / "out" / "final"):
            pass


def test_read_only_target_is_a_user_error(tmp_path):
    with read_only_dir(tmp_path / "ro") as ro:
        with pytest.raises(UserError, match=str(ro)):
            with atomic_directory(ro / "final"):
                pass


def test_full_disk_keeps_the_old_directory(tmp_path):
    with small_disk(tmp_path / "small", "64k") as disk:
        target = _tree(disk / "final", "old")
        with pytest.raises(UserError, match="No space left on device"):
            with atomic_directory(target) as tmp:
                (tmp / "weights").write_bytes(b"x" * 200_000)
        assert (target / "weights").read_text() == "old"
        assert _hidden(disk) == []

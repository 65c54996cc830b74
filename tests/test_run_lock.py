"""One run per output_dir: a second run exits 2 naming the holder; a dead holder's lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess

import pytest

from axlora.core.errors import UserError
from axlora.core.layout import RunLayout
from axlora.core.run_lock import RunLock, run_lock

from conftest import run_cli


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_the_lock_names_its_holder_and_refuses_a_second_one(tmp_path):
    path = RunLayout(tmp_path / "out").lock
    with run_lock(path, print):
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["started"]
        with pytest.raises(UserError, match=f"is in use by another run \\(pid {os.getpid()} on ") as refused:
            RunLock(path).acquire(print)
        assert f"lock {path}" in str(refused.value)
    assert not path.exists()  # released


def test_a_dead_holder_s_lock_is_taken_over_with_a_note(tmp_path):
    path = tmp_path / "run.lock"
    gone = dead_pid()
    path.write_text(json.dumps({"pid": gone, "host": socket.gethostname(), "started": "2026-01-01T00:00:00"}))
    notes = []
    with run_lock(path, notes.append):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert notes == [f"lock: took over {path} from a run that is gone (pid {gone} on {socket.gethostname()}, "
                     "started 2026-01-01T00:00:00; it ended without releasing it)"]


@pytest.mark.slow
def test_two_runs_on_one_output_dir(make_config, tmp_path):
    from test_run_signals import TrainingProcess

    out = tmp_path / "out"
    first = TrainingProcess(str(make_config("first.yml", max_steps=2000)))
    try:
        first.wait_for("step 1/2000")
        second = run_cli("train", str(make_config("second.yml", max_steps=2)))
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert f"{out} is in use by another run (pid {first.process.pid} on {socket.gethostname()}" in second.stderr
        assert not (out / "final").exists()
    finally:
        first.send(signal.SIGKILL)  # dies holding the lock
        first.finish()
    assert RunLayout(out).lock.exists()
    third = run_cli("train", str(make_config("third.yml", max_steps=2)))
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"lock: took over {RunLayout(out).lock} from a run that is gone (pid {first.process.pid}" in third.stdout
    assert (out / "final").is_dir() and not RunLayout(out).lock.exists()

"""A disk that refuses a write (a file in the way, read-only, full) ends ``axlora train`` with exit status 2 and
one line naming the path and the reason, at any stage; a full disk leaves no half-written directory behind,
an earlier ``final/`` as it was, and the earlier run's logs apart from the failed run's."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from fs_faults import read_only_dir, small_disk

from conftest import main_in_process, train_ok


def test_output_dir_under_a_regular_file(make_config, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    result = main_in_process(capsys, "train", str(make_config(output_dir=str(blocker / "out"))))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {blocker}: is a file, not a directory "
                                                  f"(while writing {blocker / 'out'})"]


def test_output_dir_on_a_read_only_filesystem(make_config, tmp_path, capsys):
    with read_only_dir(tmp_path / "ro") as frozen:
        result = main_in_process(capsys, "train", str(make_config(output_dir=str(frozen / "out"))))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"error: {frozen / 'out'}: ")
    assert "Read-only file system" in error[0] or "Permission denied" in error[0]


def fill(disk: Path) -> None:
    with open(disk / "filler", "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass


@pytest.mark.slow
def test_a_disk_that_fills_up_mid_run(make_config, tmp_path):
    from test_run_signals import TrainingProcess

    with small_disk(tmp_path / "disk", "16m") as disk:
        out = disk / "out"
        train_ok(make_config("earlier.yml", max_steps=2, output_dir=str(out)))
        earlier_final = {p.name: p.read_bytes() for p in (out / "final").iterdir()}
        earlier_logs = (out / "logs" / "metrics.jsonl").read_text()
        run = TrainingProcess(str(make_config("full.yml", max_steps=2000, save_steps=1, save_total_limit=2,
                                              output_dir=str(out))))
        try:
            run.wait_for("step 3/2000")
            fill(disk)
            code = run.finish(timeout=120)
        finally:
            run.send(signal.SIGKILL) if run.process.poll() is None else None
        assert code == 2, run.output[-3000:]
        assert "Traceback" not in run.output
        error = [line for line in run.output.splitlines() if line.startswith("error:")]
        assert len(error) == 1 and error[0].endswith(": No space left on device"), error
        assert error[0].startswith(f"error: {out}")
        assert {p.name: p.read_bytes() for p in (out / "final").iterdir()} == earlier_final
        assert (out / "logs-earlier-1" / "metrics.jsonl").read_text() == earlier_logs  # apart from this run's
        hidden = [p for p in out.rglob(".*") if p.name.startswith(".")]
        assert not hidden, hidden  # no half-written checkpoint or final/
        assert not (out / "run.lock").exists()

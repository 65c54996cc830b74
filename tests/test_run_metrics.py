"""logs/metrics.jsonl survives kills: a torn last line is dropped with a note, a resume cuts the file back by
writing a new one and renaming it (the old file is never truncated in place), a fresh run sets earlier logs aside."""

from __future__ import annotations

import json
import os

from axlora.core.layout import RunLayout
from axlora.train.metrics import MetricsLog, set_aside_earlier_logs


def rows(*steps: int) -> str:
    return "".join(json.dumps({"step": step, "loss": 1.0 / step}) + "\n" for step in steps)


def test_a_resume_drops_a_torn_line_and_later_rows_by_rename(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    path = logs / "metrics.jsonl"
    path.write_text(rows(1, 2, 3, 4) + '{"step": 5, "lo')
    os.link(path, tmp_path / "before.jsonl")  # the old file, as a reader holding it open would see it
    notes = []
    log = MetricsLog(logs, resume_step=3, say=notes.append)
    log.write({"step": 4, "loss": 0.5})
    log.close()
    assert [row["step"] for row in log.read()] == [1, 2, 3, 4]
    assert json.loads(path.read_text().splitlines()[-1]) == {"step": 4, "loss": 0.5}
    assert notes == [f"note: {path}: dropped 1 unreadable line(s) (line 5; a write cut short by a kill)"]
    # replaced by a new file: the old one still holds every byte it had
    assert (tmp_path / "before.jsonl").read_text() == rows(1, 2, 3, 4) + '{"step": 5, "lo'


def test_a_resume_with_nothing_to_cut_leaves_the_file_alone(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "metrics.jsonl").write_text(rows(1, 2))
    inode = (logs / "metrics.jsonl").stat().st_ino
    notes = []
    MetricsLog(logs, resume_step=2, say=notes.append).close()
    assert (logs / "metrics.jsonl").stat().st_ino == inode and not notes


def test_a_fresh_run_sets_the_earlier_logs_aside(tmp_path):
    layout = RunLayout(tmp_path)
    layout.logs.mkdir()
    (layout.logs / "metrics.jsonl").write_text(rows(1, 2))
    (tmp_path / "logs-earlier-1").mkdir()
    notes = []
    assert set_aside_earlier_logs(layout, notes.append) == tmp_path / "logs-earlier-2"
    assert (tmp_path / "logs-earlier-2" / "metrics.jsonl").read_text() == rows(1, 2)
    assert not layout.logs.exists() and "moved to" in notes[0]
    assert set_aside_earlier_logs(layout, notes.append) is None  # nothing there: nothing to do

"""The preprocess progress line: rows, rows/s and an ETA on a terminal; one summary line per pass otherwise."""

from __future__ import annotations

import io
import json

import pytest

from axlora.config.schema import Config
from axlora.core import progress as progress_module
from axlora.core.progress import RateProgress
from axlora.data import encode_pool, row_readers
from axlora.data.demo_rows import addition_rows, write_jsonl
from axlora.data.prepare import prepare_data
from axlora.model.tokenizer import tokenizer_fingerprint


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_eta_comes_from_the_bytes_read_when_the_row_count_is_unknown():
    clock, screen = Clock(), Terminal()
    reading = RateProgress("read", size=4000, stream=screen, clock=clock)
    clock.now += 10
    reading.update(2500, position=1000)  # a quarter of the bytes in 10 s: 30 s to go
    assert screen.getvalue() == "\rread 2,500 rows 25% | 250 rows/s | elapsed 00:10 eta 00:30"
    clock.now += 0.1
    reading.update(2600, position=1100)  # not redrawn more often than REDRAW_SECONDS
    assert screen.getvalue().count("\r") == 1
    clock.now += 9.9
    reading.update(5000, position=4000)
    last = "read 5,000 rows 100% | 250 rows/s | elapsed 00:20 eta 00:00"
    assert screen.getvalue().endswith("\r" + last)
    assert reading.finish() == "read 5,000 rows in 20.0 s, 250 rows/s"
    assert screen.getvalue().endswith("\r" + last + "\r" + " " * len(last) + "\r")  # cleared for the summary


def test_the_eta_comes_from_the_total_when_the_count_is_known_and_a_log_file_gets_nothing():
    clock, screen = Clock(), Terminal()
    tokenizing = RateProgress("tokenized", total=1200, stream=screen, clock=clock)
    clock.now += 30
    tokenizing.advance(400)
    assert screen.getvalue() == "\rtokenized 400/1,200 rows 33% | 13 rows/s | elapsed 00:30 eta 01:00"
    log_file = io.StringIO()
    quiet = RateProgress("tokenized", total=1200, stream=log_file, clock=clock)
    clock.now += 60
    quiet.advance(1200)
    assert quiet.finish() == "tokenized 1,200 rows in 60.0 s, 20 rows/s" and log_file.getvalue() == ""


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("terminal", [True, False])
def test_preprocess_shows_its_passes_and_logs_a_summary(tmp_path, tokenizer, monkeypatch, terminal):
    data = tmp_path / "rows.jsonl"
    write_jsonl(addition_rows(300, seed=2), data)
    (tmp_path / "more.json").write_text(json.dumps(addition_rows(100, seed=3)))
    monkeypatch.setattr(row_readers, "PROGRESS_ROWS", 64)
    monkeypatch.setattr(encode_pool, "CHUNK_ROWS", 50)
    monkeypatch.setattr(progress_module, "REDRAW_SECONDS", 0.0)
    screen = Terminal() if terminal else io.StringIO()
    monkeypatch.setattr("sys.stderr", screen)
    config = Config.model_validate({
        "base_model": "/models/x", "lora_target_linear": True, "max_steps": 1, "sequence_len": 64,
        "output_dir": str(tmp_path / "out"), "val_set_size": 0.1,
        "datasets": [{"path": str(data), "type": "alpaca"}, {"path": str(tmp_path / "more.json"), "type": "alpaca"}],
    })
    lines = []
    prepare_data(config, tokenizer, tokenizer_fingerprint(tokenizer), log=lines.append)
    assert lines[0].startswith("data: prepared ")
    assert lines[1].startswith("data: read 400 rows in ") and lines[1].endswith(" rows/s")
    assert lines[2].startswith("data: tokenized 400 rows in ") and lines[2].endswith(" rows/s")
    shown = screen.getvalue()
    if not terminal:
        assert shown == ""
        return
    reading = [part for part in shown.split("\r") if part.startswith("read ")]
    assert reading[0].startswith("read 64 rows ") and " rows/s | elapsed " in reading[0] and " eta " in reading[0]
    assert any(part.startswith("read 400 rows 100%") for part in reading)  # both files, bytes of both
    tokenized = [part.rstrip() for part in shown.split("\r") if part.startswith("tokenized ")]
    assert tokenized[0].startswith("tokenized 40/400 rows 10% | ")  # the validation part (10%) comes first and tokenized[-1].startswith("tokenized 400/400 rows")


def test_the_line_is_cleared_before_an_error_is_printed(tmp_path, tokenizer, monkeypatch):
    from axlora.core.errors import UserError

    rows = addition_rows(200, seed=4)
    del rows[150]["output"]
    data = tmp_path / "rows.jsonl"
    write_jsonl(rows, data)
    monkeypatch.setattr(encode_pool, "CHUNK_ROWS", 50)
    monkeypatch.setattr(progress_module, "REDRAW_SECONDS", 0.0)
    screen = Terminal()
    monkeypatch.setattr("sys.stderr", screen)
    config = Config.model_validate({
        "base_model": "/models/x", "lora_target_linear": True, "max_steps": 1, "sequence_len": 64,
        "output_dir": str(tmp_path / "out"), "datasets": [{"path": str(data), "type": "alpaca"}],
    })
    with pytest.raises(UserError, match=r"rows.jsonl:151: row 151: missing field 'output'"):
        prepare_data(config, tokenizer, tokenizer_fingerprint(tokenizer), log=lambda _: None)
    drawn = screen.getvalue().split("\r")
    assert drawn[-3].startswith("tokenized ") and drawn[-2] == " " * len(drawn[-3]) and drawn[-1] == ""

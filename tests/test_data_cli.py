"""``axlora preprocess`` through the real command line: the report, the cache hit, and bad data as exit 2."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow


def cache_entries(out):
    return sorted((out / "prepared").iterdir())


def test_preprocess_reports_and_a_second_run_hits_the_cache_rewriting_nothing(make_config, tmp_path):
    """The first preparation runs in-process (the same code the command calls), the second through the CLI."""
    from axlora.config.load import load_config
    from axlora.data.prepare import prepare_data
    from axlora.model.tokenizer import load_tokenizer, tokenizer_fingerprint

    path = make_config(val_set_size=8, sample_packing=True, sequence_len=128)
    config = load_config(path)
    tokenizer = load_tokenizer(config)
    lines: list[str] = []
    prepare_data(config, tokenizer, tokenizer_fingerprint(tokenizer), log=lines.append)
    [entry] = cache_entries(tmp_path / "out")
    assert lines[0].startswith("data: prepared 88 train / 8 val rows")
    report = json.loads((entry / "report.json").read_text())
    assert report["train_rows"] == 88 and report["val_rows"] == 8 and report["train_label_tokens"] > 0
    assert (entry / "lengths.png").is_file()
    written = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}

    second = run_cli("preprocess", str(path))
    assert second.returncode == 0, second.stderr
    assert f"data: cache hit {entry}" in second.stdout
    assert "read -> 88 train + 8 val; dropped 0 too long" in second.stdout
    assert "packing (on): 88 samples -> 44 rows of 128 tokens, fill" in second.stdout
    assert f"report {entry / 'report.json'}" in second.stdout
    assert cache_entries(tmp_path / "out") == [entry]
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == written


def bad_run(make_config, dataset: dict):
    result = run_cli("preprocess", str(make_config(datasets=[dataset])))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def test_malformed_jsonl_line(make_config, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": \n')
    assert f"{bad}:3: not valid JSON" in bad_run(make_config, {"path": str(bad), "type": "alpaca"})


def test_row_missing_a_field(make_config, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    stderr = bad_run(make_config, {"path": str(bad), "type": "alpaca"})
    assert f"{bad}:2: row 2: missing field 'output' (type alpaca)" in stderr


def test_unknown_type(make_config, alpaca_file):
    stderr = bad_run(make_config, {"path": str(alpaca_file), "type": "chatml"})
    assert "config.yml:" in stderr and "datasets[0].type" in stderr and "unknown type 'chatml'" in stderr


def test_unreadable_path(make_config, tmp_path):
    missing = tmp_path / "nowhere" / "data.jsonl"
    assert f"{missing}: dataset file or directory not found" in bad_run(make_config, {"path": str(missing),
                                                                                        "type": "alpaca"})
    (tmp_path / "empty").mkdir()
    stderr = bad_run(make_config, {"path": str(tmp_path / "empty"), "type": "alpaca"})
    assert "no data files in this directory" in stderr

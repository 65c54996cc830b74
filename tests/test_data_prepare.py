"""Preparing: the content-keyed cache, the length rule and its counts, the report, workers, stored rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.data import encode_pool
from axlora.data.demo_rows import addition_rows, write_jsonl
from axlora.data.formats import build_formats
from axlora.data.prepare import prepare_data
from axlora.data.rows import TokenizedRows
from axlora.data.tokenize import encode_rows
from axlora.model.tokenizer import tokenizer_fingerprint


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(addition_rows(40, seed=5), path)
    return path


def make_config(tmp_path, data, **settings) -> Config:
    datasets = settings.pop("datasets", [{"path": str(data), "type": "alpaca"}])
    return Config.model_validate({
        "base_model": "/models/x", "lora_target_linear": True, "max_steps": 1, "datasets": datasets,
        "sequence_len": 96, "val_set_size": 4, "output_dir": str(tmp_path / "out"), **settings,
    })


def prepare(config, tokenizer, lines=None):
    return prepare_data(config, tokenizer, tokenizer_fingerprint(tokenizer), log=(lines if lines is not None else []).append)


def snapshot(directory):
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}


def test_cache_hit_rewrites_nothing_and_reads_the_same_rows(tmp_path, data, tokenizer):
    config = make_config(tmp_path, data)
    first = prepare(config, tokenizer)
    assert not first.cache_hit and len(first.train) == 36 and len(first.val) == 4
    files = snapshot(first.cache_dir)
    assert set(files) == {"train.arrow", "val.arrow", "report.json", "lengths.png"}
    lines = []
    second = prepare(config, tokenizer, lines)
    assert second.cache_hit and second.cache_dir == first.cache_dir and "cache hit" in lines[0]
    assert snapshot(first.cache_dir) == files
    assert list(second.train) == list(first.train) and list(second.val) == list(first.val)
    assert sorted(p.name for p in first.cache_dir.parent.iterdir()) == [first.cache_dir.name]


def test_a_changed_row_sequence_len_or_tokenizer_prepares_again(tmp_path, data, tokenizer):
    config = make_config(tmp_path, data)
    base = prepare(config, tokenizer).fingerprint
    assert not prepare(make_config(tmp_path, data, sequence_len=80), tokenizer).cache_hit
    other_tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    other_tokenizer.add_tokens(["<extra>"])
    assert not prepare(config, other_tokenizer).cache_hit
    rows = data.read_text().splitlines()
    rows[7] = rows[7].replace('"output": "', '"output": "9')
    data.write_text("\n".join(rows) + "\n")
    changed = prepare(config, tokenizer)
    assert not changed.cache_hit and changed.fingerprint != base
    assert prepare(make_config(tmp_path, data, learning_rate=1e-3, sample_packing=True), tokenizer).cache_hit


def test_validation_rows_are_cut_before_tokenizing_and_do_not_depend_on_sequence_len(tmp_path, data, tokenizer):
    a = prepare(make_config(tmp_path, data), tokenizer)
    b = prepare(make_config(tmp_path, data, sequence_len=120), tokenizer)
    assert list(a.val) == list(b.val)


def long_rows(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [{"text": "1+2=3"}] * 6 + [{"text": " ".join(["12345"] * 30)}] * 3
    rows += [{"segments": [{"text": "nothing to learn", "label": False}]},
             {"segments": [{"text": "a ", "label": False}, {"text": "b", "label": True}]}]
    write_jsonl(rows[:9], path)
    write_jsonl(rows[9:], tmp_path / "masked.jsonl")
    return [{"path": str(path), "type": "completion"},
            {"path": str(tmp_path / "masked.jsonl"), "type": "input_output"}]


@pytest.mark.parametrize("strategy", ["drop", "truncate"])
def test_excess_length_strategy_and_its_counts(tmp_path, tokenizer, strategy):
    config = make_config(tmp_path, None, datasets=long_rows(tmp_path), val_set_size=0, sequence_len=40,
                         excess_length_strategy=strategy)
    prepared = prepare(config, tokenizer)
    report = prepared.report
    first, second = report["datasets"]
    assert (first["rows_read"], first["dropped_no_labels"], second["dropped_no_labels"]) == (9, 0, 1)
    if strategy == "drop":
        assert (first["dropped_too_long"], first["truncated"], report["train_rows"]) == (3, 0, 7)
    else:
        assert (first["dropped_too_long"], first["truncated"], report["train_rows"]) == (0, 3, 10)
    assert max(len(row["input_ids"]) for row in prepared.train) <= 40
    assert report["lengths"]["max"] > 40  # lengths are reported as tokenized, before the rule


def test_excess_length_raise_names_the_row(tmp_path, tokenizer):
    datasets = long_rows(tmp_path)
    config = make_config(tmp_path, None, datasets=datasets, sequence_len=40, excess_length_strategy="raise")
    with pytest.raises(UserError, match=r"mixed.jsonl:([789]): row \1: sample has \d+ tokens, more than sequence_len 40"):
        prepare(config, tokenizer)


def test_report_counts_tokens_and_packing(tmp_path, data, tokenizer):
    prepared = prepare(make_config(tmp_path, data, sample_packing=True, sequence_len=128), tokenizer)
    report = json.loads((prepared.cache_dir / "report.json").read_text())
    assert report["train_rows"] == 36 and report["val_rows"] == 4
    assert report["train"]["tokens"] == sum(len(r["input_ids"]) for r in prepared.train)
    scored = sum(sum(1 for t in r["labels"][1:] if t != -100) for r in prepared.train)
    assert report["train_label_tokens"] == report["train"]["label_tokens"] == scored
    lengths = sorted(len(r["input_ids"]) for r in list(prepared.train) + list(prepared.val))
    assert report["lengths"]["min"] == lengths[0] and report["lengths"]["max"] == lengths[-1]
    assert report["packing"]["samples"] == 36 and 0.8 < report["packing"]["fill"] <= 1
    assert (prepared.cache_dir / "lengths.png").stat().st_size > 1000


def test_workers_give_the_same_rows_as_one_process(tmp_path, tokenizer, monkeypatch):
    path = tmp_path / "rows.jsonl"
    write_jsonl(addition_rows(300, seed=2), path)
    config = make_config(tmp_path, path)
    formats = build_formats(config, tokenizer)
    entries = [(0, i, row) for i, row in enumerate(addition_rows(300, seed=2))]
    serial = encode_rows(entries, formats, tokenizer, train_on_inputs=False)
    monkeypatch.setattr(encode_pool, "CHUNK_ROWS", 64)
    monkeypatch.setattr(encode_pool, "MIN_ROWS_PER_PROCESS", 100)
    parallel = encode_pool.encode_in_chunks(entries, formats, tokenizer, train_on_inputs=False, processes=2)
    assert list(parallel) == list(serial) and np.array_equal(parallel.origin, serial.origin)


def test_stored_rows_round_trip_and_read_with_datasets(tmp_path):
    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    stored = TokenizedRows.from_lists(rows)
    stored.save(tmp_path / "rows.arrow")
    loaded = TokenizedRows.load(tmp_path / "rows.arrow")
    assert list(loaded) == rows and loaded[-1] == rows[-1] and len(loaded) == 2
    empty = TokenizedRows.empty()
    empty.save(tmp_path / "empty.arrow")
    assert len(TokenizedRows.load(tmp_path / "empty.arrow")) == 0

    from datasets import Dataset

    assert Dataset.from_file(str(tmp_path / "rows.arrow")).to_list() == rows


def test_row_errors_name_file_line_and_field(tmp_path, tokenizer):
    path = tmp_path / "chat.jsonl"
    write_jsonl([{"messages": [{"role": "user", "content": "hi"}]}, {"messages": [{"role": "user"}, 5]}], path)
    config = make_config(tmp_path, None, val_set_size=0, chat_template="chatml",
                         datasets=[{"path": str(path), "type": "chat_template"}])
    with pytest.raises(UserError, match=r"chat.jsonl:2: row 2: messages\[1\] must be a mapping .*\(type chat_template\)"):
        prepare(config, tokenizer)

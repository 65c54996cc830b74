"""Reading datasets: file kinds, directories, split slicing, sampling, and errors that name file and line."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from axlora.config.datasets import DatasetConfig
from axlora.core.errors import UserError
from axlora.data.sources import load_source, split_range

ROWS = [{"instruction": f"i{n}", "input": "", "output": str(n)} for n in range(10)]


def dataset(path, **keys) -> DatasetConfig:
    return DatasetConfig(path=str(path), type="alpaca", **keys)


def write_jsonl(path, rows, blank_lines=False):
    lines = [json.dumps(r) for r in rows]
    path.write_text(("\n\n" if blank_lines else "\n").join(lines) + "\n")
    return path


def test_every_file_kind_reads_the_same_rows(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "a.parquet")
    with pa.OSFile(str(tmp_path / "a.arrow"), "wb") as sink:
        table = pa.Table.from_pylist(ROWS)
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (tmp_path / "a.csv").write_text("instruction,input,output\n" + "".join(f"i{n},,{n}\n" for n in range(10)))
    for name in ("a.jsonl", "a.json", "a.parquet", "a.arrow", "a.csv"):
        source = load_source(dataset(tmp_path / name), seed=0)
        assert source.rows == ROWS, name  # CSV values stay text ("3", not 3), as a format expects
        assert source.rows_read == 10


def test_text_files_and_ds_type(tmp_path):
    (tmp_path / "notes.txt").write_text("first line\nsecond line\n")
    assert load_source(DatasetConfig(path=str(tmp_path / "notes.txt"), type="completion"), 0).rows == [
        {"text": "first line"}, {"text": "second line"}]
    write_jsonl(tmp_path / "rows.data", ROWS[:2])
    with pytest.raises(UserError, match=r"rows.data: unknown file type '.data'.*set ds_type"):
        load_source(dataset(tmp_path / "rows.data"), 0)
    assert load_source(dataset(tmp_path / "rows.data", ds_type="json"), 0).rows == ROWS[:2]


def test_directory_reads_data_files_in_order_and_errors_name_the_file(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", ROWS[5:])
    write_jsonl(tmp_path / "a.jsonl", ROWS[:5])
    (tmp_path / ".hidden").mkdir()
    write_jsonl(tmp_path / ".hidden" / "c.jsonl", ROWS)
    source = load_source(dataset(tmp_path), 0)
    assert source.rows == ROWS
    assert source.where(6) == f"{tmp_path / 'b.jsonl'}:2: row 2"
    only_b = load_source(dataset(tmp_path, data_files="b*.jsonl"), 0)
    assert only_b.rows == ROWS[5:]


def test_jsonl_blank_lines_keep_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "gaps.jsonl", ROWS[:3], blank_lines=True)
    assert load_source(dataset(path), 0).where(2) == f"{path}:5: row 3"


@pytest.mark.parametrize(("text", "message"), [
    ('{"a": 1}\n{"a": \n', ":2: not valid JSON"),
    ('{"a": 1}\n[1, 2]\n', ":2: expected a JSON object per line, got list"),
    ('[{"a": 1},\n {"a": }]', ":2: not valid JSON"),
])
def test_malformed_json_names_the_line(tmp_path, text, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(UserError, match=str(path) + message):
        load_source(dataset(path), 0)


def test_missing_paths(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_source(dataset(tmp_path / "nope.jsonl"), 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no data files in this directory"):
        load_source(dataset(tmp_path / "empty"), 0)


@pytest.mark.parametrize(("split", "expected"), [
    ("train", (0, 10)), ("train[:20%]", (0, 2)), ("train[3:7]", (3, 7)), ("train[-3:]", (7, 10)),
    ("train[:-25%]", (0, 8)), ("train[:500]", (0, 10)), ("train[15%:]", (2, 10)),
])
def test_split_slices_like_datasets(split, expected):
    assert split_range(split, 10, "x") == expected


def test_split_slicing_agrees_with_the_datasets_library():
    from datasets import ReadInstruction

    for spec in ("train[:20%]", "train[33%:66%]", "train[-15%:]", "train[5:-5]", "train[:-1%]"):
        [absolute] = ReadInstruction.from_spec(spec).to_absolute({"train": 37})
        assert split_range(spec, 37, "x") == (absolute.from_, absolute.to), spec


def test_local_files_have_only_a_train_split(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ROWS)
    with pytest.raises(UserError, match="local files hold one split, 'train'; got 'test'"):
        load_source(dataset(path, split="test"), 0)
    assert load_source(dataset(path, split="train[:30%]"), 0).rows == ROWS[:3]


def test_sample_takes_a_seeded_subset_after_the_split(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ROWS)
    half = load_source(dataset(path, sample=0.5), seed=1)
    assert len(half.rows) == 5 and half.rows == load_source(dataset(path, sample=0.5), seed=1).rows
    assert half.rows != load_source(dataset(path, sample=0.5), seed=2).rows
    assert all(row in ROWS for row in half.rows) and half.rows == sorted(half.rows, key=ROWS.index)
    three = load_source(dataset(path, split="train[:6]", sample=3), seed=1)
    assert len(three.rows) == 3 and all(ROWS.index(r) < 6 for r in three.rows)
    assert [three.where(p) for p in three.positions] == [f"{path}:{ROWS.index(r) + 1}: row {ROWS.index(r) + 1}"
                                                        for r in three.rows]
    with pytest.raises(ValueError, match="whole number"):
        dataset(path, sample=2.5)

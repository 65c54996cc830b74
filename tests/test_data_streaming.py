"""Data files read as streams give the rows and the errors of reading the whole text, in bounded memory.

The reference here is how the files were read before: the whole text decoded, then ``json.loads``,
``csv.DictReader`` or ``str.splitlines`` over it.
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from axlora.config.datasets import DatasetConfig
from axlora.core.errors import UserError
from axlora.data.json_array import JsonArrayRows, JsonDocument
from axlora.data.line_rows import CsvRows, TextLinesRows
from axlora.data.sources import load_source, read_text

ROWS = [
    {"instruction": "naïve café ☕", "input": "", "output": "line\u2028separator"},
    {"instruction": "x" * 300, "input": "tab\there", "output": "1e5", "n": -1.5e-3, "ok": True, "none": None},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "日本語"}]}], "z": [1, 2.0, [3]]},
    {"instruction": "quote \" and \\ backslash", "input": "😀", "output": "{[,]}"},
]


def whole_json(path: Path) -> list:
    """The rows (or the error message) of ``json.loads`` over the whole text, as files were read before."""
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg} (column {exc.colno}).") from None
    for index, item in enumerate(data if isinstance(data, list) else [data]):
        if not isinstance(item, dict):
            raise UserError(f"{path}: row {index + 1}: expected a JSON object, got {type(item).__name__}.")
    return data if isinstance(data, list) else [data]


def outcome(read, path):
    try:
        return list(read(path))
    except UserError as exc:
        return str(exc)


@pytest.mark.parametrize("chunk_bytes", [3, 17, 1 << 20])
@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_array_streamed_gives_the_rows_of_json_loads(tmp_path, chunk_bytes, indent):
    path = tmp_path / "rows.json"
    rows = ROWS * 5
    path.write_text(json.dumps(rows, indent=indent, ensure_ascii=False), encoding="utf-8")
    streamed = JsonArrayRows.index(path, chunk_bytes=chunk_bytes)
    assert list(streamed) == rows == whole_json(path)
    assert streamed[7] == rows[7]  # any row by position, after the pass


def mutations(text: str, count: int, seed: int) -> list[str]:
    """``text`` with one character deleted, doubled or replaced by a JSON-significant one, at random places."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        at = rng.randrange(1, len(text))
        kind = rng.choice(["delete", "double", "replace"])
        if kind == "delete":
            out.append(text[:at] + text[at + 1:])
        elif kind == "double":
            out.append(text[:at] + text[at] + text[at:])
        else:
            out.append(text[:at] + rng.choice(',:[]{}"\\ 1e-\n') + text[at + 1:])
    return out


@pytest.mark.parametrize("chunk_bytes", [5, 1 << 20])
def test_a_broken_json_array_is_named_as_json_loads_names_it(tmp_path, chunk_bytes):
    good = json.dumps([{"a": "é", "b": [1, 2]}, {"c": "日本"}, {"d": 1.5}], indent=1, ensure_ascii=False)
    cases = ["[", "[1", "[1,", '[{"a": 1},]', '[{"a": 1}] x', '[{"a": 1} {"b": 2}]', '[{"a": 1}, 2, {"b"',
             '[{"a": 1}, 2]', '["x", {"a": 1}]', "[]", '[{"a": 12', '[{"a": 1e', "[\n\n  {\"a\": tru}]"]
    cases += [text for text in mutations(good, 400, seed=1) if text.lstrip().startswith("[")]
    for number, text in enumerate(cases):
        path = tmp_path / f"case{number}.json"
        path.write_text(text, encoding="utf-8")
        expected = outcome(whole_json, path)
        assert outcome(lambda p: JsonArrayRows.index(p, chunk_bytes=chunk_bytes), path) == expected, text


def test_invalid_utf8_anywhere_is_named_before_a_json_error(tmp_path):
    path = tmp_path / "rows.json"
    path.write_bytes(b'[{"a": 1},\n {"a": }\n, {"b": "caf\xe9"}]')  # the JSON error comes first in the file
    with pytest.raises(UserError, match=r"rows.json:3: not valid UTF-8 \(byte 0xe9 at column 13\)"):
        JsonArrayRows.index(path, chunk_bytes=4)
    split = tmp_path / "split.json"  # a character cut by a chunk boundary is still whole
    split.write_bytes(b'[{"a": "\xe6\x97\xa5"}]')
    assert list(JsonArrayRows.index(split, chunk_bytes=9)) == [{"a": "日"}]


class CountingReader:
    """A binary file that counts the bytes it has handed out."""

    def __init__(self, handle):
        self.handle, self.bytes_read = handle, 0

    def read(self, size=-1):
        data = self.handle.read(size)
        self.bytes_read += len(data)
        return data

    def seek(self, offset, whence=0):
        return self.handle.seek(offset, whence)


def test_a_json_array_is_read_as_a_stream_not_whole(tmp_path):
    path = tmp_path / "large.json"
    path.write_text(json.dumps([{"text": f"row {n} " + "word " * 20} for n in range(20000)]))
    size, chunk = path.stat().st_size, 1 << 14
    with open(path, "rb") as handle:
        counting = CountingReader(handle)
        elements = iter(JsonDocument(path, counting, chunk_bytes=chunk))
        first, _start, _end = next(elements)
        assert first["text"].startswith("row 0 ") and counting.bytes_read <= chunk + 3
        for _value, _start, end in elements:  # never more than a chunk or two ahead of the element parsed
            assert counting.bytes_read <= end + 2 * chunk
    assert size <= counting.bytes_read <= size + 3 and size > 100 * chunk  # (+3: the look for a BOM)


def whole_csv(path: Path) -> tuple[list, list]:
    rows, numbers = [], []
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    start = 2
    try:
        for row in reader:
            rows.append({k: v for k, v in row.items() if k is not None})
            numbers.append(start)
            start = reader.line_num + 1
    except csv.Error as exc:
        raise UserError(f"{path}:{reader.line_num}: not valid CSV: {exc}.") from None
    return rows, numbers


def test_csv_streamed_gives_the_rows_and_lines_of_the_whole_text(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes(
        b"\xef\xbb\xbfinstruction,input,output\r\n"
        b'i0,,"two\nlines"\r\n'
        b"\r\n"
        b"i1,caf\xc3\xa9,1\rshort,row\n"  # a lone \r ends a line, as universal newlines read it
        b'i2,"quoted, comma",x,extra,fields\n'
        b"\n\n"
        b'i3,"a ""quote""","\r\nmore"\n'
        b"last,no,newline"
    )
    streamed = CsvRows.index(path)
    rows, numbers = whole_csv(path)
    assert list(streamed) == rows and len(rows) == 6
    assert [streamed.line_of(i) for i in range(len(rows))] == numbers
    assert load_source(DatasetConfig(path=str(path), type="alpaca"), 0).where(3) == f"{path}:{numbers[3]}: row 4"


def test_a_csv_error_and_invalid_utf8_are_named_as_before(tmp_path):
    path = tmp_path / "wide.csv"
    path.write_text("a,b\n1,2\n3," + "x" * (csv.field_size_limit() + 1) + "\n5,6\n")
    with pytest.raises(UserError) as streamed:
        CsvRows.index(path)
    with pytest.raises(UserError) as whole:
        whole_csv(path)
    assert str(streamed.value) == str(whole.value) and ": not valid CSV: field larger" in str(whole.value)
    path.write_bytes(path.read_bytes() + b"\xff\n")  # invalid UTF-8 after the CSV error is named instead
    with pytest.raises(UserError, match=r"wide.csv:5: not valid UTF-8 \(byte 0xff at column 1\)"):
        CsvRows.index(path)


def test_text_streamed_gives_the_lines_of_splitlines(tmp_path):
    path = tmp_path / "notes.txt"
    text = "first\r\nsecond\rthird\n\nfourth\x1cfifth\u2028sixth\x85seventh\n  \nlast without newline"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    streamed = TextLinesRows.index(path)
    assert list(streamed) == [{"text": line} for line in read_text(path).splitlines()]
    assert len(streamed) == 10
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(UserError, match=r"blank.txt: the data file is empty\."):
        TextLinesRows.index(tmp_path / "blank.txt")


def test_parquet_is_read_a_batch_at_a_time_into_a_mapped_spool(tmp_path, monkeypatch):
    from axlora.data import sources

    rows = [{"text": f"row {n} é", "n": n, "tags": ["a"] * (n % 3), "meta": {"k": n} if n % 2 else None}
            for n in range(1000)]
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=128)
    monkeypatch.setattr(sources, "PARQUET_BATCH_ROWS", 100)
    before = pa.total_allocated_bytes()
    source = load_source(DatasetConfig(path=str(path), type="completion"), 0)
    assert pa.total_allocated_bytes() - before < 64 * 1024  # the table stays in the mapped spool
    assert list(source.rows) == pq.read_table(path).to_pylist() == rows
    (tmp_path / "not.parquet").write_text("not parquet")
    with pytest.raises(UserError, match=r"not.parquet: cannot read Parquet"):
        load_source(DatasetConfig(path=str(tmp_path / "not.parquet"), type="completion"), 0)


def test_a_one_object_json_file_and_json_lines_still_choose_their_reader(tmp_path):
    one = tmp_path / "one.json"
    one.write_text("\n\n" + json.dumps(ROWS[2], indent=2))
    source = load_source(DatasetConfig(path=str(one), type="alpaca"), 0)
    assert list(source.rows) == [ROWS[2]] and source.where(0) == f"{one}:3: row 1"
    broken_lines = tmp_path / "broken.jsonl"  # a broken first line, then JSON Lines: one document, "Extra data"
    broken_lines.write_text('{"a": 1,\n{"a": 2}\n')
    assert outcome(lambda p: load_source(DatasetConfig(path=str(p), type="alpaca"), 0).rows, broken_lines) == \
        outcome(whole_json, broken_lines)

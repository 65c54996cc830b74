"""Data files as other tools write them: one JSON object, a BOM, content parts; and the files that cannot be
read (invalid UTF-8, empty, a FIFO), and bad rows named in file order."""

from __future__ import annotations

import json
import os

import pytest

from axlora.config.datasets import DatasetConfig
from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.data.prepare import prepare_data
from axlora.data.sources import load_source, local_files
from axlora.model.tokenizer import tokenizer_fingerprint

ROWS = [{"instruction": f"i{n}", "input": "", "output": str(n)} for n in range(4)]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def rows_of(path, **keys):
    return load_source(DatasetConfig(path=str(path), type="alpaca", **keys), seed=0).rows


def test_json_file_with_one_object_an_array_or_lines_and_a_bom(tmp_path):
    (tmp_path / "one.json").write_text(json.dumps(ROWS[0], indent=2))
    (tmp_path / "array.json").write_text(json.dumps(ROWS, indent=2))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in ROWS).encode())
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS).encode())
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbfinstruction,input,output\ni0,,0\n")
    assert rows_of(tmp_path / "one.json") == ROWS[:1]
    for name in ("array.json", "lines.json", "bom.jsonl", "bom.json"):
        assert rows_of(tmp_path / name) == ROWS, name
    assert rows_of(tmp_path / "bom.csv") == ROWS[:1]  # the first column keeps its name


def test_a_broken_pretty_printed_object_is_reported_once_at_its_line(tmp_path):
    (tmp_path / "one.json").write_text('{\n  "instruction": "a",\n  "output": \n}\n')
    with pytest.raises(UserError, match=r"one.json:4: not valid JSON: Expecting value"):
        rows_of(tmp_path / "one.json")


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"latin1.jsonl:3: not valid UTF-8 \(byte 0xe9 at column 14\)"):
        rows_of(path)
    text = tmp_path / "latin1.txt"
    text.write_bytes(b"fine\n\xff\n")
    with pytest.raises(UserError, match=r"latin1.txt:2: not valid UTF-8"):
        rows_of(text)


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_an_empty_file_is_named(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=r"empty.jsonl: the data file is empty\."):
        rows_of(path)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(UserError, match=r"empty.json: the data file holds no rows\."):
        rows_of(tmp_path / "empty.json")


def test_a_fifo_is_named_as_such_and_never_opened(tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match=r"pipe.jsonl: not a regular file or a directory \(a FIFO"):
        local_files(DatasetConfig(path=str(fifo), type="alpaca"))
    (tmp_path / "rows.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    assert rows_of(tmp_path) == ROWS[:1]  # a directory skips the FIFO beside its data file


def config_for(tmp_path, *datasets, **settings) -> Config:
    return Config.model_validate({
        "base_model": "/models/x", "lora_target_linear": True, "max_steps": 1, "sequence_len": 96,
        "output_dir": str(tmp_path / "out"), "datasets": list(datasets), **settings,
    })


def prepare(config, tokenizer):
    return prepare_data(config, tokenizer, tokenizer_fingerprint(tokenizer), log=lambda line: None)


def test_bad_rows_are_listed_in_file_order_with_the_count(tmp_path, tokenizer):
    rows = [dict(ROWS[n % 4]) for n in range(30)]
    for line in (3, 5, 9, 12, 20, 28, 30):
        del rows[line - 1]["output"]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError) as info:
        prepare(config_for(tmp_path, {"path": str(path), "type": "alpaca"}, seed=7), tokenizer)
    lines = str(info.value).splitlines()
    assert lines[0] == "7 rows cannot be used (the first 5, in file order):"
    assert [line.strip().split(": ")[0] for line in lines[1:6]] == [f"{path}:{n}" for n in (3, 5, 9, 12, 20)]
    assert lines[1].strip() == f"{path}:3: row 3: missing field 'output' (type alpaca)."
    assert lines[-1].strip() == "... and 2 more"


def test_bad_json_lines_are_all_counted(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"a": \n[1]\n{"a": 2}\n')
    with pytest.raises(UserError) as info:
        rows_of(path)
    assert str(info.value).splitlines() == [
        "2 lines cannot be used (the first 2, in file order):",
        f"  {path}:2: not valid JSON: Expecting value (column 7).",
        f"  {path}:3: expected a JSON object per line, got list.",
    ]


def test_content_as_a_list_of_text_parts_trains_like_a_string(tmp_path, tokenizer):
    plain = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello you"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "hello you"}]}]
    for name, messages in (("plain", plain), ("parts", parts)):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    got = {
        name: list(prepare(config_for(tmp_path, {"path": str(tmp_path / f"{name}.jsonl"), "type": "chat_template"},
                                      chat_template="chatml"), tokenizer).train)
        for name in ("plain", "parts")
    }
    assert got["parts"] == got["plain"] and len(got["plain"]) == 1

"""pretraining_dataset's stream: documents read from every file format, tokenized and packed, and read again from a
saved position exactly as an uninterrupted read goes on."""

from __future__ import annotations

import csv
import itertools
import json

import pytest
import torch

from axlora.config.load import load_config
from axlora.core.errors import UserError
from axlora.data.collate import PackedCollator, model_inputs
from axlora.data.pretraining_pack import CorpusStream, StreamPosition, check_corpus
from axlora.data.pretraining_read import _hub_documents, documents
from axlora.train.pretraining_rows import StreamedRows

TEXTS = [f"{a}+{b}={a + b}" + " and more" * (a % 7) for a, b in zip(range(40), range(40, 80), strict=True)]
TEXTS[5] = ""  # empty documents are counted but add no tokens


def _config(make_config, corpus, **overrides):
    entry = corpus if isinstance(corpus, dict) else {"path": str(corpus)}
    keys = {"datasets": None, "pretraining_dataset": [entry], "sequence_len": 32, "sample_packing": True, **overrides}
    return load_config(make_config(**keys), log=lambda _note: None)


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": text, "id": i}) + "\n" for i, text in enumerate(TEXTS)))
    return path


def _written(tmp_path, kind: str):
    """The corpus TEXTS in one file of ``kind``."""
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "corpus.parquet"
        pq.write_table(pa.table({"text": TEXTS}), path, row_group_size=7)
    elif kind == "json":
        path = tmp_path / "corpus.json"
        path.write_text(json.dumps([{"text": text} for text in TEXTS], indent=2))
    elif kind == "csv":
        path = tmp_path / "corpus.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerows([["text"], *([text] for text in TEXTS)])
    else:
        path = tmp_path / "corpus.txt"
        path.write_text("".join(text + "\n" for text in TEXTS))
    return path


@pytest.mark.parametrize("kind", ["parquet", "json", "csv", "text"])
def test_every_file_format_streams_the_same_documents_and_skips_to_any_of_them(make_config, tmp_path, kind):
    config = _config(make_config, _written(tmp_path, kind))
    entry = config.pretraining_dataset[0]
    assert list(documents(entry)) == TEXTS
    assert list(documents(entry, start=9)) == TEXTS[9:]  # parquet: row groups before it are not read
    skipped = entry.model_copy(update={"skip": 3})
    assert list(documents(skipped, start=4)) == TEXTS[7:]


def test_a_directory_a_glob_and_axolotl_path_json_read_the_files_in_order(make_config, tmp_path, monkeypatch):
    folder = tmp_path / "shards"
    folder.mkdir()
    for index in range(3):
        (folder / f"part-{index}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in TEXTS[index * 10:(index + 1) * 10]))
    expected = TEXTS[:30]
    for entry in ({"path": str(folder)}, {"path": str(folder / "part-*.jsonl")},
                  {"path": str(folder), "data_files": "part-*.jsonl"}):
        assert list(documents(_config(make_config, entry).pretraining_dataset[0], start=12)) == expected[12:]
    monkeypatch.chdir(folder)  # Axolotl's local-file form: path names the builder, data_files the files
    entry = _config(make_config, {"path": "json", "data_files": ["part-0.jsonl", "part-1.jsonl"]})
    assert list(documents(entry.pretraining_dataset[0])) == TEXTS[:20]


def test_hub_datasets_stream_through_datasets_with_skip(make_config, corpus):
    # the same call a Hub name makes, on a local file: datasets' json builder in streaming mode
    entry = _config(make_config, {"path": "json", "data_files": str(corpus)}).pretraining_dataset[0]
    assert list(itertools.islice(_hub_documents(entry, 4), 6)) == TEXTS[4:10]


def test_bad_corpus_rows_name_the_file_and_line(make_config, tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"body": "no text"}\n')
    config = _config(make_config, path)
    with pytest.raises(UserError, match=r"bad.jsonl:3: no 'text' field \(has: body\); set text_column"):
        list(documents(config.pretraining_dataset[0]))
    path.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not a JSON object"):
        list(documents(config.pretraining_dataset[0]))
    import pyarrow as pa
    import pyarrow.parquet as pq

    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), numbers)
    with pytest.raises(UserError, match="column 'text' holds int64, not text"):
        list(documents(_config(make_config, numbers).pretraining_dataset[0]))
    path.write_text('{"text": ""}\n{"text": null}\n')
    with pytest.raises(UserError, match="no text to train on"):
        check_corpus(config, tokenizer, say=lambda _: None)


@pytest.mark.parametrize("packing", [True, False])
def test_rows_hold_every_token_once_in_order_with_eos_between_documents(make_config, corpus, tokenizer, packing):
    config = _config(make_config, corpus, sample_packing=packing)
    stream = CorpusStream(config, tokenizer, say=lambda _: None)
    expected = [t for text in TEXTS if text for t in [*tokenizer(text)["input_ids"], tokenizer.eos_token_id]]
    tokens, rows = [], []
    for row, _ in stream.rows():
        rows.append(row)
        tokens += row["input_ids"]
        if len(tokens) >= len(expected):
            break
    assert tokens[:len(expected)] == expected  # nothing lost, nothing twice; long documents cut into pieces
    assert all(len(row["input_ids"]) <= config.sequence_len and row["labels"] == row["input_ids"] for row in rows)
    if not packing:
        assert all(len(row["seq_lens"]) == 1 for row in rows)  # one document piece a row
    else:
        assert max(len(row["seq_lens"]) for row in rows) > 1  # short documents share rows
        for row in rows:  # positions restart at every document piece
            assert row["position_ids"] == [p for n in row["seq_lens"] for p in range(n)]


def test_reading_from_a_saved_position_continues_at_the_exact_token(make_config, corpus, tokenizer):
    config = _config(make_config, corpus, sequence_len=24)
    stream = CorpusStream(config, tokenizer, say=lambda _: None)
    uninterrupted = list(itertools.islice(stream.rows(), 120))  # several passes over the corpus
    assert any(position.offset for _, position in uninterrupted)  # some rows start inside a long document
    assert uninterrupted[-1][1].passes >= 1
    for cut in (1, 7, 33, len(uninterrupted) - 5):
        saved = StreamPosition.from_dict(json.loads(json.dumps(uninterrupted[cut - 1][1].as_dict())))
        resumed = list(itertools.islice(stream.rows(saved), len(uninterrupted) - cut))
        assert resumed == uninterrupted[cut:]


def test_streamed_rows_are_read_forward_and_only_a_step_of_them_is_kept(make_config, corpus, tokenizer):
    config = _config(make_config, corpus, sequence_len=24)
    rows = StreamedRows(CorpusStream(config, tokenizer, say=lambda _: None), planned_rows=40, keep=4)
    reference = [row for row, _ in itertools.islice(CorpusStream(config, tokenizer).rows(), 40)]
    assert [rows[i] for i in (1, 3, 0, 2)] == [reference[i] for i in (1, 3, 0, 2)]  # a step's rows, any order
    state = rows.state_at(8)
    assert rows[9] == reference[9] and len(rows._recent) <= 4
    with pytest.raises(IndexError):
        rows[2]  # let go: memory holds about one step, never the corpus
    again = StreamedRows(CorpusStream(config, tokenizer, say=lambda _: None), planned_rows=40, keep=4)
    again.restore(json.loads(json.dumps(state)))
    assert [again[i] for i in range(8, 12)] == reference[8:12]


def test_packed_documents_do_not_attend_to_each_other(make_config, corpus, tokenizer, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    config = _config(make_config, corpus, sequence_len=32)
    row = next(row for row, _ in CorpusStream(config, tokenizer).rows() if len(row["seq_lens"]) >= 2)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = PackedCollator(pad_token_id=tokenizer.pad_token_id)([row])
    first = row["seq_lens"][0]
    second = row["input_ids"][first:first + row["seq_lens"][1]]
    with torch.no_grad():
        packed = model(**model_inputs(batch)).logits[0, first:first + len(second)]
        alone = model(input_ids=torch.tensor([second])).logits[0]
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)

"""Long samples: completion documents split into sequence_len pieces by default, and an enormous row cut
before it is tokenized whole."""

from __future__ import annotations

import json

import numpy as np
import pytest

from axlora.config.schema import Config
from axlora.data import tokenize
from axlora.data.prepare import prepare_data
from axlora.model.tokenizer import tokenizer_fingerprint

WORDS = " ".join(f"w{n % 97}" for n in range(600))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def prepare(tmp_path, tokenizer, rows, kind, **settings):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = Config.model_validate({
        "base_model": "/models/x", "lora_target_linear": True, "max_steps": 1, "sequence_len": 64,
        "output_dir": str(tmp_path / "out"), "datasets": [{"path": str(path), "type": kind}], **settings,
    })
    return prepare_data(config, tokenizer, tokenizer_fingerprint(tokenizer), log=lambda line: None)


def test_completion_splits_a_long_document_into_sequence_len_pieces(tmp_path, tokenizer):
    prepared = prepare(tmp_path, tokenizer, [{"text": WORDS}, {"text": "short one"}], "completion")
    bos = [tokenizer.bos_token_id] if tokenize.tokenizer_adds_bos(tokenizer) else []
    whole = [*bos, *tokenizer(WORDS, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    short = [*bos, *tokenizer("short one", add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    long_pieces = [row for row in prepared.train if row["input_ids"] != short]
    assert all(len(row["input_ids"]) <= 64 for row in prepared.train)
    # every token of the document is kept, in order, as consecutive pieces
    assert sum(len(r["input_ids"]) for r in long_pieces) == len(whole)
    assert sorted(r["input_ids"] for r in long_pieces) == sorted(whole[i:i + 64] for i in range(0, len(whole), 64))
    entry = prepared.report["datasets"][0]
    assert entry["split_long"] == 1 and entry["dropped_too_long"] == 0 and entry["length_strategy"] == "split"
    assert prepared.report["train_rows"] == -(-len(whole) // 64) + 1


def test_completion_still_drops_when_asked(tmp_path, tokenizer):
    prepared = prepare(tmp_path, tokenizer, [{"text": WORDS}, {"text": "short one"}], "completion",
                       excess_length_strategy="drop")
    assert prepared.report["train_rows"] == 1 and prepared.report["datasets"][0]["dropped_too_long"] == 1


@pytest.mark.parametrize("strategy", ["drop", "truncate"])
def test_an_enormous_row_is_cut_before_tokenizing(tmp_path, tokenizer, monkeypatch, strategy):
    seen = []
    real = tokenize.encode_texts

    def recording(tok, texts):
        seen.extend(len(t) for t in texts)
        return real(tok, texts)

    monkeypatch.setattr(tokenize, "encode_texts", recording)
    huge = {"instruction": "say it", "input": "", "output": WORDS * 400}  # ~1.4 million characters
    small = {"instruction": "add", "input": "", "output": "3"}
    prepared = prepare(tmp_path, tokenizer, [huge, small], "alpaca", excess_length_strategy=strategy)
    limit = tokenize.char_limit(tokenizer, 64)
    assert max(seen) <= limit < len(huge["output"]) // 10
    entry = prepared.report["datasets"][0]
    if strategy == "drop":
        assert entry["dropped_too_long"] == 1 and prepared.report["train_rows"] == 1
    else:
        assert entry["truncated"] == 1 and prepared.report["train_rows"] == 2
        [cut] = [row for row in prepared.train if len(row["input_ids"]) == 64]
        assert cut["input_ids"] == _alpaca_ids(tokenizer, huge)[:64]  # the first tokens of the uncut text


def _alpaca_ids(tokenizer, row):
    from axlora.data.formats import alpaca

    prompt, output = alpaca(row)
    ids = [tokenizer.bos_token_id] if tokenize.tokenizer_adds_bos(tokenizer) else []
    ids += tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
    return ids + tokenizer(output.text[:5000], add_special_tokens=False)["input_ids"]


def test_split_long_keeps_short_rows_and_cuts_marked_ones():
    from axlora.data.rows import TokenizedRows

    rows = TokenizedRows.from_lists([{"input_ids": list(range(10)), "labels": list(range(10))},
                                     {"input_ids": [7, 8], "labels": [7, 8]}])
    rows.origin = np.array([0, 1], np.int32)
    pieces = rows.split_long(4, np.array([True, False]))
    assert [r["input_ids"] for r in pieces] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [7, 8]]
    assert pieces.origin.tolist() == [0, 0, 0, 1]

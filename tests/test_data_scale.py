"""Data at scale: chunked writing, memory-mapped reading and packing over indices give today's rows exactly."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from axlora.config.schema import Config
from axlora.data import encode_pool
from axlora.data.demo_rows import addition_rows, write_jsonl
from axlora.data.formats import build_formats
from axlora.data.length_rule import apply_length_rule
from axlora.data.pack import PackedRows, pack_examples
from axlora.data.prepare import prepare_data
from axlora.data.rows import MappedRows, RowsWriter, TokenizedRows
from axlora.data.sources import load_source
from axlora.data.tokenize import char_limit, encode_rows
from axlora.model.tokenizer import tokenizer_fingerprint


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def mixed_config(tmp_path):
    """Alpaca rows (some too long: dropped) and long completion documents (split into pieces)."""
    alpaca = tmp_path / "alpaca.jsonl"
    rows = addition_rows(150, seed=7)
    for row in rows[::9]:
        row["output"] = row["output"] + " and more" * 30  # over sequence_len: dropped
    write_jsonl(rows, alpaca)
    documents = tmp_path / "docs.jsonl"
    rng = random.Random(3)
    documents.write_text("".join(json.dumps({"text": " ".join(["step"] * rng.randint(5, 120))}) + "\n"
                                 for _ in range(60)))
    return Config.model_validate({
        "base_model": "/models/x", "lora_target_linear": True, "max_steps": 1, "sequence_len": 64, "seed": 11,
        "datasets": [{"path": str(alpaca), "type": "alpaca"}, {"path": str(documents), "type": "completion"}],
        "val_set_size": 0.1, "output_dir": str(tmp_path / "out"),
    })


def reference_rows(config: Config, tokenizer) -> dict[str, list[dict]]:
    """The rows as preparing made them when each part was tokenized and filtered whole (before chunking)."""
    sources = [load_source(d, config.seed) for d in config.datasets]
    entries = [(i, p, r) for i, s in enumerate(sources) for p, r in zip(s.positions, s.rows, strict=True)]
    random.Random(config.seed).shuffle(entries)
    val_count = config.val_row_count(len(entries))
    formats = build_formats(config, tokenizer)
    limit = char_limit(tokenizer, config.sequence_len)
    limits = [None if config.length_strategy(d) == "split" else limit for d in config.datasets]
    out = {}
    for name, part in (("val", entries[:val_count]), ("train", entries[val_count:])):
        rows = encode_rows(part, formats, tokenizer, train_on_inputs=False, char_limits=limits)
        out[name] = list(apply_length_rule(rows, config, sources, part)[0])
    return out


@pytest.mark.parametrize("processes", [1, 2])
def test_chunked_preparation_gives_the_rows_of_a_whole_pass(mixed_config, tokenizer, monkeypatch, processes):
    expected = reference_rows(mixed_config, tokenizer)
    monkeypatch.setattr(encode_pool, "CHUNK_ROWS", 16)  # many chunks, so many record batches per part
    monkeypatch.setattr(encode_pool, "MIN_ROWS_PER_PROCESS", 20)
    config = mixed_config.model_copy(update={"dataset_processes": processes})
    prepared = prepare_data(config, tokenizer, tokenizer_fingerprint(tokenizer), log=lambda _: None)
    assert isinstance(prepared.train, MappedRows)
    assert list(prepared.train) == expected["train"] and list(prepared.val) == expected["val"]
    report = prepared.report
    assert report["split_long"] > 0 and report["dropped_too_long"] > 0
    assert report["train"]["tokens"] == sum(len(r["input_ids"]) for r in expected["train"])
    assert report["train"]["label_tokens"] == int(TokenizedRows.from_lists(expected["train"]).scored_counts().sum())
    assert report["train_rows"] == len(expected["train"]) and report["val_rows"] == len(expected["val"])
    assert sum(d["train_rows"] for d in report["datasets"]) == len(expected["train"])


def test_mapped_rows_read_a_stream_of_batches(tmp_path):
    rng = random.Random(0)
    rows = [{"input_ids": [rng.randint(0, 300) for _ in range(rng.randint(1, 12))]} for _ in range(50)]
    for row in rows:
        row["labels"] = [-100 if rng.random() < 0.3 else t for t in row["input_ids"]]
    whole = TokenizedRows.from_lists(rows)
    path = tmp_path / "rows.arrow"
    with RowsWriter(path) as writer:
        for start in range(0, 50, 7):
            part = TokenizedRows.from_lists(rows[start:start + 7])
            writer.write(part.select(np.ones(len(part), bool)))  # offsets rebased, as the length rule leaves them
    mapped = MappedRows(path)
    assert list(mapped) == rows and mapped[-1] == rows[-1] and mapped[20:23] == rows[20:23]
    assert np.array_equal(mapped.lengths, whole.lengths)
    assert np.array_equal(mapped.scored_counts(), whole.scored_counts())
    assert [mapped.length(i) for i in range(50)] == whole.lengths.tolist()
    with pytest.raises(IndexError):
        mapped[50]

    from datasets import Dataset

    assert Dataset.from_file(str(path)).to_list() == rows


def test_packing_over_indices_gives_the_packed_rows(tmp_path):
    rng = random.Random(1)
    rows = []
    for _ in range(200):
        ids = [rng.randint(1, 300) for _ in range(rng.randint(1, 40))]
        rows.append({"input_ids": ids, "labels": [t if rng.random() < 0.7 else -100 for t in ids]})
    samples = TokenizedRows.from_lists(rows)
    samples.save(tmp_path / "rows.arrow")
    expected = pack_examples(rows, 64)
    assert list(PackedRows(samples, 64)) == expected
    packed = PackedRows(MappedRows(tmp_path / "rows.arrow"), 64)
    assert len(packed) == len(expected) and packed[-1] == expected[-1] and list(packed) == expected
    assert packed.tokens == sum(len(r["input_ids"]) for r in rows)


@pytest.mark.parametrize("capacity", [8, 64, 512])
def test_the_packing_estimate_counts_the_rows_best_fit_makes_from_lengths_alone(capacity):
    from axlora.data.pack import PackingStats, pack_sequences
    from axlora.data.report import packed_row_count, packing_summary

    for seed in range(30):
        rng = np.random.default_rng(seed)
        spread = [capacity, max(1, capacity // 3), max(1, capacity // 10)][seed % 3]
        lengths = rng.integers(1, spread + 1, size=int(rng.integers(1, 400)))
        bins = pack_sequences(lengths.tolist(), capacity)
        assert packed_row_count(lengths, capacity) == len(bins), (seed, capacity)
    stats = PackingStats.from_bins(bins, lengths.tolist(), capacity)
    assert packing_summary(lengths, capacity) == {"rows": stats.rows, "samples": stats.samples, "tokens": stats.tokens,
                                                   "capacity": capacity, "fill": round(stats.fill, 4)}
    with pytest.raises(ValueError, match="more than the packing capacity"):
        packed_row_count(np.array([capacity + 1]), capacity)


class LengthsOnly:
    """Prepared rows that know their lengths; reading a row is a failure (grouping must not materialize rows)."""

    def __init__(self, lengths):
        self.lengths = np.asarray(lengths, dtype=np.int64)

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, index):
        raise AssertionError("a row was read")

    def __iter__(self):
        raise AssertionError("the rows were read")


def test_group_by_length_orders_from_the_length_array_as_it_did_from_the_rows():
    from axlora.train.data_order import DataOrder
    from axlora.train.length_groups import MEGA_BATCH_STEPS, LengthGroupedOrder, build_data_order

    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    config = Config.model_validate({"base_model": "/models/x", "lora_target_linear": True, "max_steps": 1,
                                    "datasets": [{"path": "d.jsonl", "type": "alpaca"}], "group_by_length": True,
                                    "micro_batch_size": 2, "gradient_accumulation_steps": 3, "seed": 5})
    schedule = build_data_order(config, LengthsOnly(lengths), world_size=2)
    assert isinstance(schedule, LengthGroupedOrder)
    assert schedule == build_data_order(config, [{"input_ids": [0] * n} for n in lengths], world_size=2)
    for epoch in range(2):  # the rows' order before: each mega-batch of the shuffle sorted longest first, stably
        shuffled = DataOrder(1000, 2, 3, 2, 5)._order(epoch)
        size = 12 * MEGA_BATCH_STEPS
        before = [row for start in range(0, 1000, size)
                  for row in sorted(shuffled[start:start + size], key=lambda row: -lengths[row])]
        assert list(schedule._order(epoch)) == before

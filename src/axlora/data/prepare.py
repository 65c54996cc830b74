"""Prepare the training data: read, take, shuffle, cut validation, tokenize, apply the length rule, cache.

The order is fixed and deterministic given ``seed``: every dataset is read (``split`` slicing and
``sample`` applied), the rows of all datasets are shuffled together, the validation rows
(``val_set_size``) are cut off before tokenization, then both parts are tokenized and samples longer
than ``sequence_len`` are dropped, truncated or refused (``excess_length_strategy``). Samples with no
token left to train are dropped (their loss would be 0/0). The result is cached by content (``cache.py``):
an unchanged config and unchanged files reuse it and print "cache hit".
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.data import cache
from axlora.data.length_rule import COUNTS, apply_length_rule, untrained_datasets
from axlora.data.rows import TokenizedRows
from axlora.data.segments import RowFormat
from axlora.data.sources import Source, load_source, local_files
from axlora.data.tokenize import Entry, RowError


@dataclass
class PreparedData:
    """Tokenized train/validation rows and what preparing did.

    ``train`` and ``val`` are sequences of ``{"input_ids": [...], "labels": [...]}`` (``rows.TokenizedRows``).
    """

    train: TokenizedRows
    val: TokenizedRows
    fingerprint: str
    report: dict[str, Any] = field(default_factory=dict)
    cache_dir: Path | None = None
    cache_hit: bool = False


def check_datasets(config: Config) -> list[list[Path]]:
    """Fail fast on what needs no tokenizer (paths, file types); returns each dataset's local files."""
    return [local_files(dataset) for dataset in config.datasets]


def prepare_data(config: Config, tokenizer, tokenizer_fingerprint: str, log: Callable[[str], None] = print) -> PreparedData:
    """Prepared data for ``config``: from the cache when its fingerprint matches, else built and cached.

    Logs one status line ("cache hit" or "prepared") and the report summary.
    """
    from axlora.data.formats import build_formats
    from axlora.data.report import format_summary

    files = check_datasets(config)
    formats = build_formats(config, tokenizer)
    for warning in dict.fromkeys(w for fmt in formats for w in fmt.warnings):
        log(f"warning: {warning}")
    fingerprint = cache.data_fingerprint(config, tokenizer_fingerprint, formats, files)
    cache_dir = cache.cache_root(config) / fingerprint
    if cache.is_complete(cache_dir):
        train, val, report = cache.read_entry(cache_dir)
        log(f"data: cache hit {cache_dir} ({len(train):,} train / {len(val):,} val rows)")
        prepared = PreparedData(train, val, fingerprint, report, cache_dir, cache_hit=True)
    else:
        started = time.perf_counter()
        prepared = build_prepared(config, tokenizer, formats, fingerprint)
        prepared.report["seconds"] = round(time.perf_counter() - started, 3)
        _write(prepared, cache_dir, config.sequence_len)
        log(f"data: prepared {len(prepared.train):,} train / {len(prepared.val):,} val rows in "
            f"{prepared.report['seconds']:.1f} s -> {cache_dir}")
    for line in format_summary(prepared.report, config.sample_packing):
        log(f"data: {line}")
    return prepared


def _write(prepared: PreparedData, cache_dir: Path, sequence_len: int) -> None:
    from axlora.data.report import write_histogram

    lengths = np.asarray(prepared.report.pop("_tokenized_lengths"))
    cache.write_entry(
        cache_dir, prepared.train, prepared.val, prepared.report,
        lambda path: write_histogram(lengths, sequence_len, path),
    )
    prepared.cache_dir = cache_dir


def build_prepared(config: Config, tokenizer, formats: Sequence[RowFormat], fingerprint: str) -> PreparedData:
    """Read, take, shuffle, split, tokenize and apply the length rule (no cache involved)."""
    sources = [load_source(dataset, config.seed) for dataset in config.datasets]
    entries: list[Entry] = [
        (index, position, row)
        for index, source in enumerate(sources)
        for position, row in zip(source.positions, source.rows, strict=True)
    ]
    random.Random(config.seed).shuffle(entries)
    val_count = config.val_row_count(len(entries))
    parts = {"val": entries[:val_count], "train": entries[val_count:]}
    if not parts["train"]:
        raise UserError(f"datasets: no training rows (read {len(entries)}, val_set_size takes {val_count}).")
    encoded = _encode(config, tokenizer, formats, sources, parts)
    kept, counts = {}, {}
    for name, rows in encoded.items():
        kept[name], counts[name] = apply_length_rule(rows, config, sources, parts[name])
    totals = {key: counts["train"][key] + counts["val"][key] for key in COUNTS}
    untrained = untrained_datasets(config, list(kept.values()), totals, [len(s.rows) for s in sources])
    if untrained:
        raise UserError("\n".join(untrained))
    report = _report(config, formats, sources, encoded, kept, totals)
    report["fingerprint"] = fingerprint
    return PreparedData(train=kept["train"], val=kept["val"], fingerprint=fingerprint, report=report)


def _encode(config: Config, tokenizer, formats: Sequence[RowFormat], sources: Sequence[Source],
            parts: dict[str, list[Entry]]) -> dict[str, TokenizedRows]:
    """Tokenize each part; a bad row stops it, naming every bad row of the datasets in file order."""
    from axlora.data.encode_pool import encode_in_chunks
    from axlora.data.tokenize import char_limit

    limit = char_limit(tokenizer, config.sequence_len)
    limits = [None if config.length_strategy(d) == "split" else limit for d in config.datasets]
    encoded = {}
    for name, part in parts.items():
        try:
            encoded[name] = encode_in_chunks(
                part, formats, tokenizer, train_on_inputs=config.train_on_inputs, processes=config.dataset_processes,
                char_limits=limits,
            )
        except RowError as exc:
            raise bad_rows_error(config, sources, formats, tokenizer, exc) from None
    return encoded


def _report(config: Config, formats: Sequence[RowFormat], sources: Sequence[Source],
            encoded: dict[str, TokenizedRows], kept: dict[str, TokenizedRows], totals: dict[str, np.ndarray]) -> dict:
    from axlora.data.report import length_summary, packing_summary, split_summary

    tokenized_lengths = np.concatenate([encoded["train"].lengths, encoded["val"].lengths])
    per_dataset = []
    for index, (dataset, source) in enumerate(zip(config.datasets, sources, strict=True)):
        entry = {
            "path": dataset.path, "type": formats[index].name, "split": dataset.split,
            "rows_read": source.rows_read, "rows_taken": len(source.rows),
            "train_rows": int(np.sum(kept["train"].origin == index)),
            "val_rows": int(np.sum(kept["val"].origin == index)),
            "length_strategy": config.length_strategy(dataset),
            "empty_turns": int(sum(np.sum(rows.empty_turns[rows.origin == index]) for rows in encoded.values())),
        }
        entry.update({key: int(totals[key][index]) for key in COUNTS})
        per_dataset.append(entry)
    return {
        "sequence_len": config.sequence_len,
        "excess_length_strategy": config.excess_length_strategy or "drop (split for completion)",
        "datasets": per_dataset,
        "rows_read": sum(e["rows_taken"] for e in per_dataset),
        "train_rows": len(kept["train"]),
        "val_rows": len(kept["val"]),
        **{key: sum(e[key] for e in per_dataset) for key in (*COUNTS, "empty_turns")},
        "train": split_summary(kept["train"]),
        "val": split_summary(kept["val"]),
        "train_tokens": int(kept["train"].lengths.sum()),
        "train_label_tokens": int(kept["train"].scored_counts().sum()),
        "lengths": length_summary(tokenized_lengths),
        "packing": packing_summary(kept["train"].lengths, config.sequence_len),
        "_tokenized_lengths": tokenized_lengths,
    }


def bad_rows_error(
    config: Config, sources: Sequence[Source], formats: Sequence[RowFormat], tokenizer, first: RowError
) -> UserError:
    """Every row its format cannot use, in file order: the first few with file, line and field, and the count.

    Rows are tokenized shuffled, so the first failure is random; this pass reads them in order instead.
    """
    from axlora.data.segments import RowFormatError
    from axlora.data.sources import problem_list
    from axlora.data.tokenize import pretokenized

    problems = []
    for index, (source, fmt) in enumerate(zip(sources, formats, strict=True)):
        kind = config.datasets[index].type or "empty: pre-tokenized rows"
        for position, row in zip(source.positions, source.rows, strict=True):
            try:
                pretokenized(row, len(tokenizer)) if fmt.pretokenized else fmt.segments(row)
            except RowFormatError as exc:
                problems.append(f"{source.where(position)}: {exc} (type {kind}).")
    if not problems:  # not reproducible in order (cannot happen with pure formats): name the one that failed
        problems.append(f"{sources[first.dataset_index].where(first.position)}: {first}.")
    return UserError(problem_list(problems, "rows"))

"""Prepare the training data: read, take, shuffle, cut validation, tokenize, apply the length rule, cache.

The order is fixed and deterministic given ``seed``: every dataset is read (``split`` slicing and
``sample`` applied), the rows of all datasets are shuffled together, the validation rows
(``val_set_size``) are cut off before tokenization, then both parts are tokenized and samples longer
than ``sequence_len`` are dropped, truncated, split or refused (``excess_length_strategy``). Samples with no
token left to train are dropped (their loss would be 0/0). Each part is tokenized and written a chunk at a
time (``part_writer.py``), so the tokens never sit in memory all at once. The result is cached by content
(``cache.py``): an unchanged config and unchanged files reuse it and print "cache hit".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.core.progress import RateProgress
from axlora.data import cache
from axlora.data.entries import ShuffledEntries
from axlora.data.length_rule import COUNTS, refused_error, untrained_datasets
from axlora.data.part_writer import PartTally, write_part
from axlora.data.rows import MappedRows, RowsWriter
from axlora.data.segments import RowFormat
from axlora.data.sources import Source, load_source, local_files
from axlora.data.tokenize import RowError


@dataclass
class PreparedData:
    """Tokenized train/validation rows and what preparing did.

    ``train`` and ``val`` are sequences of ``{"input_ids": [...], "labels": [...]}``, memory-mapped from the
    cache entry (``rows.MappedRows``).
    """

    train: MappedRows
    val: MappedRows
    fingerprint: str
    report: dict[str, Any] = field(default_factory=dict)
    cache_dir: Path | None = None
    cache_hit: bool = False


def check_datasets(config: Config) -> list[list[Path]]:
    """Fail fast on what needs no tokenizer (paths, file types); returns each dataset's local files."""
    return [local_files(dataset) for dataset in config.datasets]


def prepare_data(config: Config, tokenizer, tokenizer_fingerprint: str, log: Callable[[str], None] = print) -> PreparedData:
    """Prepared data for ``config``: from the cache when its fingerprint matches, else built and cached.

    Either way the rows are read back memory-mapped from the cache entry. Logs one status line ("cache hit"
    or "prepared") and the report summary.
    """
    from axlora.data.formats import build_formats
    from axlora.data.report import format_summary

    files = check_datasets(config)
    formats = build_formats(config, tokenizer)
    for warning in dict.fromkeys(w for fmt in formats for w in fmt.warnings):
        log(f"warning: {warning}")
    fingerprint = cache.data_fingerprint(config, tokenizer_fingerprint, formats, files)
    cache_dir = cache.cache_root(config) / fingerprint
    hit = cache.is_complete(cache_dir)
    passes: list[str] = []  # how reading and tokenizing went, logged after the status line
    if not hit:
        started = time.perf_counter()
        with cache.new_entry(cache_dir) as tmp:
            report, lengths = build_prepared(config, tokenizer, formats, fingerprint, tmp, log=passes.append)
            report["seconds"] = round(time.perf_counter() - started, 3)
            cache.finish_entry(tmp, report, lambda path: _plot(lengths, config.sequence_len, path))
    train, val, report = cache.read_entry(cache_dir)
    prepared = PreparedData(train, val, fingerprint, report, cache_dir, cache_hit=hit)
    if hit:
        log(f"data: cache hit {cache_dir} ({len(train):,} train / {len(val):,} val rows)")
    else:
        log(f"data: prepared {len(train):,} train / {len(val):,} val rows in {report['seconds']:.1f} s -> {cache_dir}")
    for line in passes:
        log(f"data: {line}")
    for line in format_summary(prepared.report, config.sample_packing):
        log(f"data: {line}")
    return prepared


def _plot(lengths: np.ndarray, sequence_len: int, path: Path) -> None:
    from axlora.data.report import write_histogram

    write_histogram(lengths, sequence_len, path)


def build_prepared(config: Config, tokenizer, formats: Sequence[RowFormat], fingerprint: str,
                   out_dir: Path, log: Callable[[str], None] | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """Read, take, shuffle, split, then tokenize each part into ``out_dir/{val,train}.arrow`` chunk by chunk.

    A progress line shows each long pass on a terminal; ``log`` hears one summary line per pass. Returns the
    report and every sample's length as tokenized (for the histogram).
    """
    sources = _read_sources(config, log)
    entries = ShuffledEntries.shuffled(sources, config.seed)
    if config.dataset_exact_deduplication:
        entries = _unique_entries(entries, config)
    val_count = config.val_row_count(len(entries))
    parts = {"val": entries.part(0, val_count), "train": entries.part(val_count, len(entries))}
    if not len(parts["train"]):
        raise UserError(f"datasets: no training rows (read {len(entries)}, val_set_size takes {val_count}).")
    with RateProgress("tokenized", total=len(entries)) as tokenizing:  # cleared before an error is printed
        tallies = _write_parts(config, tokenizer, formats, sources, parts, out_dir, tokenizing)
    if log:
        log(tokenizing.finish())
    for name, tally in tallies.items():
        if tally.refused is not None:
            raise refused_error(config, sources, parts[name][tally.refused], tally.refused_length)
    totals = {key: tallies["train"].counts[key] + tallies["val"].counts[key] for key in COUNTS}
    kept = tallies["train"].kept + tallies["val"].kept
    untrained = untrained_datasets(config, kept, totals, [len(s.rows) for s in sources])
    if untrained:
        raise UserError("\n".join(untrained))
    report = _report(config, formats, sources, tallies, totals)
    report["fingerprint"] = fingerprint
    return report, np.concatenate([tallies["train"].tokenized_lengths, tallies["val"].tokenized_lengths])


def _read_sources(config: Config, log: Callable[[str], None] | None) -> list[Source]:
    """Every dataset read (split slicing and ``sample`` applied), with the progress of the reading pass: rows found
    and an ETA from the bytes read of all the local files."""
    size = sum(path.stat().st_size for files in check_datasets(config) for path in files)
    sources = []
    with RateProgress("read", size=size or None) as reading:
        for dataset in config.datasets:
            rows_before, bytes_before = reading.done, reading.position
            progress = partial(_continued, reading, rows_before, bytes_before)
            sources.append(load_source(dataset, config.seed, progress=progress))
            reading.update(rows_before + sources[-1].rows_read)
    if log:
        log(reading.finish())
    return sources


def _continued(progress: RateProgress, rows_before: int, bytes_before: int, rows: int, position: int) -> None:
    progress.update(rows_before + rows, bytes_before + position)


def _unique_entries(entries: ShuffledEntries, config: Config) -> ShuffledEntries:
    """``dataset_exact_deduplication``: of rows equal in content and format, the first (before the validation cut,
    so no validation row is also trained on)."""
    import hashlib
    import json

    seen: set[bytes] = set()
    keep = []
    for index in range(len(entries)):
        dataset, _position, row = entries[index]
        key = json.dumps([config.datasets[dataset].type, row], sort_keys=True, default=str)
        digest = hashlib.sha256(key.encode()).digest()
        if digest not in seen:
            seen.add(digest)
            keep.append(index)
    kept = np.asarray(keep, dtype=np.int64)
    return ShuffledEntries(entries.sources, entries.dataset[kept], entries.position[kept])


def _write_parts(config: Config, tokenizer, formats: Sequence[RowFormat], sources: Sequence[Source],
                 parts: dict[str, ShuffledEntries], out_dir: Path, progress: RateProgress) -> dict[str, PartTally]:
    """Tokenize and write each part; a bad row stops it, naming every bad row of the datasets in file order."""
    from axlora.data.tokenize import char_limit

    limit = char_limit(tokenizer, config.sequence_len)
    limits = [None if config.length_strategy(d) == "split" else limit for d in config.datasets]
    tallies = {}
    for name, part in parts.items():
        try:
            with RowsWriter(out_dir / f"{name}.arrow") as writer:
                tallies[name] = write_part(config, tokenizer, formats, part, writer, limits, progress.advance)
        except RowError as exc:
            raise bad_rows_error(config, sources, formats, tokenizer, exc) from None
    return tallies


def _report(config: Config, formats: Sequence[RowFormat], sources: Sequence[Source],
            tallies: dict[str, PartTally], totals: dict[str, np.ndarray]) -> dict:
    from axlora.data.report import length_summary, packing_summary

    train, val = tallies["train"], tallies["val"]
    per_dataset = []
    for index, (dataset, source) in enumerate(zip(config.datasets, sources, strict=True)):
        entry = {
            "path": dataset.label, "type": formats[index].name, "split": dataset.split,
            "rows_read": source.rows_read, "rows_taken": len(source.rows),
            "train_rows": int(train.kept[index]), "val_rows": int(val.kept[index]),
            "length_strategy": config.length_strategy(dataset),
            "empty_turns": int(train.empty_turns[index] + val.empty_turns[index]),
        }
        entry.update({key: int(totals[key][index]) for key in COUNTS})
        per_dataset.append(entry)
    return {
        "sequence_len": config.sequence_len,
        "excess_length_strategy": config.excess_length_strategy or "drop (split for completion)",
        "datasets": per_dataset,
        "rows_read": sum(e["rows_taken"] for e in per_dataset),
        "train_rows": train.rows,
        "val_rows": val.rows,
        **{key: sum(e[key] for e in per_dataset) for key in (*COUNTS, "empty_turns")},
        "train": train.summary(),
        "val": val.summary(),
        "train_tokens": train.tokens,
        "train_label_tokens": train.label_tokens,
        "lengths": length_summary(np.concatenate([train.tokenized_lengths, val.tokenized_lengths])),
        "packing": packing_summary(train.kept_lengths, config.sequence_len),
    }


def bad_rows_error(
    config: Config, sources: Sequence[Source], formats: Sequence[RowFormat], tokenizer, first: RowError
) -> UserError:
    """Every row its format cannot use, in file order: the first few with file, line and field, and the count.

    Rows are tokenized shuffled, so the first failure is random; this pass reads them in order instead.
    """
    from axlora.data.row_readers import problem_list
    from axlora.data.segments import RowFormatError
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

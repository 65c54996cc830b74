"""Load datasets, split validation rows, tokenize, and cache the result keyed by content.

The cache key covers the bytes of every local data file, the tokenizer and each setting that changes the
result, so an edited row or a new ``sequence_len`` re-prepares and nothing else does. The cache directory is
written to a temporary sibling and renamed into place: a killed preprocess leaves nothing a later run trusts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from axlora.config.schema import Config, DatasetConfig
from axlora.data.formats import FORMATS, RowFormatError
from axlora.data.tokenize import tokenize_samples, tokenizer_adds_bos
from axlora.errors import UserError

CACHE_FORMAT_VERSION = "1"
_LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


@dataclass
class PreparedData:
    """Tokenized train/validation rows (``input_ids``/``labels`` lists) and what preparing did."""

    train: list[dict[str, list[int]]]
    val: list[dict[str, list[int]]]
    fingerprint: str
    report: dict[str, Any] = field(default_factory=dict)
    cache_dir: Path | None = None
    cache_hit: bool = False


def prepare_data(config: Config, tokenizer, tokenizer_fingerprint: str, log=print) -> PreparedData:
    """Prepared data for ``config``: from the cache when its key matches, else built and cached."""
    fingerprint = data_fingerprint(config, tokenizer_fingerprint)
    cache_root = Path(config.dataset_prepared_path or Path(config.output_dir) / "prepared")
    cache_dir = cache_root / fingerprint
    if (cache_dir / "report.json").exists():
        prepared = _read_cache(cache_dir, fingerprint)
        log(f"data: cache hit {cache_dir} ({len(prepared.train)} train / {len(prepared.val)} val rows)")
        return prepared
    prepared = build_prepared(config, tokenizer, fingerprint)
    _write_cache(prepared, cache_dir)
    prepared.cache_dir = cache_dir
    log(f"data: prepared {len(prepared.train)} train / {len(prepared.val)} val rows -> {cache_dir}")
    return prepared


def data_fingerprint(config: Config, tokenizer_fingerprint: str) -> str:
    """Hash of everything the prepared rows depend on: file contents, tokenizer and settings."""
    digest = hashlib.sha256()
    settings = {
        "version": CACHE_FORMAT_VERSION,
        "datasets": [d.model_dump() for d in config.datasets],
        "sequence_len": config.sequence_len,
        "train_on_inputs": config.train_on_inputs,
        "val_set_size": config.val_set_size,
        "seed": config.seed,
        "tokenizer": tokenizer_fingerprint,
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for dataset in config.datasets:
        for path in _local_files(dataset):
            digest.update(str(path.name).encode())
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def _local_files(dataset: DatasetConfig) -> list[Path]:
    path = Path(dataset.path)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _LOCAL_SUFFIXES)
    return []


def build_prepared(config: Config, tokenizer, fingerprint: str) -> PreparedData:
    """Read every dataset, shuffle with the seed, cut validation rows, then tokenize (in that order)."""
    import random

    rows: list[tuple[int, dict[str, Any]]] = []
    per_dataset = []
    for index, dataset in enumerate(config.datasets):
        loaded = load_rows(dataset)
        per_dataset.append({"path": dataset.path, "type": dataset.type, "rows_read": len(loaded)})
        rows.extend((index, row) for row in loaded)
    random.Random(config.seed).shuffle(rows)
    val_count = val_row_count(config.val_set_size, len(rows))
    val_rows, train_rows = rows[:val_count], rows[val_count:]
    if not train_rows:
        raise UserError(f"datasets: no training rows left (read {len(rows)}, val_set_size takes {val_count}).")
    add_bos = tokenizer_adds_bos(tokenizer)
    train, train_stats = _tokenize(train_rows, config, tokenizer, add_bos)
    val, val_stats = _tokenize(val_rows, config, tokenizer, add_bos)
    for entry, dropped in zip(per_dataset, train_stats["dropped_per_dataset"], strict=True):
        entry["dropped_too_long"] = dropped
    report = {
        "fingerprint": fingerprint,
        "datasets": per_dataset,
        "train_rows": len(train),
        "val_rows": len(val),
        "dropped_too_long": train_stats["dropped"] + val_stats["dropped"],
        "train_tokens": sum(len(r["input_ids"]) for r in train),
        "train_label_tokens": sum(sum(1 for t in r["labels"] if t != -100) for r in train),
        "sequence_len": config.sequence_len,
    }
    return PreparedData(train=train, val=val, fingerprint=fingerprint, report=report)


def val_row_count(val_set_size: float, total: int) -> int:
    """Validation rows: a fraction (<1) of ``total`` or a count (>=1), always leaving a training row."""
    if val_set_size <= 0:
        return 0
    if val_set_size < 1:
        return max(1, int(round(val_set_size * total)))
    return min(int(val_set_size), total - 1)


def _tokenize(rows, config: Config, tokenizer, add_bos: bool):
    samples = []
    origins = []
    for dataset_index, row in rows:
        dataset = config.datasets[dataset_index]
        try:
            samples.append(FORMATS[dataset.type](row))
        except RowFormatError as exc:
            row_id = row.get("__row__", "?")
            raise UserError(
                f"{dataset.path}: row {row_id}: {exc} (needed by type '{dataset.type}')."
            ) from None
        origins.append(dataset_index)
    tokenized = tokenize_samples(
        samples, tokenizer, train_on_inputs=config.train_on_inputs, add_bos=add_bos
    )
    kept = []
    dropped_per_dataset = [0] * len(config.datasets)
    for origin, sample in zip(origins, tokenized, strict=True):
        too_long = len(sample["input_ids"]) > config.sequence_len
        no_labels = all(t == -100 for t in sample["labels"][1:])
        if too_long or no_labels:
            dropped_per_dataset[origin] += 1
            continue
        kept.append(sample)
    return kept, {"dropped": sum(dropped_per_dataset), "dropped_per_dataset": dropped_per_dataset}


def load_rows(dataset: DatasetConfig) -> list[dict[str, Any]]:
    """Rows of one dataset entry as dicts, each tagged with its row number for error messages."""
    if dataset.type not in FORMATS:
        from axlora.config.load import did_you_mean

        raise UserError(
            f"datasets: unknown type '{dataset.type}'{did_you_mean(dataset.type, set(FORMATS))} "
            f"Supported: {', '.join(sorted(FORMATS))}."
        )
    path = Path(dataset.path)
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        _check_json_file(path)
    loaded = _load_with_datasets(dataset, path)
    rows = []
    for index, row in enumerate(loaded):
        row = dict(row)
        row["__row__"] = index + 1
        rows.append(row)
    return rows


def _load_with_datasets(dataset: DatasetConfig, path: Path):
    import datasets

    datasets.disable_progress_bars()
    try:
        if path.exists():
            files = dataset.data_files or [str(p) for p in _local_files(dataset)]
            if not files:
                raise UserError(f"{path}: no data files (.json, .jsonl, .parquet, .csv) found.")
            suffix = Path(files[0] if isinstance(files, list) else files).suffix
            builder = _LOCAL_SUFFIXES.get(suffix)
            if builder is None:
                raise UserError(f"{path}: unsupported file type '{suffix}'; use JSON, JSONL, Parquet or CSV.")
            return datasets.load_dataset(builder, data_files=files, split=dataset.split)
        if path.is_absolute() or dataset.path.startswith("."):
            raise UserError(f"{dataset.path}: dataset path not found.")
        return datasets.load_dataset(
            dataset.path, name=dataset.name, data_files=dataset.data_files, split=dataset.split
        )
    except UserError:
        raise
    except (ValueError, KeyError) as exc:
        raise UserError(f"{dataset.path}: cannot read split '{dataset.split}': {exc}") from None
    except Exception as exc:  # datasets raises many kinds; the user needs the path and the reason
        raise UserError(f"{dataset.path}: cannot load dataset: {type(exc).__name__}: {exc}") from None


def _check_json_file(path: Path) -> None:
    """Find the first malformed line of a JSON Lines file, so the message can name it."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        head = handle.read(1)
        handle.seek(0)
        if head == "[":
            try:
                json.load(handle)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}.") from None
            return
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: not valid JSON: {exc.msg} (column {exc.colno}).") from None
            if not isinstance(value, dict):
                raise UserError(f"{path}:{number}: expected a JSON object per line, got {type(value).__name__}.")


def _write_cache(prepared: PreparedData, cache_dir: Path) -> None:
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir.with_name(f".{cache_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for split in ("train", "val"):
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as handle:
                for row in getattr(prepared, split):
                    handle.write(json.dumps(row, separators=(",", ":")) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        # report.json is written last: its presence marks a complete cache entry
        (tmp / "report.json").write_text(json.dumps(prepared.report, indent=2))
        if cache_dir.exists():
            shutil.rmtree(tmp)
        else:
            tmp.rename(cache_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_cache(cache_dir: Path, fingerprint: str) -> PreparedData:
    def read(split: str) -> list[dict[str, list[int]]]:
        with open(cache_dir / f"{split}.jsonl", encoding="utf-8") as handle:
            return [json.loads(line) for line in handle]

    report = json.loads((cache_dir / "report.json").read_text())
    return PreparedData(
        train=read("train"), val=read("val"), fingerprint=fingerprint, report=report,
        cache_dir=cache_dir, cache_hit=True,
    )

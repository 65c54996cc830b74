"""The documents of a ``pretraining_dataset`` entry, read as a stream: one document's text at a time.

Nothing here holds more than a document (a Parquet batch, a JSON-array chunk) in memory, so a corpus may be far
larger than memory and disk cache. Local files are read by axlora itself, so a bad row is named by file and line
and a resume can skip documents cheaply (JSON Lines, CSV and text lines are counted, not parsed; Parquet skips
whole row groups). Hub datasets stream through ``datasets.load_dataset(..., streaming=True)``.

A document is numbered by its row in the entry (after ``skip``); rows without text still count, so the numbers
are the same whichever reader produced them and a saved position points at the same document on resume.
"""

from __future__ import annotations

import csv
import glob
import json
from collections.abc import Generator, Iterator
from pathlib import Path

from axlora.config.datasets import PretrainingDatasetConfig
from axlora.core.errors import UserError

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv",
           ".txt": "text", ".text": "text"}
"""Local corpus files by suffix."""

BUILDERS = {"json": "json", "parquet": "parquet", "csv": "csv", "text": "text"}
"""Axolotl's ``path: json`` (a ``datasets`` builder name) with ``data_files``: local files of that format."""

_CHUNK = 1 << 20  # characters of a JSON array read at a time
_PARQUET_BATCH = 1024  # Parquet rows read at a time


def documents(entry: PretrainingDatasetConfig, start: int = 0) -> Iterator[str | None]:
    """The texts of ``entry`` from document ``start`` on (None for a row without text)."""
    files = corpus_files(entry)
    first = entry.skip + start
    if files is None:
        yield from _hub_documents(entry, first)
        return
    for path, kind in files:
        first -= yield from READERS[kind](path, entry.text_column, first)


def corpus_files(entry: PretrainingDatasetConfig) -> list[tuple[Path, str]] | None:
    """The local files of ``entry`` with their formats, in reading order; None for a Hub dataset."""
    if entry.path in BUILDERS and entry.data_files and not Path(entry.path).exists():
        paths = _matches(Path.cwd(), entry.data_files)
        return [(path, BUILDERS[entry.path]) for path in paths]
    path = Path(entry.path).expanduser()
    if glob.has_magic(entry.path):
        found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not found:
            raise UserError(f"pretraining_dataset: no files match {entry.path}.")
        return [(p, _format(p)) for p in found]
    if not path.exists():
        if path.is_absolute() or entry.path.startswith((".", "~")) or path.suffix in FORMATS:
            raise UserError(f"pretraining_dataset: {entry.path}: file or directory not found.")
        return None  # a Hugging Face dataset name
    if path.is_file():
        return [(path, _format(path))]
    found = _matches(path, entry.data_files) if entry.data_files else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in FORMATS
        and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not found:
        raise UserError(f"pretraining_dataset: {path}: no corpus files (.jsonl, .json, .parquet, .csv, .txt).")
    return [(p, _format(p)) for p in found]


def _matches(directory: Path, patterns: str | list[str]) -> list[Path]:
    patterns = [patterns] if isinstance(patterns, str) else patterns
    found: list[Path] = []
    for pattern in patterns:
        matched = sorted(p for p in directory.glob(pattern) if p.is_file()) if not Path(pattern).is_absolute() \
            else sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_file())
        if not matched:
            raise UserError(f"pretraining_dataset: data_files {pattern!r}: no such file in {directory}.")
        found += [p for p in matched if p not in found]
    return found


def _format(path: Path) -> str:
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"{path}: unknown corpus file type '{path.suffix}'; use .jsonl, .json, .parquet, .csv or "
                        ".txt.")
    return kind


def _text_of(row, column: str, where: str) -> str | None:
    if not isinstance(row, dict):
        raise UserError(f"{where}: a corpus row must be an object with a '{column}' field.")
    if column not in row:
        raise UserError(f"{where}: no '{column}' field (has: {', '.join(map(str, row)) or 'none'}); set "
                        "text_column to the field holding the text.")
    text = row[column]
    if text is not None and not isinstance(text, str):
        raise UserError(f"{where}: '{column}' must be text, got {type(text).__name__}.")
    return text


def _json_lines(path: Path, column: str, skip: int) -> Generator[str | None, None, int]:
    """One JSON object a line; blank lines are not rows. Skipped lines are counted, not parsed.

    Each reader yields the texts after the first ``skip`` rows of its file and returns how many it skipped.
    """
    skipped = 0
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip(b" \t\r\n\xef\xbb\xbf"):
                continue
            if skipped < skip:
                skipped += 1
                continue
            try:
                row = json.loads(line.decode("utf-8").removeprefix("\ufeff"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise UserError(f"{path}:{number}: not a JSON object ({exc}).") from None
            yield _text_of(row, column, f"{path}:{number}")
    return skipped


def _json_file(path: Path, column: str, skip: int) -> Generator[str | None, None, int]:
    """``.json``: a JSON array of objects, streamed element by element, or JSON Lines."""
    with open(path, encoding="utf-8-sig") as handle:
        head = handle.read(_CHUNK)
        if not head.lstrip().startswith("["):
            return (yield from _json_lines(path, column, skip))
        return (yield from _json_array(path, handle, head, column, skip))


def _json_array(path: Path, handle, buffer: str, column: str, skip: int) -> Generator[str | None, None, int]:
    """Elements decoded one at a time from a sliding buffer; only the element being read is held whole."""
    decoder, position, index = json.JSONDecoder(), buffer.index("[") + 1, 0
    while True:
        position = _past_separators(buffer, position)
        if position < len(buffer) and buffer[position] == "]":
            return min(index, skip)
        try:
            row, position = decoder.raw_decode(buffer, position)
        except json.JSONDecodeError:  # the element runs past the buffer (or is broken): read on
            more = handle.read(_CHUNK)
            if not more:
                raise UserError(f"{path}: element {index + 1} of the JSON array is not valid JSON, or the array "
                                "is not closed.") from None
            buffer, position = buffer[position:] + more, 0
            continue
        index += 1
        if index > skip:
            yield _text_of(row, column, f"{path}: element {index}")


def _past_separators(buffer: str, position: int) -> int:
    while position < len(buffer) and (buffer[position].isspace() or buffer[position] == ","):
        position += 1
    return position


def _text_lines(path: Path, column: str, skip: int) -> Generator[str | None, None, int]:
    """A text file: each line is a document (as ``datasets``' text builder reads it)."""
    skipped = 0
    with open(path, encoding="utf-8-sig", newline=None) as handle:
        try:
            for line in handle:
                if skipped < skip:
                    skipped += 1
                    continue
                yield line.rstrip("\n")
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}: not UTF-8 text ({exc.reason}).") from None
    return skipped


def _csv_rows(path: Path, column: str, skip: int) -> Generator[str | None, None, int]:
    skipped = 0
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            if skipped < skip:
                skipped += 1
                continue
            yield _text_of(row, column, f"{path}:{reader.line_num}")
    return skipped


def _parquet(path: Path, column: str, skip: int) -> Generator[str | None, None, int]:
    """In batches of rows; row groups wholly before ``skip`` are not read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable Parquet file ({exc}).") from None
    names = parquet.schema_arrow.names
    if column not in names:
        raise UserError(f"{path}: no '{column}' column (has: {', '.join(names)}); set text_column.")
    kind = parquet.schema_arrow.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"{path}: column '{column}' holds {kind}, not text; set text_column to the text column.")
    first, skipped = 0, 0
    while first < parquet.num_row_groups and skipped + parquet.metadata.row_group(first).num_rows <= skip:
        skipped += parquet.metadata.row_group(first).num_rows
        first += 1
    groups = range(first, parquet.num_row_groups)
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH, row_groups=groups, columns=[column]):
        texts = batch.column(0).to_pylist()
        drop = min(skip - skipped, len(texts))
        skipped += drop
        yield from texts[drop:]
    return skipped


READERS = {"jsonl": _json_lines, "json": _json_file, "text": _text_lines, "csv": _csv_rows, "parquet": _parquet}


def _hub_documents(entry: PretrainingDatasetConfig, first: int) -> Iterator[str | None]:
    """A Hub dataset streamed by ``datasets`` (nothing downloaded ahead); ``skip`` reads past rows."""
    import datasets

    kwargs = {"name": entry.name, "data_files": entry.data_files}
    try:
        stream = datasets.load_dataset(entry.path, split=entry.split, streaming=True,
                                       **{k: v for k, v in kwargs.items() if v})
    except Exception as exc:  # datasets raises many kinds (network, missing files, bad split): name the dataset
        raise UserError(f"pretraining_dataset: cannot stream {entry.path} (split {entry.split}): "
                        f"{type(exc).__name__}: {exc}") from None
    for index, row in enumerate(stream.skip(first) if first else stream, start=first + 1):
        yield _text_of(row, entry.text_column, f"{entry.path} ({entry.split}): row {index}")

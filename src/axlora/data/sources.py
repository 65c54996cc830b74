"""Where rows come from: local files and directories, or Hugging Face datasets; then ``split`` and ``sample``.

Local files are read here rather than through ``datasets.load_dataset``: a bad row can then be named
by file and line and nothing is written to the Hugging Face cache. No file is held in memory: each is read
once as a stream to find its rows (JSON Lines and CSV line by line, a JSON array element by element, Parquet
a batch at a time), and rows are read by position when they are tokenized (``row_readers.py``); Arrow files
and Hub datasets (Arrow-backed) are memory-mapped. Suffixes: .jsonl/.json (JSON Lines or a JSON array of objects), .parquet, .csv (every value is
text, as a format expects), .arrow (Arrow IPC, as ``datasets`` saves), .txt (one ``text`` row per line);
``ds_type`` names the format of files whose suffix does not. An entry without ``path`` reads its ``data_files``:
local files (or glob patterns), in the order given.

``split`` works as in ``datasets``: local files hold one split, ``train``, and a slice takes part of it
(``train[:20%]``, ``train[100:600]``, ``train[-10%:]``; percentages round to the closest row). A dataset's
``sample`` then takes a random subset, drawn with ``seed`` and the dataset's path, so it is the same every
run and does not change when other datasets are added.
"""

from __future__ import annotations

import glob
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from axlora.config.datasets import SUFFIX_TYPES, DatasetConfig
from axlora.core.errors import UserError
from axlora.data.json_array import JsonArrayRows
from axlora.data.line_rows import CsvRows, TextLinesRows
from axlora.data.row_readers import BOM, ArrowRows, ConcatRows, JsonLinesRows, Progress, RowsView
from axlora.data.row_readers import problem_list as problem_list  # where callers have found it

_SPLIT_RE = re.compile(r"^(?P<split>\w[\w.-]*)(\[(?P<from>-?\d+%?)?:(?P<to>-?\d+%?)?\])?$")


@dataclass
class Source:
    """The rows of one ``datasets`` entry after ``split`` and ``sample``, and how to name where each came from.

    ``all_rows`` reads any row of the whole source by position (JSON Lines and Arrow files lazily, see
    ``row_readers``); ``positions`` are the rows taken, so ``rows`` holds no row until one is read.
    """

    all_rows: Sequence[dict[str, Any]]
    positions: np.ndarray
    """Index of each taken row in the whole source (all files concatenated), before slicing and sampling."""
    rows_read: int
    """Rows the source holds, before ``split`` slicing and ``sample``."""
    files: list[Path] = field(default_factory=list)
    _locator: Callable[[int], str] | None = None

    @property
    def rows(self) -> RowsView:
        """The taken rows, in order, read when used."""
        return RowsView(self.all_rows, self.positions)

    def where(self, position: int) -> str:
        """``file:line: row N`` (or ``file: row N``) of the row at ``position``, for error messages."""
        return self._locator(position) if self._locator else f"row {position + 1}"


def local_files(dataset: DatasetConfig) -> list[Path]:
    """The local files a dataset entry reads (empty for a Hub dataset); errors name the path."""
    if dataset.path is None:
        return _checked(named_data_files(dataset), dataset)
    path = Path(dataset.path)
    if not path.exists():
        if path.is_absolute() or dataset.path.startswith((".", "~")) or path.suffix in SUFFIX_TYPES:
            raise UserError(f"{dataset.path}: dataset file or directory not found.")
        return []  # a Hugging Face dataset name
    if path.is_file():
        files = [path]
    elif not path.is_dir():
        raise UserError(
            f"{path}: not a regular file or a directory (a FIFO, socket or device); data is read from files on disk."
        )
    elif dataset.data_files is not None:
        patterns = [dataset.data_files] if isinstance(dataset.data_files, str) else dataset.data_files
        files = sorted({p for pattern in patterns for p in path.glob(pattern) if p.is_file()})
        if not files:
            raise UserError(f"{path}: no files match data_files {patterns}.")
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIX_TYPES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise UserError(
                f"{path}: no data files in this directory (.jsonl, .json, .parquet, .csv, .arrow, .txt)."
            )
    return _checked(files, dataset)


def named_data_files(dataset: DatasetConfig) -> list[Path]:
    """The files of an entry without ``path``: each of its ``data_files`` in order, a glob pattern's matches sorted."""
    files: list[Path] = []
    for name in dataset.file_names():
        local = Path(name).expanduser()
        if glob.has_magic(name):
            matches = sorted(Path(found) for found in glob.glob(str(local)) if Path(found).is_file())
        else:
            matches = [local] if local.is_file() else []
        if not matches:
            what = "is a directory (give it as path)" if local.is_dir() else "not found"
            raise UserError(f"{name}: dataset file {what}; data_files without path are local files (a Hugging Face "
                            "dataset's files need path: <dataset name>).")
        files.extend(match for match in matches if match not in files)
    return files


def _checked(files: list[Path], dataset: DatasetConfig) -> list[Path]:
    """``files``, once each is known to have a format and to be readable."""
    for file in files:
        _file_type(file, dataset)
        try:
            with open(file, "rb") as handle:
                handle.read(1)
        except OSError as exc:
            raise UserError(f"{file}: cannot read the data file ({exc.strerror or exc}).") from None
    return files


def load_source(dataset: DatasetConfig, seed: int, progress: Progress = None) -> Source:
    """Read one ``datasets`` entry, apply its ``split`` slice and ``sample``; ``progress`` hears how far the
    reading pass over its files is (rows found, bytes read)."""
    files = local_files(dataset)
    source = _read_local(dataset, files, progress) if files else _read_hub(dataset)
    positions = np.arange(source.rows_read, dtype=np.int64)
    if files:
        start, stop = split_range(dataset.split, source.rows_read, where=dataset.label)
        positions = positions[start:stop]
    if dataset.shards is not None:
        start, stop = shard_range(len(positions), dataset.shards, dataset.shards_idx or 0)
        positions = positions[start:stop]
    if dataset.sample is not None:
        count = sample_count(dataset.sample, len(positions))
        picked = sorted(random.Random(f"{seed}:{dataset.label}").sample(range(len(positions)), count))
        positions = positions[np.asarray(picked, dtype=np.int64)]
    source.positions = positions
    return source


def shard_range(total: int, shards: int, index: int) -> tuple[int, int]:
    """Rows of shard ``index`` of ``shards`` contiguous ones, as ``datasets.Dataset.shard(contiguous=True)``."""
    size, rest = divmod(total, shards)
    start = index * size + min(index, rest)
    return start, start + size + (1 if index < rest else 0)


def sample_count(sample: float, available: int) -> int:
    """Rows ``sample`` takes: a fraction (<1) of ``available``, or a count (>=1) capped at it."""
    if sample < 1:
        return int(round(sample * available))
    if sample != int(sample):
        raise UserError(f"sample: a row count must be a whole number (or a fraction below 1), got {sample}.")
    return min(int(sample), available)


def split_range(split: str, total: int, where: str) -> tuple[int, int]:
    """Row range of a local split spec (``train``, ``train[:20%]``, ``train[10:-10]``) over ``total`` rows."""
    match = _SPLIT_RE.match(split.replace(" ", ""))
    if match is None:
        raise UserError(f"{where}: split '{split}' is not a split name with an optional slice, like train[:20%].")
    if match["split"] != "train":
        raise UserError(
            f"{where}: local files hold one split, 'train'; got '{match['split']}' (use a slice: train[:90%])."
        )

    def bound(text: str | None, default: int) -> int:
        if text is None:
            return default
        value = int(round(int(text[:-1]) * total / 100)) if text.endswith("%") else int(text)
        return max(total + value, 0) if value < 0 else min(value, total)

    start, stop = bound(match["from"], 0), bound(match["to"], total)
    return start, max(start, stop)


def _file_type(path: Path, dataset: DatasetConfig) -> str:
    kind = dataset.ds_type or SUFFIX_TYPES.get(path.suffix)
    if kind is None:
        raise UserError(
            f"{path}: unknown file type '{path.suffix}'; use .jsonl, .json, .parquet, .csv, .arrow or .txt, "
            "or set ds_type."
        )
    return kind


def _read_local(dataset: DatasetConfig, files: list[Path], progress: Progress) -> Source:
    parts, rows_before, bytes_before = [], 0, 0
    for file in files:
        kind = _file_type(file, dataset)
        file_rows = READERS[kind](file, progress=_after(progress, rows_before, bytes_before))
        if not len(file_rows):
            raise UserError(f"{file}: the data file holds no rows.")
        parts.append(file_rows)
        rows_before, bytes_before = rows_before + len(file_rows), bytes_before + file.stat().st_size
        if progress:
            progress(rows_before, bytes_before)
    rows = ConcatRows(parts)

    def locate(position: int) -> str:
        k, local = rows.part_of(int(position))
        line_of = getattr(parts[k], "line_of", None)
        line = line_of(local) if line_of else None
        return f"{files[k]}:{line}: row {local + 1}" if line is not None else f"{files[k]}: row {local + 1}"

    return Source(rows, np.arange(len(rows)), len(rows), files, locate)


def _after(progress: Progress, rows: int, position: int) -> Progress:
    """``progress`` of one file among several: counts continue from the files before it."""
    return (lambda more_rows, more_bytes: progress(rows + more_rows, position + more_bytes)) if progress else None


def _json_rows(path: Path, progress: Progress = None) -> Sequence[dict[str, Any]]:
    """JSON Lines, a JSON array of objects, or one JSON object (one row); each read as a stream.

    A file whose first non-blank line is JSON on its own is JSON Lines (a one-line object is one row either way).
    A file starting with ``[``, or with ``{`` and an object over several lines, is one JSON document.
    """
    with open(path, "rb") as handle:
        first, whole = _first_line_start(handle)
        if first.startswith("{"):
            line = first if whole else first + handle.readline().decode("utf-8", errors="replace")
            document = not _parses(line.strip()) and _more_content(handle)
        else:
            document = first.startswith("[")
    return JsonArrayRows.index(path, progress=progress) if document else JsonLinesRows.index(path, progress)


_PEEK_BYTES = 1 << 16


def _first_line_start(handle) -> tuple[str, bool]:
    """The start (at most 64 KiB) of the first line with more than whitespace, and whether that is the whole line."""
    raw = handle.readline(_PEEK_BYTES).removeprefix(BOM)
    while raw:
        text = raw.decode("utf-8", errors="replace")
        if text.strip():
            return text.lstrip(), raw.endswith(b"\n")
        raw = handle.readline(_PEEK_BYTES)
    return "", True


def _more_content(handle) -> bool:
    """Whether anything but whitespace follows the handle's position."""
    while raw := handle.readline(_PEEK_BYTES):
        if raw.decode("utf-8", errors="replace").strip():
            return True
    return False


def read_text(path: Path) -> str:
    """A data file's text: UTF-8 (a leading BOM dropped); invalid bytes and empty files are errors naming it."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise UserError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {column}); save the file as UTF-8."
        ) from None
    if not text.strip():
        raise UserError(f"{path}: the data file is empty.")
    return text


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


PARQUET_BATCH_ROWS = 8192


def _read_parquet(path: Path, progress: Progress = None) -> ArrowRows:
    """Parquet decoded a batch at a time into an unnamed temporary Arrow file (in the temporary directory,
    ``TMPDIR``), which is memory-mapped: rows are then read by position without the table in memory, and
    nothing is left behind whatever happens to the process."""
    import mmap
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        with tempfile.TemporaryFile(prefix="axlora-parquet-") as spool:
            sink = pa.PythonFile(spool, mode="w")
            with pa.ipc.new_stream(sink, parquet.schema_arrow) as writer:
                for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
                    writer.write_batch(batch)
                    if progress:  # bytes: the share of rows read, as Parquet pages are compressed
                        rows = writer.stats.num_rows
                        progress(rows, path.stat().st_size * rows // max(parquet.metadata.num_rows, 1))
            spool.flush()
            mapped = mmap.mmap(spool.fileno(), 0, access=mmap.ACCESS_READ)  # outlives the file handle
        return ArrowRows(pa.ipc.open_stream(pa.py_buffer(mapped)).read_all())
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...
        raise UserError(f"{path}: cannot read Parquet: {exc}") from None


def _read_arrow(path: Path, progress: Progress = None) -> ArrowRows:
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                table = pa.ipc.open_file(source).read_all()
    except Exception as exc:
        raise UserError(f"{path}: cannot read Arrow: {exc}") from None
    return ArrowRows(table)  # memory-mapped: a row is converted when read


READERS: dict[str, Callable[..., Sequence[dict[str, Any]]]] = {
    "json": _json_rows, "csv": CsvRows.index, "text": TextLinesRows.index, "parquet": _read_parquet,
    "arrow": _read_arrow,
}
"""Each file kind's reader, ``reader(path, progress=None)``: the rows by position, read when used (a reader
with ``line_of`` names lines)."""


def _read_hub(dataset: DatasetConfig) -> Source:
    """A Hugging Face dataset by name, through ``datasets.load_dataset`` (which applies ``split`` itself)."""
    import datasets

    datasets.disable_progress_bars()
    kwargs = {"name": dataset.name, "data_files": dataset.data_files, "revision": dataset.revision}
    try:
        loaded = datasets.load_dataset(dataset.path, split=dataset.split, **{k: v for k, v in kwargs.items() if v})
    except (ValueError, KeyError) as exc:
        raise UserError(f"{dataset.path}: cannot read split '{dataset.split}': {exc}") from None
    except Exception as exc:  # datasets raises many kinds (network, missing files, ...): name the dataset
        raise UserError(f"{dataset.path}: cannot load the dataset: {type(exc).__name__}: {exc}") from None
    if not isinstance(loaded, datasets.Dataset):
        raise UserError(f"{dataset.path}: split '{dataset.split}' is not a single split.")
    split = dataset.split  # ``loaded`` is Arrow-backed and memory-mapped: a row is read when used
    return Source(loaded, np.arange(len(loaded)), len(loaded), [], lambda i: f"{dataset.path} ({split}): row {i + 1}")

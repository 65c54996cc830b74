"""Tokenized samples held as flat arrays, read by the training loop as a sequence of row dicts.

Why flat arrays: a million samples as Python lists of ints cost gigabytes and minutes to save and load.
Here ``input_ids`` and ``labels`` are two int32 arrays with row ``offsets`` beside them: length
filtering, truncation and statistics are vectorised, the cache is two Arrow columns written in one go
and memory-mapped on load, and ``rows[i]`` still gives the loop ``{"input_ids": [...], "labels": [...]}``.

The cache files are Arrow IPC streams with ``input_ids`` and ``labels`` list columns, the layout
``datasets`` writes, so ``datasets.Dataset.from_file("train.arrow")`` reads one without axlora. They are
written a chunk of rows at a time (``RowsWriter``) and read back memory-mapped (``MappedRows``), so neither
preparing nor training holds all the tokens in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from axlora.core.names import IGNORE_INDEX


class TokenizedRows(Sequence):
    """Samples ``i`` = ``input_ids[offsets[i]:offsets[i+1]]`` (and the same slice of ``labels``).

    ``origin`` (optional, not saved) tells which ``datasets`` entry each row came from, and ``empty_turns``
    (optional, not saved, as tokenized) how many empty turns its format left untrained: both for the report.
    """

    empty_turns: np.ndarray | None = None

    def __init__(self, input_ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray, origin: np.ndarray | None = None):
        if len(input_ids) != len(labels) or offsets[-1] != len(input_ids):
            raise ValueError("input_ids, labels and offsets do not line up")
        self.input_ids = input_ids
        self.labels = labels
        self.offsets = offsets
        self.origin = origin

    @classmethod
    def empty(cls) -> TokenizedRows:
        rows = cls(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(1, np.int64), np.zeros(0, np.int32))
        rows.empty_turns = np.zeros(0, np.int32)
        return rows

    @classmethod
    def from_lists(cls, rows: Sequence[dict[str, Sequence[int]]]) -> TokenizedRows:
        """From ``{"input_ids", "labels"}`` dicts (tests, small data)."""
        lengths = np.array([len(r["input_ids"]) for r in rows], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        ids = np.array([t for r in rows for t in r["input_ids"]], dtype=np.int32)
        labels = np.array([t for r in rows for t in r["labels"]], dtype=np.int32)
        return cls(ids, labels, offsets)

    @classmethod
    def concat(cls, parts: Sequence[TokenizedRows]) -> TokenizedRows:
        if not parts:
            return cls.empty()
        sizes = np.cumsum([0] + [len(p.input_ids) for p in parts[:-1]])
        offsets = np.concatenate([parts[0].offsets[:1]] + [p.offsets[1:] + s for p, s in zip(parts, sizes, strict=True)])
        origins = [p.origin for p in parts]
        joined = cls(
            np.concatenate([p.input_ids for p in parts]),
            np.concatenate([p.labels for p in parts]),
            offsets.astype(np.int64),
            None if any(o is None for o in origins) else np.concatenate(origins),
        )
        if all(p.empty_turns is not None for p in parts):
            joined.empty_turns = np.concatenate([p.empty_turns for p in parts])
        return joined

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return {"input_ids": self.input_ids[start:end].tolist(), "labels": self.labels[start:end].tolist()}

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        for index in range(len(self)):
            yield self[index]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def positions(self) -> np.ndarray:
        """Position of every token within its row (0 at each row start)."""
        return np.arange(len(self.input_ids), dtype=np.int64) - np.repeat(self.offsets[:-1], self.lengths)

    def scored_counts(self) -> np.ndarray:
        """Label tokens per row that a causal LM loss scores: not -100 and not at position 0."""
        scored = (self.labels != IGNORE_INDEX) & (self.positions() > 0)
        rows = np.repeat(np.arange(len(self)), self.lengths)
        return np.bincount(rows, weights=scored, minlength=len(self)).astype(np.int64)

    def select(self, keep: np.ndarray) -> TokenizedRows:
        """The rows where ``keep`` (a boolean per row) is true, in order."""
        lengths = self.lengths[keep]
        token_keep = np.repeat(keep, self.lengths)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        origin = None if self.origin is None else self.origin[keep]
        return TokenizedRows(self.input_ids[token_keep], self.labels[token_keep], offsets, origin)

    def truncated(self, max_length: int) -> TokenizedRows:
        """Every row cut to its first ``max_length`` tokens."""
        token_keep = self.positions() < max_length
        lengths = np.minimum(self.lengths, max_length)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return TokenizedRows(self.input_ids[token_keep], self.labels[token_keep], offsets, self.origin)

    def split_long(self, max_length: int, split: np.ndarray) -> TokenizedRows:
        """Rows where ``split`` is true cut into consecutive pieces of ``max_length`` tokens; others unchanged."""
        lengths = self.lengths
        pieces = np.where(split, np.maximum(1, -(-lengths // max_length)), 1)
        first = np.repeat(self.offsets[:-1], pieces)
        rank = np.arange(int(pieces.sum())) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        ends = np.repeat(self.offsets[1:], pieces)
        starts = np.where(np.repeat(split, pieces), first + rank * max_length, first)
        stops = np.where(np.repeat(split, pieces), np.minimum(starts + max_length, ends), ends)
        sizes = stops - starts
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        token_index = np.arange(offsets[-1]) + np.repeat(starts - offsets[:-1], sizes)
        origin = None if self.origin is None else np.repeat(self.origin, pieces)
        return TokenizedRows(self.input_ids[token_index], self.labels[token_index], offsets, origin)

    def save(self, path: Path) -> None:
        """Write an Arrow IPC stream with ``input_ids`` and ``labels`` list columns."""
        with RowsWriter(path) as writer:
            writer.write(self)

    @classmethod
    def load(cls, path: Path) -> MappedRows:
        """Read what ``save`` or ``RowsWriter`` wrote, memory-mapped (see ``MappedRows``)."""
        return MappedRows(path)


class RowsWriter:
    """Appends ``TokenizedRows`` to an Arrow IPC stream as record batches, so rows go to disk as they are made."""

    def __init__(self, path: Path):
        import pyarrow as pa

        self.schema = pa.schema([("input_ids", pa.large_list(pa.int32())), ("labels", pa.large_list(pa.int32()))])
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self.schema)
        self.rows = 0

    def write(self, rows: TokenizedRows) -> None:
        import pyarrow as pa

        if len(rows) == 0:
            return
        offsets = _arrow(rows.offsets - rows.offsets[0], pa.int64())
        batch = pa.RecordBatch.from_arrays(
            [pa.LargeListArray.from_arrays(offsets, _arrow(rows.input_ids, pa.int32())),
             pa.LargeListArray.from_arrays(offsets, _arrow(rows.labels, pa.int32()))],
            schema=self.schema,
        )
        self._writer.write_batch(batch)
        self.rows += len(rows)

    def __enter__(self) -> RowsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._writer.close()
        self._sink.close()


class MappedRows(Sequence):
    """Rows of a cached Arrow stream, memory-mapped: ``rows[i]`` reads row ``i`` only.

    The stream holds many record batches (one per prepared chunk); each batch's token arrays stay views of
    the mapped file, so a process holds only the row offsets (8 bytes a row) and the pages its batches
    touch, and the processes of a node share those pages through the OS page cache.
    """

    origin = None
    empty_turns = None

    def __init__(self, path: Path):
        import pyarrow as pa

        with pa.memory_map(str(path)) as source:
            batches = list(pa.ipc.open_stream(source))
        self._ids, self._labels, self._offsets = [], [], []
        for batch in batches:
            if batch.num_rows == 0:
                continue
            ids, labels = batch.column(0), batch.column(1)
            offsets = ids.offsets.to_numpy()
            self._ids.append(ids.values.to_numpy()[offsets[0]:offsets[-1]])
            self._labels.append(labels.values.to_numpy()[labels.offsets.to_numpy()[0]:][: offsets[-1] - offsets[0]])
            self._offsets.append(offsets - offsets[0])
        sizes = [len(o) - 1 for o in self._offsets]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _span(self, index: int) -> tuple[int, int, int]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        batch = int(np.searchsorted(self._starts, index, side="right")) - 1
        local = index - int(self._starts[batch])
        offsets = self._offsets[batch]
        return batch, int(offsets[local]), int(offsets[local + 1])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        batch, start, end = self._span(index)
        return {"input_ids": self._ids[batch][start:end].tolist(), "labels": self._labels[batch][start:end].tolist()}

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        for index in range(len(self)):
            yield self[index]

    def length(self, index: int) -> int:
        _, start, end = self._span(index)
        return end - start

    @property
    def lengths(self) -> np.ndarray:
        if not self._offsets:
            return np.zeros(0, np.int64)
        return np.concatenate([np.diff(offsets) for offsets in self._offsets])

    def scored_counts(self) -> np.ndarray:
        """As ``TokenizedRows.scored_counts``, one batch at a time."""
        if not self._offsets:
            return np.zeros(0, np.int64)
        return np.concatenate([
            TokenizedRows(ids, labels, offsets).scored_counts()
            for ids, labels, offsets in zip(self._ids, self._labels, self._offsets, strict=True)
        ])


def _arrow(values: np.ndarray, kind):
    """A numpy array as an Arrow array without a copy (``pa.array`` would also import pandas to check types)."""
    import pyarrow as pa

    values = np.ascontiguousarray(values, dtype=kind.to_pandas_dtype())
    return pa.Array.from_buffers(kind, len(values), [None, pa.py_buffer(values)])

"""Tokenize one part (train or validation) a chunk at a time, apply the length rule, write it, count it.

Each chunk of rows goes from the tokenizer through the length rule (which works row by row, so chunks give
the rows a whole part would), both in the worker process that tokenized it, straight into the part's Arrow
file. What stays in memory is a few numbers
per row (lengths, for the report and the packing estimate) and per dataset (counts), never the tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache, partial

import numpy as np

from axlora.config.schema import Config
from axlora.data.length_rule import COUNTS, length_rule, strategies
from axlora.data.rows import RowsWriter
from axlora.data.segments import RowFormat
from axlora.data.tokenize import Entry


@dataclass
class PartTally:
    """What a part holds once written: per-dataset counts and the per-row lengths the report needs."""

    datasets: int
    rows: int = 0
    tokens: int = 0
    label_tokens: int = 0
    refused: int | None = None
    """Index (in the part's order) of the first sample that ``excess_length_strategy: raise`` refuses."""
    refused_length: int = 0
    kept: np.ndarray = field(init=False)
    empty_turns: np.ndarray = field(init=False)
    counts: dict[str, np.ndarray] = field(init=False)
    _tokenized: list[np.ndarray] = field(default_factory=list)
    _kept_lengths: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.kept = np.zeros(self.datasets, np.int64)
        self.empty_turns = np.zeros(self.datasets, np.int64)
        self.counts = {key: np.zeros(self.datasets, np.int64) for key in COUNTS}

    @property
    def tokenized_lengths(self) -> np.ndarray:
        """Every sample's length as tokenized, before the length rule."""
        return np.concatenate(self._tokenized) if self._tokenized else np.zeros(0, np.int64)

    @property
    def kept_lengths(self) -> np.ndarray:
        """Lengths of the samples written, in order."""
        return np.concatenate(self._kept_lengths) if self._kept_lengths else np.zeros(0, np.int64)

    def summary(self) -> dict[str, int]:
        return {"rows": self.rows, "tokens": self.tokens, "label_tokens": self.label_tokens}


def write_part(config: Config, tokenizer, formats: Sequence[RowFormat], entries: Sequence[Entry],
               writer: RowsWriter, char_limits: Sequence[int | None],
               progress: Callable[[int], None] | None = None) -> PartTally:
    """Tokenize ``entries`` in order, keep what the length rule keeps, append it to ``writer``; ``progress`` hears
    the number of rows of each chunk done.

    A refused sample (``raise``) is noted, not raised, so that a bad row later in the data is still reported
    first, as when the whole part was tokenized at once; the caller raises for it.
    """
    from axlora.data.encode_pool import encode_chunks

    tally = PartTally(len(config.datasets))
    by_dataset = strategies(config)
    done = 0
    for chunk in encode_chunks(entries, formats, tokenizer, train_on_inputs=config.train_on_inputs,
                               processes=config.dataset_processes, char_limits=char_limits,
                               then=partial(_rule_and_count, by_dataset, config.sequence_len)):
        if chunk.refused is not None and tally.refused is None:
            tally.refused, tally.refused_length = done + chunk.refused, chunk.refused_length
        writer.write(chunk.kept)
        chunk.add_to(tally)
        done += chunk.rows
        if progress:
            progress(chunk.rows)
        del chunk  # its tokens, written: freed before the next chunk arrives
        _return_freed_memory()
    return tally


def _return_freed_memory() -> None:
    """Give the pages of freed memory back to the OS (glibc only; elsewhere nothing to do).

    Each chunk's tokens arrive as arrays of megabytes, freed once written. glibc serves such sizes from its heap
    once one has been freed (its mmap threshold adapts upwards), and the few small arrays kept per chunk (the
    lengths) sit between them, so the heap cannot shrink: without this the process grows by ~250 bytes a row,
    with it by the index arrays alone.
    """
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@lru_cache(maxsize=1)
def _libc():
    import ctypes

    try:
        return ctypes.CDLL(None)
    except OSError:  # no C library to ask (not a POSIX system)
        return None


@dataclass
class _Chunk:
    """One tokenized chunk after the length rule, with its counts: made in the worker that tokenized it."""

    kept: object
    rows: int
    tokenized: np.ndarray
    counts: dict[str, np.ndarray]
    kept_by_dataset: np.ndarray
    empty_turns: np.ndarray
    label_tokens: int
    refused: int | None
    refused_length: int

    def add_to(self, tally: PartTally) -> None:
        tally._tokenized.append(self.tokenized)
        tally._kept_lengths.append(self.kept.lengths.astype(np.int32))
        for key in COUNTS:
            tally.counts[key] += self.counts[key]
        tally.kept += self.kept_by_dataset
        tally.empty_turns += self.empty_turns
        tally.rows += len(self.kept)
        tally.tokens += int(self.kept.lengths.sum())
        tally.label_tokens += self.label_tokens


def _rule_and_count(by_dataset: np.ndarray, sequence_len: int, chunk) -> _Chunk:
    datasets = len(by_dataset)
    kept, counts, refused = length_rule(chunk, by_dataset, sequence_len)
    return _Chunk(
        kept=kept, rows=len(chunk), tokenized=chunk.lengths.astype(np.int32), counts=counts,
        kept_by_dataset=np.bincount(kept.origin, minlength=datasets),
        empty_turns=np.bincount(chunk.origin, weights=chunk.empty_turns, minlength=datasets).astype(np.int64),
        label_tokens=int(kept.scored_counts().sum()),
        refused=refused, refused_length=int(chunk.lengths[refused]) if refused is not None else 0,
    )

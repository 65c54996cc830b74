"""Sample packing: put several whole tokenized samples into one row of at most ``capacity`` tokens.

Why: chat/instruction samples are short and vary a lot in length. Padding each batch to its longest
sample wastes most of the compute on pad tokens; packing fills rows with real tokens (typically
>= 97 % fill) while keeping every sample intact and independent.

Independence is kept by three things, all produced here and relied on by
:class:`axlora.data.collate.PackedCollator`:

* ``position_ids`` restart at 0 for every sample, so rotary embeddings see exactly the positions the
  sample would have alone, and transformers can find the sample boundaries (see ``collate.py``:
  with ``attention_mask=None`` it turns the position restarts into a block-diagonal causal mask,
  or into ``cu_seq_lens`` for flash-attn varlen);
* ``labels`` of the FIRST token of every sample are ``-100``: with the usual causal shift
  (``logits[:, :-1]`` scored against ``labels[:, 1:]``) the label of token ``t`` is what position
  ``t - 1`` predicts, and position ``t - 1`` is the previous sample's last token. Run alone, a
  sample's first label is never scored either, so packing changes neither the loss nor the number
  of label tokens;
* ``seq_lens`` records the sample lengths of each row (for statistics and for checks).

Worked example (``capacity = 10``)::

    sample A: input_ids  [a0 a1 a2]         labels [-100 a1 a2]        (a0 is a prompt token)
    sample B: input_ids  [b0 b1 b2 b3]      labels [-100 -100 b2 b3]   (b0, b1 are prompt tokens)
    sample C: input_ids  [c0 c1]            labels [c0 c1]             (no prompt: c0 is a label)

    pack_sequences([3, 4, 2], capacity=10) -> [[0, 1, 2]]     (9 of 10 slots used)

    packed row:
        input_ids     a0    a1  a2   b0    b1    b2  b3   c0    c1
        labels      -100    a1  a2 -100  -100    b2  b3 -100    c1
        position_ids   0     1   2    0     1     2   3    0     1
        seq_lens    [3, 4, 2]
                       ^ boundary  ^ boundary        ^ boundary

    C's ``c0`` label becomes -100: otherwise position 6 (``b3``, the end of sample B) would be trained to
    predict ``c0``, the start of an unrelated sample. The collator later pads the row on the right
    with a separate "padding sample" (positions restarting at 0, labels -100), so a batch of rows of
    different lengths needs no ``attention_mask``.

Bin packing is best-fit decreasing: samples are taken longest first and each goes into the open
row with the least room that still fits it (a new row if none does). It has the same asymptotic
guarantee as first-fit decreasing (about 11/9 of the optimal number of rows) and in practice packs
at least as tightly. Its lookup is cheap: open rows are stacked by their remaining room, and the
distinct room values (at most ``capacity`` of them) sit in a sorted list searched with
:func:`bisect.bisect_left`. Memory is a few bytes a sample, all in flat arrays: a run of equal samples
that the rows they go to cannot take twice is placed in one slice, and the result is each row's
sample indices as one array plus the rows' offsets into it (:func:`pack_offsets`), never a Python
list per row.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, insort
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from axlora.core.names import IGNORE_INDEX


def _validated_sizes(lengths: Sequence[int] | np.ndarray, capacity: int) -> np.ndarray:
    """Sizes as an int64 array, rejecting what cannot be packed (so a bad sample is named, not silently dropped)."""
    if capacity < 1:
        raise ValueError(f"packing capacity must be at least 1 token, got {capacity}")
    sizes = np.asarray(lengths, dtype=np.int64).reshape(-1)
    bad = np.flatnonzero((sizes < 1) | (sizes > capacity))
    if len(bad):
        index = int(bad[0])
        size = int(sizes[index])
        if size < 1:
            raise ValueError(f"sample {index} is empty; remove empty samples before packing")
        raise ValueError(
            f"sample {index} has {size} tokens, more than the packing capacity of {capacity}; "
            "truncate or drop it before packing"
        )
    return sizes


def index_dtype(count: int) -> np.dtype:
    """The dtype of indices into ``count`` items: int32 (4 bytes each) while they fit, else int64."""
    return np.dtype(np.int32 if count < 2**31 else np.int64)


class _BestFit:
    """Open rows stacked by remaining room (last opened on top), the distinct rooms kept sorted for bisection.

    ``place`` assigns rows to a run of samples of one size exactly as placing them one at a time would.
    """

    def __init__(self, capacity: int, typecode: str) -> None:
        self.capacity = capacity
        self.rows = 0
        self._typecode = typecode
        self._stacks: dict[int, array] = {}
        self._rooms: list[int] = []

    def place(self, size: int, count: int, assigned: array) -> None:
        """Append to ``assigned`` the rows that ``count`` samples of ``size`` tokens go to, in order.

        When the tightest room that fits cannot take a second sample of this size, the run's samples take that
        stack's rows top first (or new rows, when no room fits), one each: the room they leave is less than
        ``size``, so a search per sample would find the same stack again. Otherwise one sample is placed and the
        search redone.
        """
        while count:
            k = bisect_left(self._rooms, size)
            room = self.capacity if k == len(self._rooms) else self._rooms[k]
            taken = count if room - size < size else 1
            if k == len(self._rooms):
                rows = array(self._typecode, range(self.rows, self.rows + taken))
                self.rows += taken
            else:
                stack = self._stacks[room]
                taken = min(taken, len(stack))
                rows = stack[len(stack) - taken :]
                del stack[len(stack) - taken :]
                rows.reverse()  # popped one at a time, the top of the stack comes first
                if not stack:
                    del self._stacks[room], self._rooms[k]
            assigned.extend(rows)
            self._put(rows, room - size)
            count -= taken

    def _put(self, rows: array, room: int) -> None:
        """Stack ``rows`` (in order) as having ``room`` free tokens. Full rows are not tracked: nothing fits them."""
        if room <= 0:
            return
        stack = self._stacks.get(room)
        if stack is None:
            self._stacks[room] = array(self._typecode, rows)
            insort(self._rooms, room)
        else:
            stack.extend(rows)


def pack_offsets(lengths: Sequence[int] | np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing over sample ``lengths`` as flat arrays: ``(members, bounds)``.

    Row ``r`` holds the samples ``members[bounds[r]:bounds[r + 1]]``, ascending (dataset order); ``bounds`` has
    one more entry than there are rows. Both are int32 while the sample count allows. Ties in length are taken
    in dataset order, so the result depends only on ``lengths`` and ``capacity``.

    Raises:
        ValueError: if ``capacity < 1``, a sample is empty, or a sample is longer than ``capacity``.
    """
    sizes = _validated_sizes(lengths, capacity)
    dtype = index_dtype(len(sizes) + 1)
    room_left = (capacity - sizes).astype(np.uint16 if capacity < 2**16 else np.int64)  # a narrow key sorts fast
    longest_first = np.argsort(room_left, kind="stable").astype(dtype)  # ties in dataset order
    del room_left
    counts = np.bincount(sizes)  # samples of each size: at most ``capacity`` + 1 numbers
    packer = _BestFit(capacity, dtype.char)  # an ``array`` typecode of the same C type
    assigned = array(dtype.char)
    for size in np.flatnonzero(counts)[::-1].tolist():  # each run of equal sizes, longest first
        packer.place(size, int(counts[size]), assigned)
    row_of = np.empty(len(sizes), dtype=dtype)
    row_of[longest_first] = np.frombuffer(assigned, dtype=dtype, count=len(assigned))
    del longest_first, assigned
    members = np.argsort(row_of, kind="stable").astype(dtype)  # by row, and within a row by sample index
    bounds = np.zeros(packer.rows + 1, dtype=dtype)
    np.cumsum(np.bincount(row_of, minlength=packer.rows), out=bounds[1:])
    return members, bounds


def pack_sequences(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """Group sample indices into rows holding at most ``capacity`` tokens each (best-fit decreasing).

    Every index of ``lengths`` appears in exactly one row; within a row indices are ascending (dataset
    order). The result depends only on ``lengths`` and ``capacity``. Rows come out roughly longest
    samples first, so shuffle the rows (not the samples) when training. :func:`pack_offsets` gives the
    same packing as two flat arrays (what large datasets should use).

    Raises:
        ValueError: if ``capacity < 1``, a sample is empty, or a sample is longer than ``capacity``.
    """
    members, bounds = pack_offsets(lengths, capacity)
    edges = bounds.tolist()
    return [members[a:b].tolist() for a, b in zip(edges[:-1], edges[1:], strict=True)]


@dataclass(frozen=True)
class PackingStats:
    """How well samples were packed: ``fill`` is the share of row slots holding real tokens."""

    rows: int
    samples: int
    tokens: int
    capacity: int

    @property
    def fill(self) -> float:
        """Real tokens / (rows * capacity); 0.0 when there are no rows."""
        slots = self.rows * self.capacity
        return self.tokens / slots if slots else 0.0

    @classmethod
    def from_bins(cls, bins: Sequence[Sequence[int]], lengths: Sequence[int], capacity: int) -> PackingStats:
        """Stats of :func:`pack_sequences` output ``bins`` over sample ``lengths``."""
        return cls(
            rows=len(bins),
            samples=sum(len(b) for b in bins),
            tokens=sum(int(lengths[i]) for b in bins for i in b),
            capacity=capacity,
        )

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, Any]], capacity: int) -> PackingStats:
        """Stats of :func:`pack_examples` output (reads each row's ``seq_lens``)."""
        return cls(
            rows=len(rows),
            samples=sum(len(r["seq_lens"]) for r in rows),
            tokens=sum(sum(r["seq_lens"]) for r in rows),
            capacity=capacity,
        )

    def summary(self) -> str:
        """One log line, e.g. ``'packed 5000 samples into 297 rows of 4096 tokens, fill 98.7%'``."""
        return (
            f"packed {self.samples} samples into {self.rows} rows of {self.capacity} tokens, "
            f"fill {100 * self.fill:.1f}%"
        )


def _checked_example(example: Mapping[str, Sequence[int]], index: int) -> tuple[list[int], list[int]]:
    """``input_ids`` and ``labels`` as lists; a length mismatch would misalign every later sample in the row."""
    input_ids = list(example["input_ids"])
    labels = list(example["labels"])
    if len(input_ids) != len(labels):
        raise ValueError(
            f"example {index} has {len(input_ids)} input_ids but {len(labels)} labels; they must match"
        )
    return input_ids, labels


def _build_row(
    examples: Sequence[Mapping[str, Sequence[int]]], indices: Sequence[int]
) -> dict[str, list[int]]:
    """Concatenate the samples at ``indices``: restart positions, and mask each sample's first label."""
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
    for index in indices:
        input_ids, labels = _checked_example(examples[index], index)
        labels[0] = IGNORE_INDEX  # never predict a sample's first token from the previous sample
        row["input_ids"] += input_ids
        row["labels"] += labels
        row["position_ids"] += range(len(input_ids))
        row["seq_lens"].append(len(input_ids))
    return row


def pack_examples(
    examples: Sequence[Mapping[str, Sequence[int]]], capacity: int
) -> list[dict[str, list[int]]]:
    """Pack tokenized examples (``input_ids``, ``labels``) into rows of at most ``capacity`` tokens.

    Each returned row has ``input_ids``, ``labels`` (first label of every sample set to -100),
    ``position_ids`` (restarting at 0 per sample) and ``seq_lens`` (sample lengths, in row order).
    Rows are not padded: :class:`axlora.data.collate.PackedCollator` pads per batch.

    Raises:
        ValueError: for an empty sample, a sample longer than ``capacity``, or mismatched lengths.
    """
    lengths = [len(example["input_ids"]) for example in examples]
    return [_build_row(examples, indices) for indices in pack_sequences(lengths, capacity)]


class PackedRows(Sequence):
    """The rows :func:`pack_examples` would return, built one at a time when read.

    Only the packing itself is kept: :func:`pack_offsets`'s two flat integer arrays (4 bytes a sample and 4 a
    row). ``rows[i]`` reads its samples from ``samples`` (the memory-mapped prepared rows), so a training
    process holds the batch it trains on, not every packed row.
    """

    def __init__(self, samples, capacity: int):
        lengths = samples.lengths
        self.samples = samples
        self.capacity = capacity
        self.members, self.bounds = pack_offsets(lengths, capacity)
        self.tokens = int(lengths.sum())
        """Real (non-pad) tokens over all rows."""

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        start, end = self.bounds[index : index + 2].tolist()
        return _build_row(self.samples, self.members[start:end].tolist())

    def __iter__(self):
        for index in range(len(self)):
            yield self[index]


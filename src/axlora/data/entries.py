"""The rows to tokenize as two index arrays (dataset, position) in shuffled order; rows are read when used.

Shuffling permutes row numbers, not rows: ``random.Random(seed).shuffle`` over an ``array`` of row numbers
draws exactly the permutation it would draw over the rows themselves, at 8 bytes a row. A slice of the
entries reads its rows from their sources (``sources.Source.all_rows``), one chunk at a time.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Sequence

import numpy as np

from axlora.data.sources import Source


class ShuffledEntries(Sequence):
    """Every taken row of ``sources`` as ``(dataset index, position, row)``, shuffled with ``seed``.

    ``entries[i]`` and ``entries[a:b]`` read the rows; ``part(a, b)`` is a view that reads nothing yet.
    """

    def __init__(self, sources: Sequence[Source], dataset: np.ndarray, position: np.ndarray):
        self.sources, self.dataset, self.position = sources, dataset, position

    @classmethod
    def shuffled(cls, sources: Sequence[Source], seed: int) -> ShuffledEntries:
        sizes = [len(source.positions) for source in sources]
        order = array("q", range(sum(sizes)))
        random.Random(seed).shuffle(order)
        order = np.frombuffer(order, dtype=np.int64)
        starts = np.cumsum([0] + sizes)
        dataset = (np.searchsorted(starts, order, side="right") - 1).astype(np.int32)
        positions = np.concatenate([np.asarray(s.positions, dtype=np.int64) for s in sources])
        return cls(sources, dataset, positions[order])

    def part(self, start: int, stop: int) -> ShuffledEntries:
        return ShuffledEntries(self.sources, self.dataset[start:stop], self.position[start:stop])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        dataset, position = int(self.dataset[index]), int(self.position[index])
        return dataset, position, self.sources[dataset].all_rows[position]

"""Which rows each optimizer step trains on: a pure function of (seed, step).

Because the order depends on nothing but the seed and the step number, resuming needs only the step:
no sampler state to save, and a resumed run sees exactly the rows the uninterrupted run would have.
The rows of one step are the same whatever the number of processes, so N processes with micro batch m
train on the same rows per step as one process with micro batch N*m.

An epoch's order is a numpy array (int32 below 2**31 rows: 4 bytes a row), never a sequence of Python ints.
"""

from __future__ import annotations

import math
import random
from array import array
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from axlora.data.pack import index_dtype


def shuffled_rows(num_rows: int, seed: str) -> np.ndarray:
    """``range(num_rows)`` in ``random.Random(seed).shuffle``'s order, held as 4 (or 8) bytes a row.

    The shuffle runs in place on an ``array`` rather than a list: ``shuffle`` only reads the length and swaps
    items, so the order is exactly the list's, without an int object per row.
    """
    dtype = index_dtype(num_rows)
    order = array(dtype.char, range(num_rows))
    random.Random(seed).shuffle(order)
    return np.frombuffer(order, dtype=dtype, count=num_rows)


@dataclass(frozen=True)
class DataOrder:
    num_rows: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    seed: int
    drop_last: bool = False  # dataloader_drop_last: no short last step in an epoch

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        """The last step of an epoch may be short; it is kept (its loss is normalized by its own tokens) unless
        ``drop_last``, when the rows left over are not trained that epoch (a reshuffle brings them back)."""
        whole = math.floor if self.drop_last else math.ceil
        return max(1, whole(self.num_rows / self.rows_per_step))

    def total_steps(self, num_epochs: float | None, max_steps: int | None) -> int:
        if max_steps is not None:
            return max_steps
        assert num_epochs is not None
        return max(1, math.ceil(num_epochs * self.steps_per_epoch))

    def epoch_of(self, step: int) -> float:
        """Epochs completed after ``step`` optimizer steps (fractional)."""
        return step / self.steps_per_epoch

    @lru_cache(maxsize=4)  # noqa: B019 - a schedule lives as long as its run
    def _order(self, epoch: int) -> np.ndarray:
        """Every row of ``epoch`` in training order (read-only: the cache hands out the same array)."""
        order = self._epoch_order(epoch)
        order.flags.writeable = False
        return order

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The rows of ``epoch``, shuffled by (seed, epoch) alone; subclasses order them otherwise."""
        return shuffled_rows(self.num_rows, f"{self.seed}-{epoch}")

    def step_rows(self, step: int) -> list[int]:
        """Row indices of optimizer step ``step`` (0-based) across all processes."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = self._order(epoch)
        return order[index * self.rows_per_step : (index + 1) * self.rows_per_step].tolist()

    def micro_batch_count(self, step: int) -> int:
        """The most micro batches any process has in ``step`` (fewer only on an epoch's short last step)."""
        return max(len(self.micro_batches(step, rank)) for rank in range(self.world_size))

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """This process's micro batches for ``step``: its share of the step's rows, in chunks."""
        mine = self.step_rows(step)[rank :: self.world_size]
        size = self.micro_batch_size
        return [mine[i : i + size] for i in range(0, len(mine), size)]


@dataclass(frozen=True)
class StreamOrder(DataOrder):
    """``pretraining_dataset``: step ``s`` trains on the stream's rows ``s * rows_per_step`` onwards, in order.

    Nothing is shuffled (the stream is read once, in order), so the order holds no list of rows: ``num_rows``
    is the rows the planned steps read (``max_steps * rows_per_step``), and one "epoch" is the whole run.
    """

    def step_rows(self, step: int) -> list[int]:
        first = step * self.rows_per_step
        return list(range(first, first + self.rows_per_step))

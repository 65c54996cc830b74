"""``group_by_length``: batch rows of similar length together, so unpacked batches carry less padding.

The order stays a pure function of (seed, epoch, row lengths), like ``DataOrder``'s, so a resumed run
sees the rows the uninterrupted run would. Each epoch is shuffled as usual, cut into mega-batches of
``MEGA_BATCH_STEPS`` steps, and each mega-batch is sorted longest first (the recipe of transformers'
``LengthGroupedSampler``): every step then holds rows of similar length, steps still come in random
order across mega-batches, and every row is seen once per epoch. With ``sample_packing`` rows are already
full, so grouping is not applied (as in Axolotl).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from axlora.config.schema import Config
from axlora.data.pack import index_dtype
from axlora.train.data_order import DataOrder

MEGA_BATCH_STEPS = 50


@dataclass(frozen=True)
class LengthGroupedOrder(DataOrder):
    lengths: bytes = b""
    """Every row's length as int32 bytes: 4 bytes a row, hashed once (the order's cache keys on the schedule)."""

    def _epoch_order(self, epoch: int) -> np.ndarray:
        shuffled = super()._epoch_order(epoch)
        lengths = np.frombuffer(self.lengths, dtype=np.int32)
        size = self.rows_per_step * MEGA_BATCH_STEPS
        for start in range(0, len(shuffled), size):  # longest first within each mega-batch; ties keep the shuffle
            group = shuffled[start:start + size]
            group[:] = group[np.argsort(-lengths[group], kind="stable")]
        return shuffled


@dataclass(frozen=True)
class SequentialOrder(DataOrder):
    """``curriculum_sampling``: every epoch trains on the rows in their prepared order (no shuffle)."""

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.arange(self.num_rows, dtype=index_dtype(self.num_rows))


def build_data_order(config: Config, rows, world_size: int) -> DataOrder:
    """The step schedule for ``rows``: in order for ``curriculum_sampling``, length-grouped when
    ``group_by_length`` (and not packing), else shuffled each epoch."""
    common = dict(
        num_rows=len(rows),
        micro_batch_size=config.micro_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        world_size=world_size,
        seed=config.seed,
        drop_last=config.dataloader_drop_last,
    )
    if config.curriculum_sampling:
        return SequentialOrder(**common)
    if config.group_by_length and not config.sample_packing:
        return LengthGroupedOrder(**common, lengths=_row_lengths(rows).astype(np.int32).tobytes())
    return DataOrder(**common)


def _row_lengths(rows) -> np.ndarray:
    """Each row's token count: from the prepared rows' offsets when they have them, never reading a row."""
    lengths = getattr(rows, "lengths", None)
    if lengths is not None:
        return np.asarray(lengths)
    return np.fromiter((len(row["input_ids"]) for row in rows), dtype=np.int64, count=len(rows))

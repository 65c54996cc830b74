"""What happens to samples longer than ``sequence_len``, per dataset, and to samples with nothing to train.

``excess_length_strategy`` (or, unset, the type's default: ``split`` for ``completion``, ``drop`` for the
others) decides: ``drop`` the sample, ``truncate`` it to its first ``sequence_len`` tokens, ``split`` it into
consecutive ``sequence_len`` pieces (a long document trains whole), or ``raise`` naming its file and line.
A sample with no token left to train is dropped afterwards (its loss would be 0/0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.data.rows import TokenizedRows
from axlora.data.sources import Source
from axlora.data.tokenize import Entry

COUNTS = ("dropped_too_long", "truncated", "split_long", "dropped_no_labels")


def apply_length_rule(
    rows: TokenizedRows, config: Config, sources: Sequence[Source], entries: Sequence[Entry]
) -> tuple[TokenizedRows, dict[str, np.ndarray]]:
    """The kept rows and, per dataset, how many samples were dropped, truncated or split (``COUNTS``)."""
    kept, counts, refused = length_rule(rows, strategies(config), config.sequence_len)
    if refused is not None:
        raise refused_error(config, sources, entries[refused], int(rows.lengths[refused]))
    return kept, counts


def strategies(config: Config) -> np.ndarray:
    """Each dataset's ``excess_length_strategy`` (resolved), indexed like ``config.datasets``."""
    return np.array([config.length_strategy(d) for d in config.datasets])


def length_rule(
    rows: TokenizedRows, by_dataset: np.ndarray, sequence_len: int
) -> tuple[TokenizedRows, dict[str, np.ndarray], int | None]:
    """The kept rows, the ``COUNTS`` per dataset, and the index of the first row ``raise`` refuses (or None).

    Works row by row, so it gives the same rows applied to a whole part or to consecutive chunks of it.
    """
    datasets = len(by_dataset)
    strategy = by_dataset[rows.origin]
    too_long = rows.lengths > sequence_len
    refused = too_long & (strategy == "raise")
    counts = {key: np.zeros(datasets, np.int64) for key in COUNTS}
    for key, name in (("dropped_too_long", "drop"), ("truncated", "truncate"), ("split_long", "split")):
        counts[key] = np.bincount(rows.origin[too_long & (strategy == name)], minlength=datasets)
    keep = ~(too_long & (strategy == "drop"))
    kept = rows.select(keep)
    kept = kept.split_long(sequence_len, (too_long & (strategy == "split"))[keep])
    kept = kept.truncated(sequence_len)  # only the samples to truncate are still too long
    no_labels = kept.scored_counts() == 0
    counts["dropped_no_labels"] = np.bincount(kept.origin[no_labels], minlength=datasets)
    return kept.select(~no_labels), counts, int(np.argmax(refused)) if refused.any() else None


def refused_error(config: Config, sources: Sequence[Source], entry: Entry, length: int) -> UserError:
    """The error for a sample over ``sequence_len`` in a dataset whose strategy is ``raise``."""
    index, position, _ = entry
    return UserError(
        f"{sources[index].where(position)}: sample has {length} tokens, more than "
        f"sequence_len {config.sequence_len} (excess_length_strategy: raise; use drop, truncate or split, or "
        "raise sequence_len)."
    )


def untrained_datasets(config: Config, kept: np.ndarray, counts: dict[str, np.ndarray],
                       taken: Sequence[int]) -> list[str]:
    """One line per dataset that adds no trainable sample (``kept``: samples kept per dataset), saying why."""
    lines = []
    for index, dataset in enumerate(config.datasets):
        if kept[index]:
            continue
        too_long, empty = int(counts["dropped_too_long"][index]), int(counts["dropped_no_labels"][index])
        hint = ""
        if dataset.type in ("chat_template", "sharegpt") and empty:
            hint = f"; check roles_to_train {dataset.roles_to_train} against the roles the data uses"
        lines.append(
            f"datasets[{index}] ({dataset.label}) adds no trainable sample: of {taken[index]:,} rows, {too_long:,} were "
            f"too long for sequence_len {config.sequence_len} and {empty:,} had nothing to train{hint}."
        )
    return lines

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
    datasets = len(config.datasets)
    strategy = np.array([config.length_strategy(d) for d in config.datasets])[rows.origin]
    too_long = rows.lengths > config.sequence_len
    refused = too_long & (strategy == "raise")
    if refused.any():
        first = int(np.argmax(refused))
        index, position, _ = entries[first]
        raise UserError(
            f"{sources[index].where(position)}: sample has {int(rows.lengths[first])} tokens, more than "
            f"sequence_len {config.sequence_len} (excess_length_strategy: raise; use drop, truncate or split, or "
            "raise sequence_len)."
        )
    counts = {key: np.zeros(datasets, np.int64) for key in COUNTS}
    for key, name in (("dropped_too_long", "drop"), ("truncated", "truncate"), ("split_long", "split")):
        counts[key] = np.bincount(rows.origin[too_long & (strategy == name)], minlength=datasets)
    keep = ~(too_long & (strategy == "drop"))
    rows = rows.select(keep)
    rows = rows.split_long(config.sequence_len, (too_long & (strategy == "split"))[keep])
    rows = rows.truncated(config.sequence_len)  # only the samples to truncate are still too long
    no_labels = rows.scored_counts() == 0
    counts["dropped_no_labels"] = np.bincount(rows.origin[no_labels], minlength=datasets)
    return rows.select(~no_labels), counts


def untrained_datasets(config: Config, kept: Sequence[TokenizedRows], counts: dict[str, np.ndarray],
                       taken: Sequence[int]) -> list[str]:
    """One line per dataset that adds no trainable sample, saying why (too long / nothing to train)."""
    lines = []
    for index, dataset in enumerate(config.datasets):
        if any(np.any(part.origin == index) for part in kept):
            continue
        too_long, empty = int(counts["dropped_too_long"][index]), int(counts["dropped_no_labels"][index])
        hint = ""
        if dataset.type in ("chat_template", "sharegpt") and empty:
            hint = f"; check roles_to_train {dataset.roles_to_train} against the roles the data uses"
        lines.append(
            f"datasets[{index}] ({dataset.path}) adds no trainable sample: of {taken[index]:,} rows, {too_long:,} were "
            f"too long for sequence_len {config.sequence_len} and {empty:,} had nothing to train{hint}."
        )
    return lines

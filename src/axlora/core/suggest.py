"""Did-you-mean suggestions for misspelt names (config keys, presets, templates, optimizers)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(word: str, choices: Iterable[str], otherwise: str | None = None) -> str:
    """A " (did you mean 'x'?)" suffix for a misspelt ``word``; without a close match, ``otherwise``
    (default: "; known: " and the choices)."""
    ordered = sorted(choices)
    match = difflib.get_close_matches(word, ordered, n=1, cutoff=0.6)
    if match:
        return f" (did you mean '{match[0]}'?)"
    return otherwise if otherwise is not None else f"; known: {', '.join(ordered)}"

"""The vocabulary shared by the row formats and the tokenizer step: segments, formats and row errors.

A format turns one dataset row into ``Segment``s: pieces of text, each trainable or not. Keeping
formats text-only makes them easy to add and to test; ``tokenize`` owns every token-level decision.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Segment:
    """A piece of a sample's text; ``trainable`` segments keep their labels, the others are masked."""

    text: str
    trainable: bool


class FormattedRow(list):
    """A row's ``Segment``s, with what the format left out of training on purpose (for the report)."""

    def __init__(self, segments=(), empty_turns: int = 0):
        super().__init__(segments)
        self.empty_turns = empty_turns
        """Trained-role turns with nothing to train (empty content): not trained, counted in the report."""


class RowFormatError(ValueError):
    """A row lacks what its format needs; ``prepare`` adds the file and line (or row index).

    Picklable with its field, so it crosses from a worker process to the parent unchanged.
    """

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.field, str(self)))


RawRecord = Mapping[str, Any]
"""One record of a dataset as read from its file, before any format turns it into text."""
PromptEntry = str | Mapping[str, Any]


@dataclass(frozen=True)
class RowFormat:
    """How the rows of one dataset become tokens: its segments and the tokenizer settings it needs.

    ``whole_text``: tokenize the joined segments as one text and mask by character offsets, so the ids are
    exactly those of the rendered text (chat templates: what ``apply_chat_template`` gives). Otherwise each
    segment is tokenized alone, so no token spans a prompt/completion boundary (what a model sees when it
    generates after the prompt). ``pretokenized`` formats have no segments: rows hold ``input_ids`` already.
    """

    name: str
    segments: Callable[[RawRecord], list[Segment]] | None
    prompt: Callable[[PromptEntry], str]
    add_bos: bool = False
    append_eos: bool = False
    whole_text: bool = False
    pretokenized: bool = False
    settings: dict[str, Any] | None = None
    """What changes this format's output beyond the dataset's own keys (e.g. the template text): cache key."""
    warnings: tuple[str, ...] = ()
    """Problems found when the format was built (e.g. an end-of-turn marker that is not one token)."""


def required_text(row: RawRecord, field: str) -> str:
    """``row[field]`` as text, or a ``RowFormatError`` naming the field."""
    value = row.get(field)
    if value is None:
        raise RowFormatError(field, f"missing field '{field}'")
    if not isinstance(value, str):
        raise RowFormatError(field, f"field '{field}' must be text, got {type(value).__name__}")
    return value

"""Row formats: how one dataset row becomes prompt and completion text segments.

A format returns a list of ``Segment``s; ``tokenize`` turns each segment into tokens and masks the labels
of the segments that are not trainable. Keeping formats text-only makes them easy to add and to test.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Segment:
    """A piece of a sample's text; ``trainable`` segments keep their labels, the others are masked."""

    text: str
    trainable: bool


class RowFormatError(ValueError):
    """A row lacks what its format needs; ``prepare`` adds the file and row index."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


def _required_text(row: Mapping[str, Any], field: str) -> str:
    value = row.get(field)
    if value is None:
        raise RowFormatError(field, f"missing field '{field}'")
    if not isinstance(value, str):
        raise RowFormatError(field, f"field '{field}' must be text, got {type(value).__name__}")
    return value


def alpaca(row: Mapping[str, Any]) -> list[Segment]:
    """Alpaca: ``instruction`` (+ optional ``input``) is the prompt, ``output`` the completion."""
    instruction = _required_text(row, "instruction")
    output = _required_text(row, "output")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise RowFormatError("input", f"field 'input' must be text, got {type(extra).__name__}")
    if extra.strip():
        prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=extra)
    else:
        prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    return [Segment(prompt, trainable=False), Segment(output, trainable=True)]


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The alpaca prompt for generation (what the model sees before its response)."""
    return alpaca({"instruction": instruction, "input": input_text, "output": ""})[0].text


FORMATS: dict[str, Callable[[Mapping[str, Any]], list[Segment]]] = {"alpaca": alpaca}

"""Prefix and canvas batches for block diffusion, from the prepared rows (``input_ids`` and ``labels``).

A row's prefix is everything before its first trained token (the prompt); its canvas is ``canvas_length`` tokens
of the response span (first to last trained token). A response longer than one canvas trains one of its blocks,
drawn per row and step; the response blocks before it join the prefix, as they would be in the encoder's cache
when the model generates that block. Tokens of the span that are not trained (another turn's prompt) stay in the
canvas but are never corrupted nor scored. A row with no prompt gets the BOS token (else the pad token) as prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from axlora.core.names import IGNORE_INDEX


@dataclass(frozen=True)
class CanvasShape:
    """The canvas length and the tokens that fill what a row leaves empty."""

    canvas_length: int
    pad_token_id: int
    bos_token_id: int | None


def split_row(input_ids: list[int], labels: list[int], shape: CanvasShape,
              generator: torch.Generator) -> tuple[list[int], list[int], list[bool]]:
    """``(prefix, canvas tokens, which canvas tokens are trained)`` of one row; the canvas may be short."""
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if trained:
        first, last = trained[0], trained[-1]
        prefix, span = list(input_ids[:first]), list(input_ids[first:last + 1])
        eligible = [label != IGNORE_INDEX for label in labels[first:last + 1]]
    else:
        prefix, span, eligible = [], list(input_ids), [True] * len(input_ids)
    if not prefix:
        prefix = [shape.bos_token_id if shape.bos_token_id is not None else shape.pad_token_id]
    length = shape.canvas_length
    blocks = -(-len(span) // length)
    start = int(torch.randint(0, blocks, (), generator=generator)) * length if blocks > 1 else 0
    return prefix + span[:start], span[start:start + length], eligible[start:start + length]


def canvas_batch(rows: list[dict[str, Any]], shape: CanvasShape, generator: torch.Generator) -> dict[str, Any]:
    """Right-padded prefixes (``input_ids``, ``attention_mask``), the clean canvases and their trained positions.

    ``canvas_positions`` continue each row's own prefix, so padding between a short prefix and the batch's longest
    does not shift the canvas; ``tokens`` counts the real prefix and canvas tokens.
    """
    parts = [split_row([int(t) for t in row["input_ids"]], [int(t) for t in row["labels"]], shape, generator)
             for row in rows]
    width, length = max(len(prefix) for prefix, _, _ in parts), shape.canvas_length
    input_ids = torch.full((len(rows), width), shape.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    canvas = torch.full((len(rows), length), shape.pad_token_id, dtype=torch.long)
    eligible = torch.zeros((len(rows), length), dtype=torch.bool)
    for index, (prefix, tokens, trained) in enumerate(parts):
        input_ids[index, :len(prefix)] = torch.tensor(prefix)
        attention_mask[index, :len(prefix)] = 1
        canvas[index, :len(tokens)] = torch.tensor(tokens)
        eligible[index, :len(trained)] = torch.tensor(trained)
    prefix_lengths = attention_mask.sum(dim=1)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "canvas": canvas,
        "eligible": eligible,
        "canvas_positions": prefix_lengths[:, None] + torch.arange(length)[None, :],
        "tokens": int(prefix_lengths.sum()) + sum(len(tokens) for _, tokens, _ in parts),
    }

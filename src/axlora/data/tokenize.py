"""Segments -> ``input_ids`` and ``labels`` with prompt tokens masked (-100).

Each segment is tokenized on its own and the pieces are concatenated, so the boundary between prompt and
completion is exact (tokenizing the joined text could merge tokens across it). Whole batches of segments
go through the fast tokenizer in one call: per-row calls would be several times slower.
"""

from __future__ import annotations

from collections.abc import Sequence

from axlora.data.formats import Segment

IGNORE_INDEX = -100


def tokenize_samples(
    samples: Sequence[Sequence[Segment]],
    tokenizer,
    *,
    train_on_inputs: bool,
    add_bos: bool,
    append_eos: bool = True,
) -> list[dict[str, list[int]]]:
    """Tokenize many samples at once; returns ``{"input_ids", "labels"}`` per sample (not truncated)."""
    texts = [segment.text for sample in samples for segment in sample]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    results = []
    cursor = 0
    for sample in samples:
        input_ids: list[int] = [tokenizer.bos_token_id] if add_bos else []
        labels: list[int] = [IGNORE_INDEX] * len(input_ids)
        for segment in sample:
            ids = encoded[cursor]
            cursor += 1
            input_ids.extend(ids)
            labels.extend(ids if (segment.trainable or train_on_inputs) else [IGNORE_INDEX] * len(ids))
        if append_eos and tokenizer.eos_token_id is not None:
            input_ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
        results.append({"input_ids": input_ids, "labels": labels})
    return results


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own template starts a text with BOS (Llama does, many others do not)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id

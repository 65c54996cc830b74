"""Collators: turn a list of rows into a batch of tensors the training loop can feed to the model.

Two collators, one per data layout:

* :class:`PaddedCollator` for unpacked examples: right-pads to the longest row (optionally rounded
  up to a multiple, or to ``sequence_len``) and returns a 2-D ``attention_mask``.
* :class:`PackedCollator` for rows from :func:`axlora.data.pack.pack_examples`: returns NO
  ``attention_mask``; sample boundaries travel in ``position_ids`` (and, for flash-attn, in
  ``cu_seq_lens_*``).

How packed rows stay independent, and why this layout (read from transformers 5.23)
-----------------------------------------------------------------------------------
``masking_utils.create_causal_mask`` calls ``find_packed_sequence_indices(position_ids)`` when
``attention_mask is None`` AND ``past_key_values is None``. A sample starts wherever the position
does not grow by exactly 1, so each row may hold several samples and every row of the batch is
handled separately. The mask becomes ``causal AND same-sample``:

* ``sdpa``: a materialised boolean ``(batch, 1, L, L)`` block-diagonal causal mask (the ``is_causal``
  shortcut is disabled once packing is detected);
* ``eager``: the same mask as 0 / dtype-min additive bias;
* ``flex_attention``: the same predicate compiled into a ``BlockMask``;
* ``flash_attention_2/3/4``: the mask function returns None, and ``_flash_attention_forward``
  infers varlen boundaries from ``position_ids`` ONLY when ``batch_size == 1``
  (``_is_packed_sequence``). With several rows it would run plain causal flash attention across
  sample boundaries. It does honour explicit ``cu_seq_lens_q/k`` + ``max_length_q/k`` kwargs for
  any batch size, flattening ``(batch, L)`` into one token stream; so this collator always emits
  them, computed over the flattened batch.

Padding: a batch of rows of different lengths is right-padded with one extra "padding sample" per
short row: pad tokens whose positions restart at 0 and whose labels are -100. It is just another
segment to every implementation above, so real tokens never attend to it (nor it to them), no
``attention_mask`` is needed, and no query row is fully masked (no NaN). We deliberately pass no
2-D ``attention_mask``: giving one switches packing detection off (sdpa/eager/flex would then
attend across samples), and an explicit 4-D mask would need a different dtype per implementation
(bool for sdpa, additive float for eager, ``BlockMask`` for flex) and is unusable by flash-attn.

Calling the model with a packed batch (use :func:`model_inputs`)::

    out = model(input_ids=..., position_ids=..., use_cache=False,
                cu_seq_lens_q=..., cu_seq_lens_k=..., max_length_q=..., max_length_k=...)

``use_cache=False`` is REQUIRED: Llama-style configs default to ``use_cache=True``, which makes the
model create a ``DynamicCache`` before building the mask, and a cache switches packing detection
off (silent cross-sample attention; gradient checkpointing in training mode happens to force the
cache off too). The ``cu_seq_lens_*``/``max_length_*`` kwargs are read only by flash-attn and
ignored by the others.

Cost: sdpa and eager materialise the ``(batch, 1, L, L)`` mask (16 MiB per 4096-token row as bool,
4x that as eager's float bias), and a custom mask keeps torch's SDPA off its flash kernel (it uses
the memory-efficient kernel instead). For long rows on GPU prefer ``flash_attention_2``.

Labels follow the usual causal shift (``logits[:, :-1]`` against ``labels[:, 1:]``); the collator
re-applies ``labels = -100`` wherever ``position_ids == 0`` so no sample's first token is predicted
from its predecessor, even for rows not built by ``pack_examples``. ``num_label_tokens`` is the
count of ``labels[:, 1:] != -100``: the number of scored tokens, for normalising the loss over an
optimizer step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from axlora.core.names import IGNORE_INDEX

TokenizedRow = Mapping[str, Sequence[int]]
"""One tokenized training row: ``input_ids`` and ``labels`` (and for packed rows, the boundaries)."""

MODEL_INPUT_KEYS = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
)
"""Batch keys that are model forward arguments (``labels`` and ``num_label_tokens`` are for the loss)."""


def count_label_tokens(labels: torch.Tensor) -> int:
    """Tokens scored by the causally shifted loss: ``labels[:, 1:] != -100`` (the first column predicts nothing)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _round_up(n: int, multiple: int | None) -> int:
    if not multiple or multiple <= 1:
        return n
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class _PadPolicy:
    """Target batch length: longest row, rounded up to ``pad_to_multiple_of``, or ``sequence_len`` when asked.

    Rounding never goes past ``sequence_len`` (it could push positions past the model's limit).
    """

    pad_to_multiple_of: int | None = None
    sequence_len: int | None = None
    pad_to_sequence_len: bool = False

    def __post_init__(self) -> None:
        if self.pad_to_sequence_len and not self.sequence_len:
            raise ValueError("pad_to_sequence_len needs sequence_len")

    def target_length(self, lengths: Sequence[int]) -> int:
        longest = max(lengths)
        if self.sequence_len is not None and longest > self.sequence_len:
            raise ValueError(f"a row has {longest} tokens, more than sequence_len {self.sequence_len}")
        if self.pad_to_sequence_len:
            return int(self.sequence_len)
        target = _round_up(longest, self.pad_to_multiple_of)
        if self.sequence_len is not None:
            target = max(longest, min(target, self.sequence_len))
        return target


def _row_lengths(rows: Sequence[TokenizedRow]) -> list[int]:
    """Lengths of rows, checking they are non-empty and that ``labels`` line up with ``input_ids``."""
    if not rows:
        raise ValueError("cannot collate an empty batch")
    lengths = []
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        if n == 0 or len(row["labels"]) != n:
            raise ValueError(
                f"row {i}: needs non-empty input_ids and as many labels ({n} vs {len(row['labels'])})"
            )
        lengths.append(n)
    return lengths


def _pad_id(pad_token_id: int | None) -> int:
    """Pad tokens are never attended to nor scored, so any id works; tokenizers without a pad token give None."""
    return 0 if pad_token_id is None else pad_token_id


def _fill(rows: Sequence[TokenizedRow], key: str, length: int, pad_value: int) -> torch.Tensor:
    """``(len(rows), length)`` int64 tensor of ``row[key]``, right-padded with ``pad_value``."""
    out = torch.full((len(rows), length), pad_value, dtype=torch.long)
    for i, row in enumerate(rows):
        values = row[key]
        out[i, : len(values)] = torch.as_tensor(values, dtype=torch.long)
    return out


@dataclass(frozen=True)
class _Collator:
    """The padding settings both collators share (see ``_PadPolicy``)."""

    pad_token_id: int | None = 0
    pad_to_multiple_of: int | None = None
    sequence_len: int | None = None
    pad_to_sequence_len: bool = False

    def target_length(self, lengths: Sequence[int]) -> int:
        return _PadPolicy(self.pad_to_multiple_of, self.sequence_len, self.pad_to_sequence_len).target_length(lengths)


@dataclass(frozen=True)
class PaddedCollator(_Collator):
    """Right-pads unpacked examples; pads get ``attention_mask`` 0 and label -100.

    ``position_ids`` are ``0..L-1`` on every row (what the model would compute itself); with an
    ``attention_mask`` given, transformers does not look for packing, so pad positions are harmless.
    """

    def __call__(self, rows: Sequence[TokenizedRow]) -> dict[str, Any]:
        lengths = _row_lengths(rows)
        length = self.target_length(lengths)
        labels = _fill(rows, "labels", length, IGNORE_INDEX)
        attention_mask = (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).long()
        return {
            "input_ids": _fill(rows, "input_ids", length, _pad_id(self.pad_token_id)),
            "labels": labels,
            "attention_mask": attention_mask,
            "position_ids": torch.arange(length).expand(len(rows), length).clone(),
            "num_label_tokens": count_label_tokens(labels),
        }


def _packed_position_ids(rows: Sequence[TokenizedRow], lengths: Sequence[int], length: int) -> torch.Tensor:
    """Row positions, with each row's padding tail as its own segment restarting at 0."""
    position_ids = torch.arange(length).repeat(len(rows), 1)  # pad tails: 0..pad-1 after the shift below
    for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        position_ids[i, :n] = torch.as_tensor(row["position_ids"], dtype=torch.long)
        position_ids[i, n:] -= n
    return position_ids


def _check_positions(position_ids: torch.Tensor) -> None:
    """Each segment must start at 0 and grow by 1: that is how every attention backend finds boundaries."""
    if bool((position_ids[:, 0] != 0).any()):
        raise ValueError("packed rows must start with position 0")
    steps = position_ids[:, 1:] - position_ids[:, :-1]
    if bool(((steps != 1) & (position_ids[:, 1:] != 0)).any()):
        raise ValueError("packed position_ids must restart at 0 for each sample and otherwise grow by 1")


def varlen_kwargs(position_ids: torch.Tensor) -> dict[str, Any]:
    """Flash-attn varlen kwargs over the flattened ``(batch * L)`` token stream: a sequence starts at each 0.

    ``cu_seq_lens_*`` are int32 offsets ``[0, ..., batch * L]``; ``max_length_*`` are Python ints
    (flash-attn wants ints, and an int avoids a device sync in every layer).
    """
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    cu_seq_lens = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
    max_length = int((cu_seq_lens[1:] - cu_seq_lens[:-1]).max())
    return {
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens.clone(),
        "max_length_q": max_length,
        "max_length_k": max_length,
    }


@dataclass(frozen=True)
class PackedCollator(_Collator):
    """Batches packed rows (``input_ids``, ``labels``, ``position_ids``) with no cross-sample attention.

    Returns ``input_ids``, ``labels``, ``position_ids`` (``(batch, L)`` int64), ``cu_seq_lens_q``,
    ``cu_seq_lens_k`` (int32), ``max_length_q``, ``max_length_k`` (int) and ``num_label_tokens``
    (int). There is deliberately no ``attention_mask``: see the module docstring.
    """

    def __call__(self, rows: Sequence[TokenizedRow]) -> dict[str, Any]:
        lengths = _row_lengths(rows)
        length = self.target_length(lengths)
        position_ids = _packed_position_ids(rows, lengths, length)
        _check_positions(position_ids)
        labels = _fill(rows, "labels", length, IGNORE_INDEX)
        labels[position_ids == 0] = IGNORE_INDEX  # sample boundaries (and pad tails) are never targets
        return {
            "input_ids": _fill(rows, "input_ids", length, _pad_id(self.pad_token_id)),
            "labels": labels,
            "position_ids": position_ids,
            **varlen_kwargs(position_ids),
            "num_label_tokens": count_label_tokens(labels),
        }


def model_inputs(
    batch: Mapping[str, Any], device: torch.device | str | None = None, *, include_labels: bool = False
) -> dict[str, Any]:
    """Keyword arguments for ``model(**...)`` from a collated batch, moved to ``device``.

    Adds ``use_cache=False``, which packed batches need (a KV cache disables packing detection) and
    which is right for any training forward. With ``include_labels`` the model computes its own
    loss; then also pass ``num_items_in_batch`` (the step's summed ``num_label_tokens``) to get a
    sum-then-normalise loss.
    """
    keys = (*MODEL_INPUT_KEYS, "labels") if include_labels else MODEL_INPUT_KEYS
    inputs: dict[str, Any] = {"use_cache": False}
    for key in keys:
        if key in batch:
            value = batch[key]
            inputs[key] = (
                value.to(device) if isinstance(value, torch.Tensor) and device is not None else value
            )
    return inputs

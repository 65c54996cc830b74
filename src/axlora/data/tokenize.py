"""Rows -> ``input_ids`` and ``labels``, with every token that is not trained masked (-100).

Two ways to tokenize a row's segments, chosen by its format (``RowFormat.whole_text``):

* each segment alone, pieces concatenated (alpaca, completion, input_output): the boundary between
  prompt and completion is exact, as when a model generates after the prompt;
* the joined text at once, each token masked by where it starts (chat templates): the ids equal those of
  ``apply_chat_template``; a token is trained when its first character lies in a trained segment.

All texts of a chunk of rows go through the fast tokenizer in one batched call (per-row calls are several
times slower), and the result is assembled with numpy into flat arrays (``rows.TokenizedRows``).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate, chain
from typing import Any

import numpy as np

from axlora.core.names import IGNORE_INDEX
from axlora.data.rows import TokenizedRows
from axlora.data.segments import RawRecord, RowFormat, RowFormatError, Segment

Entry = tuple[int, int, RawRecord]
"""A row to tokenize: (index of its ``datasets`` entry, its position in that dataset, the row)."""

# Label rules of a piece of tokens
_MASKED, _TRAINED, _NEVER = 0, 1, 2  # _NEVER: BOS, not trained even with train_on_inputs


class RowError(Exception):
    """A row its format cannot use: which dataset, which row, which field. ``prepare`` names the file."""

    def __init__(self, dataset_index: int, position: int, field: str, message: str):
        self.dataset_index, self.position, self.field = dataset_index, position, field
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.dataset_index, self.position, self.field, str(self)))


def encode_rows(
    entries: Sequence[Entry],
    formats: Sequence[RowFormat],
    tokenizer,
    *,
    train_on_inputs: bool,
    char_limits: Sequence[int | None] | None = None,
) -> TokenizedRows:
    """Tokenize ``entries``; ``origin`` holds each row's dataset index, ``empty_turns`` what its format skipped.

    ``char_limits`` (per dataset): a row's text beyond that many characters is cut before tokenizing, so an
    enormous row costs time and memory bounded by the limit (``char_limit`` picks one far enough beyond
    ``sequence_len`` that the row is still seen as too long, and its first tokens are unchanged).
    """
    plan = _Plan(tokenizer, train_on_inputs)
    empty_turns = np.zeros(len(entries), dtype=np.int32)
    for number, (dataset_index, position, row) in enumerate(entries):
        fmt = formats[dataset_index]
        try:
            if fmt.pretokenized:
                plan.add_tokens(*pretokenized(row, len(tokenizer)))
            else:
                segments = fmt.segments(row)
                empty_turns[number] = getattr(segments, "empty_turns", 0)
                limit = char_limits[dataset_index] if char_limits else None
                plan.add_segments(fmt, cut_segments(segments, limit) if limit else segments)
        except RowFormatError as exc:
            raise RowError(dataset_index, position, exc.field, str(exc)) from None
    rows = plan.encode()
    rows.origin = np.fromiter((e[0] for e in entries), dtype=np.int32, count=len(entries))
    rows.empty_turns = empty_turns
    return rows


def char_limit(tokenizer, sequence_len: int) -> int:
    """Characters that always hold more than ``sequence_len`` tokens' worth of text, with a margin.

    No token covers more characters than the longest vocabulary entry (byte-level entries spell a byte per
    character, so they overcount), so the first ``sequence_len`` tokens of a text lie within
    ``sequence_len * longest`` characters; twice that plus a constant leaves the cut far from them.
    """
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    return 2 * (sequence_len + 64) * max(longest, 4)


def cut_segments(segments: Sequence[Segment], limit: int) -> list[Segment]:
    """``segments`` with their joined text cut to its first ``limit`` characters."""
    if sum(len(s.text) for s in segments) <= limit:
        return list(segments)
    out, left = [], limit
    for segment in segments:
        if left <= 0:
            break
        out.append(Segment(segment.text[:left], segment.trainable))
        left -= len(segment.text)
    return out


class _Plan:
    """Pieces of every row (token lists with a label rule), filled in by one batched tokenizer call each."""

    def __init__(self, tokenizer, train_on_inputs: bool):
        self.tokenizer = tokenizer
        self.train_on_inputs = train_on_inputs
        self.pieces: list[Any] = []  # a list of ids, or an int: index into the texts tokenized alone
        self.rules: list[int] = []
        self.explicit: dict[int, Any] = {}  # piece index -> labels (pre-tokenized rows, whole-text rows)
        self.row_of_piece: list[int] = []
        self.texts: list[str] = []
        self.whole: list[tuple[int, list[Segment]]] = []  # (piece index, segments) tokenized as one text
        self.rows = 0

    def _piece(self, ids: Any, rule: int) -> int:
        self.pieces.append(ids)
        self.rules.append(rule)
        self.row_of_piece.append(self.rows)
        return len(self.pieces) - 1

    def add_tokens(self, ids: list[int], labels: list[int]) -> None:
        self.explicit[self._piece(ids, _MASKED)] = labels
        self.rows += 1

    def add_segments(self, fmt: RowFormat, segments: list[Segment]) -> None:
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        if fmt.add_bos and bos is not None:
            self._piece([bos], _NEVER)
        if fmt.whole_text and _has_offsets(self.tokenizer):
            self.whole.append((self._piece(None, _MASKED), segments))
        else:
            for segment in segments:
                self.texts.append(segment.text)
                self._piece(len(self.texts) - 1, _TRAINED if segment.trainable else _MASKED)
        if fmt.append_eos and eos is not None:
            self._piece([eos], _TRAINED)
        self.rows += 1

    def encode(self) -> TokenizedRows:
        if self.texts:
            encoded = encode_texts(self.tokenizer, self.texts)
            self.pieces = [encoded[p] if isinstance(p, int) else p for p in self.pieces]
        if self.whole:
            self._encode_whole()
        lengths = np.fromiter(map(len, self.pieces), dtype=np.int64, count=len(self.pieces))
        ids = np.fromiter(chain.from_iterable(self.pieces), dtype=np.int32, count=int(lengths.sum()))
        rules = np.repeat(np.array(self.rules, dtype=np.int8), lengths)
        trained = rules != _NEVER if self.train_on_inputs else rules == _TRAINED
        labels = np.where(trained, ids, IGNORE_INDEX).astype(np.int32)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        for piece, piece_labels in self.explicit.items():
            labels[starts[piece]:starts[piece + 1]] = piece_labels
        row_lengths = np.bincount(
            np.array(self.row_of_piece, dtype=np.int64), weights=lengths, minlength=self.rows
        ).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(row_lengths)]).astype(np.int64)
        return TokenizedRows(ids, labels, offsets)

    def _encode_whole(self) -> None:
        texts = ["".join(s.text for s in segments) for _, segments in self.whole]
        for (piece, segments), (ids, offsets) in zip(self.whole, encode_with_offsets(self.tokenizer, texts), strict=True):
            self.pieces[piece] = ids
            if not self.train_on_inputs:  # else every token keeps its id as label
                self.explicit[piece] = labels_by_offsets(ids, offsets, segments)


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Ids of ``texts`` exactly as ``tokenizer(texts, add_special_tokens=False)`` gives them, faster.

    A fast tokenizer's Rust backend has ``encode_batch_fast``, which skips computing character offsets
    (nearly half the work on short texts). It is used when the backend is in the state the transformers
    wrapper would put it in for this call; otherwise the wrapper is called.
    """
    backend = _plain_backend(tokenizer)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode_with_offsets(tokenizer, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, character offsets) of each text, as ``tokenizer(..., return_offsets_mapping=True)`` gives them."""
    backend = _plain_backend(tokenizer)
    if backend is not None:
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return list(zip(encoded["input_ids"], encoded["offset_mapping"], strict=True))


def _plain_backend(tokenizer):
    """The Rust tokenizer, when calling it directly gives what the transformers wrapper would: no truncation,
    no padding, and special tokens matched as the wrapper matches them."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if (
        backend is not None
        and backend.truncation is None
        and backend.padding is None
        and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))
    ):
        return backend
    return None


def labels_by_offsets(ids: Sequence[int], offsets: Sequence[tuple[int, int]], segments: Sequence[Segment]) -> list[int]:
    """Labels for the tokens of the joined ``segments``: a token is trained when its first character is."""
    ends = list(accumulate(len(s.text) for s in segments))
    last = len(segments) - 1
    labels = []
    for token, (start, _end) in zip(ids, offsets, strict=True):
        segment = min(bisect_right(ends, start), last)
        labels.append(token if segments[segment].trainable else IGNORE_INDEX)
    return labels


def _has_offsets(tokenizer) -> bool:
    """Fast (Rust) tokenizers report character offsets; slow ones get the segment-by-segment path."""
    return bool(getattr(tokenizer, "is_fast", False))


def pretokenized(row: RawRecord, vocab_size: int) -> tuple[list[int], list[int]]:
    """``input_ids`` and ``labels`` of a pre-tokenized row, checked; ``attention_mask`` 0 drops padding.

    ``labels`` default to ``input_ids`` (every token trained).
    """
    ids = _int_list(row, "input_ids", required=True)
    if not ids:
        raise RowFormatError("input_ids", "field 'input_ids' is empty")
    labels = _int_list(row, "labels", required=False)
    mask = _int_list(row, "attention_mask", required=False)
    for name, values in (("labels", labels), ("attention_mask", mask)):
        if values is not None and len(values) != len(ids):
            raise RowFormatError(name, f"field '{name}' has {len(values)} values, input_ids has {len(ids)}")
    bad = next((i for i, t in enumerate(ids) if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RowFormatError(
            "input_ids", f"input_ids[{bad}] = {ids[bad]} is not a token id of this tokenizer (0..{vocab_size - 1})"
        )
    if labels is None:
        labels = list(ids)
    else:
        bad = next((i for i, t in enumerate(labels) if t != IGNORE_INDEX and not 0 <= t < vocab_size), None)
        if bad is not None:
            raise RowFormatError("labels", f"labels[{bad}] = {labels[bad]} is neither -100 nor a token id")
    if mask is not None and not all(mask):
        keep = [i for i, m in enumerate(mask) if m]
        ids, labels = [ids[i] for i in keep], [labels[i] for i in keep]
    return ids, labels


def _int_list(row: RawRecord, field: str, *, required: bool) -> list[int] | None:
    value = row.get(field)
    if value is None:
        if required:
            raise RowFormatError(
                field,
                f"missing field '{field}' (rows of a dataset with no `type` are pre-tokenized; set `type:` to "
                "alpaca, chat_template, sharegpt, completion or input_output for text rows)",
            )
        return None
    if not isinstance(value, (list, tuple)) or not all(type(v) is int for v in value):
        raise RowFormatError(field, f"field '{field}' must be a list of integers")
    return list(value)


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own encoding starts a text with BOS (Llama does, many others do not)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id

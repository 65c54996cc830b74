"""The streamed corpus as training rows: documents tokenized as they come, cut and packed into ``sequence_len`` rows.

Each document is tokenized as the tokenizer does by itself (a BOS where it adds one) and ends with EOS. A document
longer than ``sequence_len`` is cut into ``sequence_len`` pieces, as Axolotl's ``pretrain`` type splits long texts.
With ``sample_packing`` pieces are packed in reading order into rows of up to ``sequence_len`` tokens: a piece that
does not fit in the rest of a row starts the next one, and each piece attends only to itself (its positions restart
at 0, as the supervised packer's samples; Axolotl's ``pretrain_multipack_attn``). Without it each piece is a row.
Every token is trained (``labels`` = ``input_ids``).

Rows depend on nothing but the corpus and the position they start at, and a row always begins at a piece boundary:
so ``StreamPosition`` (which pass over the corpus, entry, document and token offset) is the whole state of the
stream, and reading from a saved position gives exactly the rows an uninterrupted read would. When the corpus ends
before ``max_steps`` the stream starts over (a new pass), as a trainer re-reads an exhausted dataset.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.data.pretraining_read import corpus_files, documents

TOKENIZE_BATCH = 64
"""Documents tokenized together: fast tokenizers are much quicker on a batch, and the batch bounds memory."""


@dataclass(frozen=True)
class StreamPosition:
    """Where the next row starts: the piece at token ``offset`` of ``document`` in ``entry`` on pass ``passes``."""

    passes: int = 0
    entry: int = 0
    document: int = 0
    offset: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamPosition:
        return cls(**{key: int(data[key]) for key in ("passes", "entry", "document", "offset")})


Row = dict[str, list[int]]


@dataclass(frozen=True)
class CorpusStream:
    """How the corpus of a config becomes rows; ``rows(position)`` reads from any position on."""

    config: Config
    tokenizer: Any
    say: Callable[[str], None] = print

    def rows(self, start: StreamPosition = StreamPosition()) -> Iterator[tuple[Row, StreamPosition]]:
        """Rows from ``start`` on, each with the position of the row after it (which a checkpoint saves)."""
        pieces = self._pieces(start)
        if not self.config.sample_packing:
            for piece, _, after in pieces:
                yield _row([piece]), after
            return
        row: list[list[int]] = []
        for piece, at, _ in pieces:  # the stream never ends: every row is closed by the piece after it
            if row and sum(map(len, row)) + len(piece) > self.config.sequence_len:
                yield _row(row), at
                row = []
            row.append(piece)

    def _pieces(self, start: StreamPosition) -> Iterator[tuple[list[int], StreamPosition, StreamPosition]]:
        """``sequence_len`` pieces of each document, with the positions where each starts and ends."""
        length = self.config.sequence_len
        offset = start.offset
        for at, ids in self._documents(start):
            for begin in range(offset, len(ids), length):
                end = min(begin + length, len(ids))
                after = replace(at, offset=end) if end < len(ids) else _next_document(at)
                yield ids[begin:end], replace(at, offset=begin), after
            offset = 0

    def _documents(self, start: StreamPosition) -> Iterator[tuple[StreamPosition, list[int]]]:
        """Token ids of each document with text, passing over the corpus again and again from ``start``."""
        entries = self.config.pretraining_dataset or []
        passes, entry, document = start.passes, start.entry, start.document
        while True:
            whole_pass, found = (entry, document) == (0, 0), False
            for index in range(entry, len(entries)):
                for number, ids in self._tokenized(documents(entries[index], document), document):
                    found = True
                    yield StreamPosition(passes, index, number), ids
                document = 0
            if whole_pass and not found:
                raise UserError("pretraining_dataset: the corpus holds no text to train on (every document is "
                                "empty or missing its text_column).")
            passes, entry = passes + 1, 0
            self.say(f"pretraining_dataset: read to the end; pass {passes + 1} over the corpus starts")

    def _tokenized(self, texts: Iterator[str | None], first: int) -> Iterator[tuple[int, list[int]]]:
        """(document number, token ids + EOS) of each non-empty text, tokenized in small batches."""
        batch: list[tuple[int, str]] = []
        for number, text in enumerate(texts, start=first):
            if text:
                batch.append((number, text))
            if len(batch) == TOKENIZE_BATCH:
                yield from self._encode(batch)
                batch = []
        yield from self._encode(batch)

    def _encode(self, batch: list[tuple[int, str]]) -> Iterator[tuple[int, list[int]]]:
        if not batch:
            return
        eos = self.tokenizer.eos_token_id
        encoded = self.tokenizer([text for _, text in batch], add_special_tokens=True)["input_ids"]
        for (number, _), ids in zip(batch, encoded, strict=True):
            yield number, list(ids) if eos is None or (ids and ids[-1] == eos) else [*ids, eos]


def _next_document(position: StreamPosition) -> StreamPosition:
    return replace(position, document=position.document + 1, offset=0)


def _row(pieces: list[list[int]]) -> Row:
    """A training row: the pieces one after another, positions restarting at each (see ``PackedCollator``)."""
    input_ids = [token for piece in pieces for token in piece]
    return {
        "input_ids": input_ids,
        "labels": list(input_ids),
        "position_ids": [p for piece in pieces for p in range(len(piece))],
        "seq_lens": [len(piece) for piece in pieces],
    }


def stream_fingerprint(config: Config, tokenizer_fingerprint: str) -> str:
    """What fixes the rows of the stream: the entries, the tokenizer, the row length and the packing.

    A local corpus adds its files' sizes (not their content: reading a corpus to hash it would cost a pass over
    it), so a resume over files that grew or shrank is refused; a Hub dataset is named by path, name and split.
    """
    entries = config.pretraining_dataset or []
    described = {
        "entries": [entry.model_dump() for entry in entries],
        "files": [[str(path), path.stat().st_size] for entry in entries for path, _ in corpus_files(entry) or []],
        "tokenizer": tokenizer_fingerprint,
        "sequence_len": config.sequence_len,
        "sample_packing": config.sample_packing,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def check_corpus(config: Config, tokenizer, say: Callable[[str], None] = print) -> None:
    """``axlora preprocess`` of a streamed corpus: nothing is prepared; read its first row to fail fast."""
    row, _ = next(CorpusStream(config, tokenizer, say).rows())
    say(f"pretraining_dataset: streamed while training, nothing to prepare; the first row reads ("
        f"{len(row['input_ids'])} tokens from {len(row['seq_lens'])} document piece(s) of sequence_len "
        f"{config.sequence_len})")

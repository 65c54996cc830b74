"""The streamed corpus as the step loop reads it: ``rows[i]`` is the stream's row ``i``, read forward.

Every process reads the whole stream and keeps only the rows its share of each step names (``DataOrder``), so the
rows of a step are the same for any number of processes, as for prepared data. Only the rows of about one step are
held: memory does not grow with the corpus or the run. A checkpoint saves the stream position at its step's first
row; a resumed run starts reading there, so it trains on exactly the tokens the uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from axlora.config.schema import Config
from axlora.data.pretraining_pack import CorpusStream, Row, StreamPosition, stream_fingerprint
from axlora.data.pretraining_read import corpus_files
from axlora.model.tokenizer import tokenizer_fingerprint
from axlora.train.data_order import StreamOrder

STATE_KEY = "pretraining_stream"
"""The checkpoint state's entry for the stream: its position and the row index it belongs to."""


class StreamedRows:
    """Rows of ``stream`` by global index, read in increasing order; the last ``keep`` rows stay readable."""

    def __init__(self, stream: CorpusStream, planned_rows: int, keep: int):
        self.stream, self.planned_rows, self.keep = stream, planned_rows, keep
        self._reader: Iterator[tuple[Row, StreamPosition]] | None = None
        self._next, self._position = 0, StreamPosition()
        self._recent: dict[int, Row] = {}

    def __len__(self) -> int:
        return self.planned_rows

    def __getitem__(self, index: int) -> Row:
        if index in self._recent:
            return self._recent[index]
        if index < self._next:
            raise IndexError(f"stream row {index} was read and let go (reading is at row {self._next})")
        self._advance_to(index + 1)
        return self._recent[index]

    def seek(self, index: int, position: StreamPosition) -> None:
        """Continue at row ``index``, which starts at ``position`` (from a checkpoint)."""
        self._reader, self._recent = None, {}
        self._next, self._position = index, position

    def position_at(self, index: int) -> StreamPosition:
        """Where row ``index`` starts: the rows before it are read (each process reads them all anyway)."""
        if index < self._next:
            raise ValueError(f"stream row {index} is behind the reader (row {self._next})")
        self._advance_to(index)
        return self._position

    def state_at(self, index: int) -> dict:
        """The checkpoint entry for a run whose next row is ``index``."""
        return {STATE_KEY: {"row": index, **self.position_at(index).as_dict()}}

    def restore(self, state: dict) -> None:
        saved = state[STATE_KEY]
        self.seek(int(saved["row"]), StreamPosition.from_dict(saved))

    def _advance_to(self, stop: int) -> None:
        """Read rows until ``stop`` rows have been read, keeping the last ``keep``."""
        if self._reader is None:
            self._reader = self.stream.rows(self._position)
        while self._next < stop:
            row, self._position = next(self._reader)
            self._recent[self._next] = row
            self._recent.pop(self._next - self.keep, None)
            self._next += 1


@dataclass
class StreamedData:
    """``pretraining_dataset`` in place of prepared data: nothing is prepared, rows are read while training."""

    train: StreamedRows
    fingerprint: str  # what fixes the rows, for the resume check
    val: tuple = ()  # a stream has no validation split


def stream_data(config: Config, tokenizer, world_size: int, say) -> StreamedData:
    """The stream of ``config``'s corpus, checked to exist (local files) before anything is read."""
    for entry in config.pretraining_dataset or []:
        corpus_files(entry)
    rows_per_step = config.micro_batch_size * config.gradient_accumulation_steps * world_size
    assert config.max_steps is not None  # the config requires it with pretraining_dataset
    rows = StreamedRows(CorpusStream(config, tokenizer, say), config.max_steps * rows_per_step, keep=rows_per_step)
    layout = "packed, attention within each document" if config.sample_packing else "one document piece a row"
    say(f"pretraining_dataset: streamed, tokenized and packed while training ({layout}; nothing is prepared)")
    return StreamedData(rows, stream_fingerprint(config, tokenizer_fingerprint(tokenizer)))


def stream_order(config: Config, rows: StreamedRows, world_size: int) -> StreamOrder:
    """The step schedule of a stream: its rows in reading order, ``rows_per_step`` a step."""
    return StreamOrder(num_rows=len(rows), micro_batch_size=config.micro_batch_size,
                       gradient_accumulation_steps=config.gradient_accumulation_steps, world_size=world_size,
                       seed=config.seed)


def corpus_prompt_texts(config: Config, tokenizer=None) -> list[str]:
    """``sample_prompts`` of a continued-pretraining run: starts of texts the model continues, like its documents
    (the config refuses a mapping of format fields here)."""
    return [str(prompt) for prompt in config.sample_prompts]

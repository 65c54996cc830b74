"""The rows a run trains and evaluates on: tokenizer, prepared data, and the layout the step loop consumes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.data.collate import PackedCollator, PaddedCollator
from axlora.data.pack import PackedRows
from axlora.data.prepare import PreparedData, prepare_data
from axlora.model.tokenizer import load_tokenizer, tokenizer_fingerprint
from axlora.train.pretraining_rows import StreamedData, StreamedRows, stream_data
from axlora.train.runtime import Runtime

_NEEDS_VALIDATION = ("eval_on_start", "early_stopping_patience")


def check_eval_settings(config: Config) -> None:
    """Evaluation features need a validation split, and early stopping needs evaluations to count."""
    for key in _NEEDS_VALIDATION:
        if getattr(config, key) and not config.val_set_size:
            raise UserError(f"{key}: needs validation rows to evaluate; set val_set_size (e.g. 0.05).")
    if config.early_stopping_patience and config.eval_steps is None:
        raise UserError("early_stopping_patience: needs eval_steps (evaluate every N steps) so that "
                        "evaluations without improvement can be counted.")


def prepare_rows(config: Config, runtime: Runtime) -> tuple[Any, PreparedData | StreamedData]:
    """The tokenizer and the tokenized rows; one rank prepares, the others then read its cache.

    A ``pretraining_dataset`` is not prepared: every rank streams it while training.
    """
    tokenizer = load_tokenizer(config, log=runtime.say)
    if config.pretraining_dataset:
        return tokenizer, stream_data(config, tokenizer, runtime.world_size, runtime.say)
    with runtime.accelerator.main_process_first():
        prepared = prepare_data(config, tokenizer, tokenizer_fingerprint(tokenizer), runtime.say)
    for key in _NEEDS_VALIDATION:
        if getattr(config, key) and not prepared.val:
            raise UserError(f"{key}: val_set_size {config.val_set_size:g} leaves no validation rows; "
                            "raise it (a fraction, or a row count >= 1).")
    return tokenizer, prepared


@dataclass
class TrainingData:
    """Rows as the step loop and the evaluation read them, each with the collator that batches them."""

    tokenizer: Any
    prepared: PreparedData | StreamedData
    train_rows: Any  # packed rows with ``sample_packing``, else the prepared samples; or the stream's rows
    collate: PaddedCollator | PackedCollator
    val_rows: Any
    val_collate: PaddedCollator

    def stream_state(self, next_row: int) -> dict[str, Any]:
        """What a checkpoint must add to resume the data: the stream position (prepared data needs only the step)."""
        return self.train_rows.state_at(next_row) if isinstance(self.train_rows, StreamedRows) else {}

    def resume_stream(self, state: dict[str, Any]) -> None:
        """Continue the stream where the checkpoint's ``state`` left it."""
        if isinstance(self.train_rows, StreamedRows):
            self.train_rows.restore(state)


def lay_out_rows(config: Config, tokenizer, prepared: PreparedData | StreamedData, say) -> TrainingData:
    """Training rows packed when ``sample_packing``, else the samples as prepared.

    Validation rows stay unpacked: eval loss is then comparable across packing settings. A stream's rows come
    packed (or one piece each) from the stream itself.
    """
    pad = tokenizer.pad_token_id
    val_collate = PaddedCollator(pad_token_id=pad)
    if isinstance(prepared, StreamedData):
        collator = PackedCollator if config.sample_packing else PaddedCollator
        return TrainingData(tokenizer, prepared, prepared.train, collator(pad_token_id=pad, **config.padding()),
                            prepared.val, val_collate)
    if not config.sample_packing:
        collate = PaddedCollator(pad_token_id=pad, **config.padding())
        return TrainingData(tokenizer, prepared, prepared.train, collate, prepared.val, val_collate)
    rows = PackedRows(prepared.train, config.sequence_len)  # built per batch from the mapped samples
    say(f"packing: {len(prepared.train)} samples -> {len(rows)} rows of {config.sequence_len} "
        f"({100 * rows.tokens / (len(rows) * config.sequence_len):.1f}% full)")
    collate = PackedCollator(pad_token_id=pad, **config.padding())
    return TrainingData(tokenizer, prepared, rows, collate, prepared.val, val_collate)

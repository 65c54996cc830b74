"""Text generation shared by the train-time sample completions and ``axlora inference``.

Prompts are encoded as the run's data were (``prompt_ids``), generated in batches with left padding (so every
row's last prompt token sits at the same position and new tokens follow it directly), cut at the first stop
token and decoded. Greedy unless a temperature is given, so the same prompt gives the same answer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from axlora.data.segments import RowFormat


@dataclass(frozen=True)
class Sampling:
    """How new tokens are picked: greedy when ``temperature`` is 0, else sampled with these filters."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None

    def generate_kwargs(self) -> dict[str, Any]:
        # every knob is given explicitly: a model's generation_config must not turn greedy into sampling
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.temperature > 0,
                                  "temperature": None, "top_p": None, "top_k": None}
        if self.temperature > 0:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        if self.repetition_penalty is not None:
            kwargs["repetition_penalty"] = self.repetition_penalty
        return kwargs


def prompt_ids(tokenizer, text: str, row_format: RowFormat | None = None) -> list[int]:
    """``text``'s ids as the run's tokenizing step encodes a prompt of ``row_format``.

    Formats tokenize without the tokenizer's special tokens and add BOS themselves where the model expects it;
    a chat template writes its own. Without a format (or for pre-tokenized data) the tokenizer adds its
    special tokens unless the text already starts with BOS.
    """
    if row_format is not None and not row_format.pretokenized:
        bos = [tokenizer.bos_token_id] if row_format.add_bos and tokenizer.bos_token_id is not None else []
        return bos + tokenizer(text, add_special_tokens=False).input_ids
    has_bos = bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)
    return tokenizer(text, add_special_tokens=not has_bos).input_ids


def stop_token_ids(tokenizer, row_format: RowFormat | None = None) -> list[int]:
    """EOS, plus each end-of-turn marker of a chat format that is one token of the vocabulary."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    markers = (row_format.settings or {}).get("end_of_turn", []) if row_format is not None else []
    vocab = tokenizer.get_vocab()
    stops += [vocab[marker] for marker in markers if marker in vocab]
    return list(dict.fromkeys(stops))


def generate_texts(model, tokenizer, prompts: Sequence[list[int]], sampling: Sampling, *,
                   stop_ids: Sequence[int] | None = None, batch_size: int = 8,
                   synced_ranks: bool = False) -> list[str]:
    """The text each prompt (token ids) continues with, in order.

    ``synced_ranks``: every rank generates together (the weights are partitioned across them, ZeRO-3/FSDP).
    """
    import torch

    stops = list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer)
    outputs: list[str] = []
    with _eval_mode(model), torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            input_ids, attention_mask = left_padded(batch, _pad_id(tokenizer, stops), _device(model))
            generated = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, pad_token_id=_pad_id(tokenizer, stops),
                eos_token_id=stops or None, synced_gpus=synced_ranks, **sampling.generate_kwargs(),
            )
            for row in generated[:, input_ids.shape[1]:].tolist():
                outputs.append(tokenizer.decode(cut_at_stop(row, stops), skip_special_tokens=True))
    return outputs


def stream_text(model, tokenizer, prompt: list[int], sampling: Sampling, *,
                stop_ids: Sequence[int] | None = None) -> Iterator[str]:
    """Pieces of one prompt's continuation as they are generated (for an interactive chat)."""
    from threading import Thread

    import torch
    from transformers import TextIteratorStreamer

    stops = list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    input_ids, attention_mask = left_padded([prompt], _pad_id(tokenizer, stops), _device(model))
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                model.generate(input_ids=input_ids, attention_mask=attention_mask, streamer=streamer,
                               pad_token_id=_pad_id(tokenizer, stops), eos_token_id=stops or None,
                               **sampling.generate_kwargs())
        except BaseException as exc:  # handed to the caller's thread below, never lost in this one
            failure.append(exc)
            streamer.end()

    with _eval_mode(model):
        worker = Thread(target=run, daemon=True)
        worker.start()
        yield from streamer
        worker.join()
    if failure:
        raise failure[0]


def left_padded(rows: Sequence[list[int]], pad_id: int, device):
    """``(input_ids, attention_mask)`` of ``rows`` padded on the left to the longest."""
    import torch

    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        if row:
            ids[index, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[index, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def cut_at_stop(ids: list[int], stops: Sequence[int]) -> list[int]:
    """``ids`` up to (not including) the first stop token; what follows it is padding."""
    stop_set = set(stops)
    for index, token in enumerate(ids):
        if token in stop_set:
            return ids[:index]
    return ids


def _pad_id(tokenizer, stops: Sequence[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return stops[0] if stops else 0


def _device(model):
    return next(model.parameters()).device


class _eval_mode:
    """Dropout off while generating; the model's training mode restored after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc_info):
        self.model.train(self.was_training)

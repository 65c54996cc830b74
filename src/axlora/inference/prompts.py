"""Prompts for ``axlora inference``: where they come from, and how they are rendered as the run's data were.

A prompt is a text, the format's fields (a JSON object: ``{"instruction": ..., "input": ...}`` for alpaca, as
``sample_prompts`` takes them), or a conversation (``messages``: role and content, chat runs only). Rendering
goes through the first dataset's ``RowFormat`` (``data.formats.build_format``), the same code that renders
training rows and ``sample_prompts``: the model sees its training format, never a second copy of it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from axlora.config.datasets import DatasetConfig
from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.data.formats import build_format, needs_tokenizer
from axlora.data.segments import PromptEntry, RowFormat, RowFormatError

Message = dict[str, str]


@dataclass(frozen=True)
class PromptRequest:
    """One prompt to answer, and the row that ``--output`` writes back with its response."""

    row: dict[str, Any]
    entry: PromptEntry | None = None
    messages: list[Message] | None = None
    where: str = ""
    """Where it came from (``file:line``), for messages about it."""


@dataclass
class PromptFormat:
    """Renders prompts with the run's first dataset format; chat runs also render whole conversations."""

    row_format: RowFormat
    conversation_format: RowFormat | None
    system: str | None = None
    dataset_type: str = field(default="")

    @property
    def is_chat(self) -> bool:
        return self.conversation_format is not None

    def render(self, request: PromptRequest) -> str:
        """The text the model continues from for ``request``."""
        if request.messages is not None:
            if self.conversation_format is None:
                raise UserError(f"{request.where}: 'messages' need a chat run, but datasets[0] is type "
                                f"{self.dataset_type}; give 'prompt' instead.")
            return self.conversation(request.messages)
        entry = request.entry
        if isinstance(entry, str) and self.conversation_format is not None:
            return self.conversation([{"role": "user", "content": entry}])
        try:
            return self.row_format.prompt(entry if entry is not None else "")
        except RowFormatError as exc:
            raise UserError(f"{request.where}: {exc}") from None

    def conversation(self, messages: Sequence[Message]) -> str:
        """A chat run's conversation so far (with the ``--system`` message first), ready for the next answer."""
        assert self.conversation_format is not None
        turns = list(messages)
        if self.system and not (turns and turns[0].get("role") == "system"):
            turns.insert(0, {"role": "system", "content": self.system})
        try:
            return self.conversation_format.prompt({"messages": turns})
        except RowFormatError as exc:
            raise UserError(f"inference: the conversation cannot be rendered: {exc}") from None


def prompt_format(config: Config, tokenizer, system: str | None) -> PromptFormat:
    """The prompt format of ``config.datasets[0]``, with ``tokenizer``'s chat template where the run used it."""
    config = _with_corpus_format(config)
    row_format = build_format(config, 0, tokenizer)
    dataset = config.datasets[0]
    conversation = None
    if needs_tokenizer(config):
        # the same dataset settings (template, roles), reading conversations in the plain role/content layout
        plain = dataset.model_copy(update={
            "field_messages": "messages", "message_property_mappings": {"role": "role", "content": "content"},
            "message_field_role": None, "message_field_content": None,
        })
        conversation = build_format(config.model_copy(update={"datasets": [plain]}), 0, tokenizer)
    elif system:
        raise UserError(f"inference: --system needs a chat run; datasets[0] is type {dataset.type or 'pre-tokenized'}.")
    return PromptFormat(row_format, conversation, system, dataset.type or "pre-tokenized")


def _with_corpus_format(config: Config) -> Config:
    """A continued-pretraining run (``pretraining_dataset``, no ``datasets``) saw raw text: a prompt is the
    start of a text to continue, rendered as a completion row of the corpus's text column."""
    if config.datasets or not config.pretraining_dataset:
        return config
    corpus = config.pretraining_dataset[0]
    as_text = DatasetConfig(path=corpus.path, type="completion", field=corpus.text_column)
    return config.model_copy(update={"datasets": [as_text]})


# ---- where prompts come from -------------------------------------------------------------------------------

def text_requests(texts: Iterable[str], source: str) -> list[PromptRequest]:
    """Prompts given as text (``--prompt``, lines of standard input); a JSON object holds the format's fields."""
    requests = []
    for number, text in enumerate(texts, start=1):
        if not text.strip():
            raise UserError(f"inference: {source} {number} is empty; give the text to answer.")
        fields = _json_object(text)
        entry: PromptEntry = fields if fields is not None else text
        requests.append(PromptRequest({"prompt": entry}, entry=entry, where=f"{source} {number}"))
    return requests


def stdin_requests(lines: Iterable[str]) -> list[PromptRequest]:
    """One prompt per non-empty line of standard input."""
    requests = text_requests((line.rstrip("\r\n") for line in lines if line.strip()), "standard input, prompt")
    if not requests:
        raise UserError("inference: standard input holds no prompt (one prompt per line).")
    return requests


def file_requests(path: Path) -> list[PromptRequest]:
    """The rows of a JSON Lines file, each with ``prompt`` (text or the format's fields) or ``messages``."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise UserError(f"--prompts: {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--prompts: cannot read {path}: {exc}") from None
    requests = [_file_request(line, f"{path}:{number}") for number, line in enumerate(lines, start=1) if line.strip()]
    if not requests:
        raise UserError(f"--prompts: {path} holds no prompt; expected JSON lines with 'prompt' or 'messages'.")
    return requests


def _file_request(line: str, where: str) -> PromptRequest:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not valid JSON ({exc.msg}); expected an object with 'prompt' or 'messages'.") from None
    if not isinstance(row, dict) or ("prompt" in row) == ("messages" in row):
        raise UserError(f"{where}: expected an object with either 'prompt' or 'messages'.")
    if "messages" in row:
        return PromptRequest(row, messages=_messages(row["messages"], where), where=where)
    prompt = row["prompt"]
    if not isinstance(prompt, str | Mapping) or not prompt:
        raise UserError(f"{where}: 'prompt' must be a non-empty text or an object of the format's fields.")
    return PromptRequest(row, entry=prompt, where=where)


def _messages(value: Any, where: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}}.")
    for index, message in enumerate(value):
        if not (isinstance(message, Mapping) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise UserError(f"{where}: messages[{index}] must be an object with text 'role' and 'content'.")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _json_object(text: str) -> dict[str, Any] | None:
    if not text.lstrip().startswith("{"):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None

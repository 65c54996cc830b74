"""Row formats (a dataset's ``type``): how one row becomes text segments, and the tokenizer settings it needs.

========================  ==========================================================  ======  ======
type                      row                                                         BOS     EOS
========================  ==========================================================  ======  ======
alpaca                    instruction, input (optional), output                       model   added
completion                ``field`` (default ``text``): trained whole                 model   added
input_output              segments: [{text, label}], label true = trained             no      no
chat_template / sharegpt  messages rendered by a chat template (see ``chat.py``)      template
(empty)                   pre-tokenized: input_ids, labels (optional), attention_mask  as given
========================  ==========================================================  ======  ======

"model": BOS is prepended when the tokenizer's own encoding starts with it (Llama does, Qwen does not).
``train_on_inputs`` trains every token of a sample except BOS, whatever its format says.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from axlora.config.chat_templates import read_jinja_setting
from axlora.config.datasets import DatasetConfig
from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.data.chat import TurnEnds, chat_format, end_of_turn_markers
from axlora.data.chat_messages import MessageSettings
from axlora.data.segments import PromptEntry, RawRecord, RowFormat, RowFormatError, Segment, required_text
from axlora.data.template_choice import ChatTemplate, TemplateChoiceError, choose_template

__all__ = ["FORMATS", "RowFormatError", "Segment", "alpaca", "alpaca_prompt", "build_format", "build_formats"]

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


def alpaca(row: RawRecord) -> list[Segment]:
    """Alpaca: ``instruction`` (+ optional ``input``) is the prompt, ``output`` the completion."""
    instruction = required_text(row, "instruction")
    output = required_text(row, "output")
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


def _alpaca_entry(entry: PromptEntry) -> str:
    row: dict[str, Any] = {"instruction": entry} if isinstance(entry, str) else dict(entry)
    row.setdefault("output", "")
    return alpaca(row)[0].text


def completion(field: str) -> Callable[[RawRecord], list[Segment]]:
    """Completion: the whole text of ``field`` is trained (continued pre-training, plain documents)."""

    def segments(row: RawRecord) -> list[Segment]:
        return [Segment(required_text(row, field), trainable=True)]

    return segments


def input_output(row: RawRecord) -> list[Segment]:
    """Template-free: ``segments`` of ``{text, label}``, concatenated as written; ``label: false`` is masked."""
    pieces = row.get("segments")
    if pieces is None:
        raise RowFormatError("segments", "missing field 'segments' (a list of {text, label})")
    if not isinstance(pieces, list) or not pieces:
        raise RowFormatError("segments", "field 'segments' must be a non-empty list of {text, label}")
    out = []
    for index, piece in enumerate(pieces):
        where = f"segments[{index}]"
        if not isinstance(piece, Mapping) or not isinstance(piece.get("text"), str):
            raise RowFormatError(f"{where}.text", f"{where} must be a mapping with a text field 'text'")
        label = piece.get("label", True)
        if not isinstance(label, bool):
            raise RowFormatError(f"{where}.label", f"{where}.label must be true or false, got {label!r}")
        out.append(Segment(piece["text"], trainable=label))
    return out


def _entry_text(field: str) -> Callable[[PromptEntry], str]:
    def prompt(entry: PromptEntry) -> str:
        return entry if isinstance(entry, str) else str(entry.get(field, ""))

    return prompt


def _pretokenized_prompt(entry: PromptEntry) -> str:
    return entry if isinstance(entry, str) else str(entry.get("text", ""))


def _chat(dataset: DatasetConfig, config: Config, tokenizer, index: int) -> RowFormat:
    setting = dataset.template_setting()
    jinja = dataset.chat_template_jinja
    if setting is None and jinja is None:
        setting, jinja = config.chat_template, read_jinja_setting(config.chat_template_jinja)
    try:
        template = choose_template(setting, jinja, _tokenizer_template(tokenizer))
    except TemplateChoiceError as exc:
        raise UserError(f"datasets[{index}] ({dataset.label}): {exc}.") from None
    markers = end_of_turn_markers(tokenizer, template, config.eot_tokens)
    ends = TurnEnds(
        eos=tokenizer.eos_token, markers=frozenset(markers), train_on_eos=dataset.train_on_eos,
        train_on_eot=dataset.train_on_eot or dataset.train_on_eos,
    )
    warnings = _split_markers(tokenizer, template, config, index)
    return chat_format(
        dataset.type or "chat_template", template, tokenizer, MessageSettings.of(dataset), dataset.roles_to_train,
        ends, config.chat_template_kwargs, warnings,
    )


def _split_markers(tokenizer, template: ChatTemplate, config: Config, index: int) -> tuple[str, ...]:
    """End-of-turn markers the tokenizer splits into several tokens: a warning, an error under ``strict``.

    They are still trained (as text), but a model that stops on one end-of-turn token id never stops.
    """
    wanted = config.eot_tokens if config.eot_tokens is not None else [template.end_of_turn]
    origin = "in eot_tokens" if config.eot_tokens is not None else f"of {template.source}"
    messages = []
    for marker in filter(None, wanted):
        ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            messages.append(
                f"datasets[{index}]: the end-of-turn marker {marker!r} {origin} is {len(ids)} tokens to "
                "this tokenizer, not one: it is trained as text, but generation that stops on one token will not "
                "stop; add it as a special token (special_tokens / tokens)"
            )
    if messages and config.strict:
        raise UserError(messages[0] + " (strict: true).")
    return tuple(messages)


def _tokenizer_template(tokenizer) -> str | None:
    try:
        return tokenizer.get_chat_template()
    except (ValueError, AttributeError):
        return None


def _builders() -> dict[str | None, Callable[[DatasetConfig, Config, Any, int], RowFormat]]:
    from axlora.data.tokenize import tokenizer_adds_bos

    def adds_bos(tokenizer) -> bool:
        return tokenizer is not None and tokenizer_adds_bos(tokenizer)

    return {
        "alpaca": lambda d, c, t, i: RowFormat(
            "alpaca", alpaca, _alpaca_entry, add_bos=adds_bos(t), append_eos=True
        ),
        "completion": lambda d, c, t, i: RowFormat(
            "completion", completion(d.field or "text"), _entry_text(d.field or "text"),
            add_bos=adds_bos(t), append_eos=True,
        ),
        "input_output": lambda d, c, t, i: RowFormat("input_output", input_output, _entry_text("text")),
        "chat_template": _chat,
        "sharegpt": _chat,
        None: lambda d, c, t, i: RowFormat("pre-tokenized", None, _pretokenized_prompt, pretokenized=True),
    }


FORMATS: tuple[str | None, ...] = ("alpaca", "completion", "input_output", "chat_template", "sharegpt", None)
"""Every ``type`` (None: pre-tokenized rows); the config schema lists the same names."""


def build_format(config: Config, index: int, tokenizer) -> RowFormat:
    """The ``RowFormat`` of ``config.datasets[index]``; chat formats read their template from ``tokenizer``.

    ``tokenizer`` may be None for the text formats when only prompts are wanted (BOS is then not known).
    """
    dataset = config.datasets[index]
    return _builders()[dataset.type](dataset, config, tokenizer, index)


def build_formats(config: Config, tokenizer) -> list[RowFormat]:
    """One ``RowFormat`` per entry of ``datasets``."""
    return [build_format(config, index, tokenizer) for index in range(len(config.datasets))]


def needs_tokenizer(config: Config, index: int = 0) -> bool:
    """Whether rendering a prompt of this dataset needs the tokenizer (its chat template)."""
    return config.datasets[index].type in ("chat_template", "sharegpt")

"""A chat row as a template reads it: Axolotl's field and role mappings applied, content parts joined, the
system column, reasoning text and tool definitions in the places templates look for them.

Role names resolve as in Axolotl: ``roles`` maps each template role to the names the data uses for it
(default: human/user -> user; gpt/assistant/model/function_call -> assistant; tool/observation -> tool), and
``roles_to_train`` goes through the same mapping, so ``[gpt]`` trains the turns written ``gpt``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from axlora.config.datasets import DatasetConfig
from axlora.data.segments import RawRecord, RowFormatError

DEFAULT_ROLES: dict[str, list[str]] = {
    "user": ["human", "user"],
    "assistant": ["gpt", "assistant", "model", "function_call"],
    "system": ["system"],
    "tool": ["tool", "observation"],
}
"""Role names in the data that each template role takes, when a dataset sets no ``roles``."""

THINKING_PAIRS = (("<think>", "</think>"), ("<reasoning>", "</reasoning>"), ("<|begin_of_thought|>", "<|end_of_thought|>"))
SOLUTION_PAIR = ("<|begin_of_solution|>", "<|end_of_solution|>")


@dataclass(frozen=True)
class MessageSettings:
    """Where a chat dataset keeps each part of a conversation (the dataset's keys with Axolotl's defaults)."""

    field_messages: str
    role_key: str
    content_key: str
    renamed: dict[str, str]
    """data key -> template key, for the other mapped message properties."""
    aliases: dict[str, str]
    """role name in the data -> template role."""
    training_key: str | None
    field_system: str
    field_tools: str
    field_thinking: str
    thinking_key: str
    split_thinking: bool
    drop_system_message: bool

    @classmethod
    def of(cls, dataset: DatasetConfig) -> MessageSettings:
        sharegpt = dataset.type == "sharegpt"
        mappings = dict(dataset.message_property_mappings or {})
        mappings.setdefault("role", dataset.message_field_role or ("from" if sharegpt else "role"))
        mappings.setdefault("content", dataset.message_field_content or ("value" if sharegpt else "content"))
        roles = dataset.roles or DEFAULT_ROLES
        return cls(
            field_messages=dataset.field_messages or ("conversations" if sharegpt else "messages"),
            role_key=mappings["role"],
            content_key=mappings["content"],
            renamed={source: target for target, source in mappings.items() if target not in ("role", "content")},
            aliases={source: target for target, sources in roles.items() for source in sources},
            training_key=dataset.message_field_training,
            field_system=dataset.field_system,
            field_tools=dataset.field_tools,
            field_thinking=dataset.field_thinking,
            thinking_key=dataset.template_thinking_key,
            split_thinking=dataset.split_thinking,
            drop_system_message=dataset.drop_system_message,
        )

    def role(self, name: str) -> str:
        """The template role of a role name as the data (or ``roles_to_train``) writes it."""
        return self.aliases.get(name, name)


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    train_flags: list[bool | None]
    """Per message: the ``message_field_training`` value, or None (the role decides)."""
    tools: list[Any] | None


def read_conversation(row: RawRecord, settings: MessageSettings) -> Conversation:
    """The row's messages as the template reads them, checked field by field."""
    raw = row.get(settings.field_messages)
    if raw is None:
        raise RowFormatError(settings.field_messages, f"missing field '{settings.field_messages}' (the list of messages)")
    if not isinstance(raw, list) or not raw:
        raise RowFormatError(settings.field_messages, f"field '{settings.field_messages}' must be a non-empty list of messages")
    messages, flags = [], []
    for index, message in enumerate(raw):
        messages.append(_message(message, f"{settings.field_messages}[{index}]", settings))
        flag = message.get(settings.training_key) if settings.training_key else None
        flags.append(flag if isinstance(flag, bool) else None)
    system = row.get(settings.field_system)
    if messages[0]["role"] != "system" and isinstance(system, str) and system:
        messages.insert(0, {"role": "system", "content": system})
        flags.insert(0, None)
    if settings.drop_system_message and messages[0]["role"] == "system":
        messages, flags = messages[1:], flags[1:]
    if not messages:
        raise RowFormatError(settings.field_messages, "no message left after drop_system_message")
    return Conversation(messages, flags, _tools(row, settings.field_tools))


def _message(message: Any, where: str, settings: MessageSettings) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise RowFormatError(where, f"{where} must be a mapping with '{settings.role_key}' and '{settings.content_key}'")
    role = message.get(settings.role_key)
    if not isinstance(role, str):
        raise RowFormatError(f"{where}.{settings.role_key}", f"{where} has no text field '{settings.role_key}' (the role)")
    skip = {settings.role_key, settings.content_key, settings.field_thinking}
    out = {settings.renamed.get(k, k): v for k, v in message.items() if v is not None and k not in skip}
    out["role"] = settings.role(role)
    out["content"] = content_text(message.get(settings.content_key), f"{where}.{settings.content_key}")
    thinking = message.get(settings.field_thinking)
    if thinking is not None:
        out[settings.thinking_key] = content_text(thinking, f"{where}.{settings.field_thinking}")
    if settings.split_thinking and out["role"] == "assistant":
        _split_thinking(out, settings.thinking_key)
    if out.get("tool_calls"):
        out["tool_calls"] = _tool_calls(out["tool_calls"], f"{where}.tool_calls")
    return out


def content_text(value: Any, where: str) -> str:
    """Message content as text: a string, or a list of text parts joined (other kinds refused by name)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise RowFormatError(where, f"{where} must be text or a list of text parts, got {type(value).__name__}")
    texts = []
    for index, part in enumerate(value):
        if isinstance(part, str):
            texts.append(part)
            continue
        kind = part.get("type", "text") if isinstance(part, Mapping) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise RowFormatError(
                f"{where}[{index}]",
                f"{where}[{index}] is a '{kind}' part; only text parts ({{type: text, text: ...}}) can be trained on",
            )
        texts.append(part["text"])
    return "".join(texts)


def _split_thinking(message: dict[str, Any], thinking_key: str) -> None:
    """Axolotl's split_thinking: reasoning between a known pair of tags moves out of the content."""
    content = message["content"]
    for opening, closing in THINKING_PAIRS:
        start, end = content.find(opening), content.find(closing)
        if start < 0 or end < 0:
            continue
        message[thinking_key] = content[start + len(opening):end].strip()
        rest = content[end + len(closing):].lstrip()
        first, last = rest.find(SOLUTION_PAIR[0]), rest.find(SOLUTION_PAIR[1])
        message["content"] = rest[first + len(SOLUTION_PAIR[0]):last].strip() if 0 <= first < last else rest
        return


def _json(value: Any, where: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise RowFormatError(where, f"{where} is text but not valid JSON: {exc.msg}") from None


def _tool_calls(calls: Any, where: str) -> list[Any]:
    calls = _json(calls, where)
    if not isinstance(calls, list):
        raise RowFormatError(where, f"{where} must be a list of tool calls")
    out = []
    for index, call in enumerate(calls):
        call = _json(call, f"{where}[{index}]")
        function = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(function, Mapping) and "arguments" in function:
            arguments = _json(function["arguments"], f"{where}[{index}].function.arguments")
            call = {**call, "function": {**function, "arguments": arguments}}
        out.append(call)
    return out


def _tools(row: RawRecord, field: str) -> list[Any] | None:
    """The row's tool definitions (JSON text parsed, also a function's ``parameters``), or None."""
    tools = _json(row.get(field), field)
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise RowFormatError(field, f"field '{field}' must be a list of tool definitions (or JSON text of one)")
    out = []
    for index, tool in enumerate(tools):
        tool = _json(tool, f"{field}[{index}]")
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if isinstance(function, Mapping) and isinstance(function.get("parameters"), str):
            parameters = _json(function["parameters"], f"{field}[{index}].function.parameters")
            tool = {**tool, "function": {**function, "parameters": parameters}}
        out.append(tool)
    return out

"""Axolotl's preference row formats, read into one shape: the prompt's messages and the answers.

Pairs (DPO, IPO, SimPO, ORPO) hold a chosen and a rejected answer to the same prompt; KTO rows hold one
completion and whether it is desirable. ``chatml.*`` and ``llama3.*`` differ only in the template they
render with (``PreferenceDatasetConfig.template_setting``), so both read the same fields:

* ``*.intel``: ``system`` (optional), ``question``, ``chosen``, ``rejected`` (Intel's orca_dpo_pairs);
* ``*.argilla``: ``instruction``, ``chosen_response``, ``rejected_response``;
* ``*.ultra``: ``prompt``, ``chosen`` and ``rejected`` as message lists (UltraFeedback);
* ``*.prompt_pairs``: ``system`` (optional), ``prompt``, ``chosen``, ``rejected``;
* ``chat_template.default``: the prompt's messages in ``field_messages``, each answer in ``field_chosen`` /
  ``field_rejected`` as text, a message or a message list (its last message is the answer);
* ``user_defined.default``: ``field_prompt``, ``field_system``, ``field_chosen``, ``field_rejected``;
* ``*.argilla_chat``: ``chosen`` and ``rejected`` are conversations; the first user message is the prompt and the
  message after it each answer (Argilla's dpo-mix sets, read as Axolotl reads them);
* ``chat_template.argilla`` and ``chat_template.argilla_chat`` (rendered with the run's template): ``chosen`` and
  ``rejected`` are whole
  conversations (user, assistant, user, ...) whose last messages are the answers; the prompt is the chosen
  conversation before its last answer, after ``system`` (optional), with ``prompt`` (when given) as its last user
  message, as Argilla's UltraFeedback sets write it.

KTO rows (Axolotl's ``kto`` strategies) hold ``completion`` and ``label`` (true: desirable) after a prompt read
as above: ``*.argilla`` (``system``, ``instruction``), ``*.intel`` (``system``, ``question``), ``*.prompt_pairs``
and ``*.ultra`` (``system``, ``prompt``), ``*.argilla_chat`` (``completion`` is the conversation: the user's
message, then the assistant's answer), ``user_defined.default`` (``field_prompt``, ``field_system``,
``field_completion``, ``field_label``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from axlora.config.preference_keys import PreferenceDatasetConfig
from axlora.data.chat_messages import DEFAULT_ROLES, content_text
from axlora.data.segments import RowFormatError

Message = dict[str, str]


@dataclass(frozen=True)
class PreferenceExample:
    """One row: the prompt as messages, and the answers it is judged by (KTO: ``chosen`` is the completion,
    ``rejected`` is None and ``desirable`` its label)."""

    prompt: list[Message]
    chosen: str
    rejected: str | None = None
    desirable: bool = True


def _text(row: Mapping[str, Any], field: str) -> str:
    if row.get(field) is None:
        raise RowFormatError(field, f"missing field '{field}'")
    return content_text(row[field], field)


def _prompt(row: Mapping[str, Any], system_field: str, field: str) -> list[Message]:
    messages = [{"role": "user", "content": _text(row, field)}]
    system = row.get(system_field)
    if isinstance(system, str) and system:
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _answer(value: Any, field: str, content_key: str = "content") -> str:
    """An answer given as text, a message, or a message list whose last message is the answer."""
    if value is None:
        raise RowFormatError(field, f"missing field '{field}'")
    if isinstance(value, list):
        if not value:
            raise RowFormatError(field, f"field '{field}' is an empty message list")
        return _answer(value[-1], f"{field}[{len(value) - 1}]", content_key)
    if isinstance(value, Mapping):
        return content_text(value.get(content_key), f"{field}.{content_key}")
    return content_text(value, field)


def _label(row: Mapping[str, Any], field: str) -> bool:
    value = row.get(field)
    if not isinstance(value, bool):
        raise RowFormatError(field, f"field '{field}' must be true (desirable) or false (undesirable), got {value!r}")
    return value


def _ultra_prompt(row: Mapping[str, Any]) -> list[Message]:
    return [{"role": "user", "content": _text(row, "prompt")}]


def _messages(dataset: PreferenceDatasetConfig) -> Callable[[Mapping[str, Any]], list[Message]]:
    """chat_template.default's prompt: a message list read with the dataset's mappings and role names."""
    mappings = dict(dataset.message_property_mappings or {})
    role_key, content_key = mappings.get("role", "role"), mappings.get("content", "content")
    aliases = {source: target for target, sources in (dataset.roles or DEFAULT_ROLES).items() for source in sources}

    def read(row: Mapping[str, Any]) -> list[Message]:
        raw = row.get(dataset.field_messages)
        if not isinstance(raw, list) or not raw:
            raise RowFormatError(dataset.field_messages,
                                 f"field '{dataset.field_messages}' must be a non-empty list of messages (the prompt)")
        messages = []
        for index, message in enumerate(raw):
            where = f"{dataset.field_messages}[{index}]"
            if not isinstance(message, Mapping) or not isinstance(message.get(role_key), str):
                raise RowFormatError(where, f"{where} must be a mapping with '{role_key}' and '{content_key}'")
            role = message[role_key]
            messages.append({"role": aliases.get(role, role),
                             "content": content_text(message.get(content_key), f"{where}.{content_key}")})
        return messages

    return read


def _conversation(row: Mapping[str, Any], field: str) -> list[Mapping[str, Any]]:
    """An argilla conversation: user and assistant messages in turn, ending with the assistant's answer."""
    value = row.get(field)
    if not isinstance(value, list) or not value or len(value) % 2 or not all(isinstance(m, Mapping) for m in value):
        raise RowFormatError(field, f"field '{field}' must be a conversation: user and assistant messages in turn, "
                                    "ending with the assistant's answer")
    return value


def _argilla_conversations(row: Mapping[str, Any]) -> PreferenceExample:
    chosen, rejected = _conversation(row, "chosen"), _conversation(row, "rejected")
    prompt = [{"role": "user" if index % 2 == 0 else "assistant",
               "content": content_text(message.get("content"), f"chosen[{index}].content")}
              for index, message in enumerate(chosen[:-1])]
    if row.get("prompt") is not None:
        prompt[-1]["content"] = content_text(row["prompt"], "prompt")
    system = row.get("system")
    if isinstance(system, str) and system:
        prompt.insert(0, {"role": "system", "content": system})
    return PreferenceExample(prompt, _answer(chosen, "chosen"), _answer(rejected, "rejected"))


def _argilla_first_exchange(row: Mapping[str, Any]) -> PreferenceExample:
    """``chatml/llama3.argilla_chat``, as Axolotl reads them: the first user message and each first answer."""
    chosen, rejected = _chat_pair(row, "chosen"), _chat_pair(row, "rejected")
    prompt = [{"role": "user", "content": content_text(chosen[0].get("content"), "chosen[0].content")}]
    return PreferenceExample(prompt, _answer(chosen[1], "chosen[1]"), _answer(rejected[1], "rejected[1]"))


def _chat_pair(row: Mapping[str, Any], field: str) -> list[Mapping[str, Any]]:
    value = row.get(field)
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(m, Mapping) for m in value[:2]):
        raise RowFormatError(field, f"field '{field}' must be a list of messages: the user's, then the assistant's")
    return value


def pair_reader(dataset: PreferenceDatasetConfig) -> Callable[[Mapping[str, Any]], PreferenceExample]:
    """The reader of a chosen / rejected pair for the dataset's type."""
    kind = dataset.type.split(".", 1)[1]
    if dataset.type in ("chat_template.argilla", "chat_template.argilla_chat"):
        return _argilla_conversations
    if kind == "argilla_chat":
        return _argilla_first_exchange
    if dataset.type == "chat_template.default":
        prompt = _messages(dataset)
        content_key = (dataset.message_property_mappings or {}).get("content", "content")
        return lambda row: PreferenceExample(prompt(row), _answer(row.get(dataset.field_chosen), dataset.field_chosen,
                                             content_key),
                                             _answer(row.get(dataset.field_rejected), dataset.field_rejected, content_key))
    fields = {
        "intel": (lambda row: _prompt(row, "system", "question"), "chosen", "rejected"),
        "argilla": (lambda row: _prompt(row, "system", "instruction"), "chosen_response", "rejected_response"),
        "ultra": (_ultra_prompt, "chosen", "rejected"),
        "prompt_pairs": (lambda row: _prompt(row, "system", "prompt"), "chosen", "rejected"),
        "default": (lambda row: _prompt(row, dataset.field_system, dataset.field_prompt), dataset.field_chosen,
                    dataset.field_rejected),
    }
    prompt, chosen, rejected = fields[kind]
    return lambda row: PreferenceExample(prompt(row), _answer(row.get(chosen), chosen),
                                         _answer(row.get(rejected), rejected))


def _chat_completion(row: Mapping[str, Any], field: str) -> list[Message]:
    """argilla_chat: ``completion`` holds the conversation, the user's message then the assistant's."""
    value = _chat_pair(row, field)
    return [{"role": "user", "content": content_text(value[0].get("content"), f"{field}[0].content")}]


def kto_reader(dataset: PreferenceDatasetConfig) -> Callable[[Mapping[str, Any]], PreferenceExample]:
    """The reader of a KTO row (prompt, completion, label) for the dataset's type."""
    kind = dataset.type.split(".", 1)[1]
    fields = {
        "argilla": (lambda row: _prompt(row, "system", "instruction"), "completion", "label"),
        "argilla_chat": (lambda row: _chat_completion(row, "completion"), "completion", "label"),
        "intel": (lambda row: _prompt(row, "system", "question"), "completion", "label"),
        "prompt_pairs": (lambda row: _prompt(row, "system", "prompt"), "completion", "label"),
        "ultra": (lambda row: _prompt(row, "system", "prompt"), "completion", "label"),
        "default": (lambda row: _prompt(row, dataset.field_system, dataset.field_prompt), dataset.field_completion,
                    dataset.field_label),
    }
    prompt, completion, label = fields[kind]
    return lambda row: PreferenceExample(prompt(row), _answer(row.get(completion), completion),
                                         desirable=_label(row, label))

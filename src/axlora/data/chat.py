"""Chat rows (``chat_template`` and ``sharegpt``): messages rendered by a chat template, trained per role.

How the trained tokens are found. The conversation is rendered twice with the same template: as it is,
and with every message's content replaced by a sentinel (``\\ue000<i>\\ue001``, private-use characters no
real text holds). The sentinel rendering is the template's scaffolding with holes; walking it against the
real rendering gives each message's content span exactly, even when a short answer ("A", "user") also
appears in a role header. Templates that ``trim`` content are handled; a template that rewrites content
(e.g. drops reasoning from earlier turns) falls back to searching each content in order.

The spans become ``Segment``s over the rendered text, and the format asks ``tokenize`` to tokenize the
whole text once and mask by character offsets: the ids are exactly those of ``apply_chat_template``.

Worked example (chatml, roles_to_train [assistant], train_on_eos turn)::

    <|im_start|>user\\n2+2?<|im_end|>\\n<|im_start|>assistant\\n4<|im_end|>\\n
    '-------------- masked ---------------------------------' '-trained-' masked

The end-of-turn marker after a trained turn is trained too, so the model learns to stop. Markers are the
tokenizer's EOS, the built-in template's marker, and the tokenizer's special tokens named like an end
(``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``, ``</s>``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from axlora.data.segments import PromptEntry, RawRecord, RowFormat, RowFormatError, Segment
from axlora.data.template_choice import ChatTemplate

DEFAULT_ROLES: dict[str, list[str]] = {
    "user": ["human", "user"],
    "assistant": ["gpt", "assistant"],
    "system": ["system"],
    "tool": ["tool"],
}
"""Axolotl's default ``roles``: the role names in the data that each template role takes."""

_SENTINEL = "\ue000{}\ue001"
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")
_END_LIKE = re.compile(r"end|eot|eom|^</", re.IGNORECASE)
_HEADER_LIKE = re.compile(r"header|start", re.IGNORECASE)  # <|end_header_id|> opens a turn's text


def chat_format(
    name: str,
    template: ChatTemplate,
    tokenizer,
    *,
    field_messages: str,
    property_mappings: Mapping[str, str],
    roles: Mapping[str, Sequence[str]],
    roles_to_train: Sequence[str],
    train_on_eos: str,
    message_field_training: str | None,
) -> RowFormat:
    """The ``RowFormat`` of a chat dataset with these (Axolotl-named) settings."""
    aliases = {source: target for target, sources in roles.items() for source in sources}
    messages_of = _MessageReader(field_messages, dict(property_mappings), aliases, message_field_training)
    markers = end_of_turn_markers(tokenizer, template)
    train_roles = frozenset(roles_to_train)

    def render(conversations: list[list[dict[str, Any]]], generation_prompt: bool = False) -> list[str]:
        try:
            return tokenizer.apply_chat_template(
                conversations, chat_template=template.text, tokenize=False,
                add_generation_prompt=generation_prompt,
            )
        except Exception as exc:  # jinja raises TemplateError, UndefinedError, TypeError...
            raise RowFormatError(field_messages, f"{template.source} failed: {type(exc).__name__}: {exc}") from None

    def segments(row: RawRecord) -> list[Segment]:
        messages, train_flags = messages_of(row)
        contents = [m["content"] for m in messages]
        skeleton_messages = [{**m, "content": _SENTINEL.format(i)} for i, m in enumerate(messages)]
        rendered, skeleton = render([messages, skeleton_messages])
        spans = content_spans(rendered, skeleton, contents) or _search_spans(rendered, contents)
        trainable = [flag if flag is not None else m["role"] in train_roles for m, flag in zip(messages, train_flags, strict=True)]
        for index, (span, train) in enumerate(zip(spans, trainable, strict=True)):
            if span is None and train and contents[index]:
                raise RowFormatError(
                    f"{field_messages}[{index}].content",
                    f"{template.source} does not render the content of message {index} as written, so its "
                    "tokens cannot be found",
                )
        ranges = _trained_ranges(rendered, spans, trainable, markers, train_on_eos)
        return _split(rendered, ranges)

    def prompt(entry: PromptEntry) -> str:
        if isinstance(entry, str):
            messages = [{"role": "user", "content": entry}]
        elif field_messages in entry:
            messages = messages_of(entry)[0]
        else:
            messages = [{"role": "user", **dict(entry)}]
        return render([messages], generation_prompt=True)[0]

    return RowFormat(
        name=name, segments=segments, prompt=prompt, whole_text=True,
        settings={"template": template.text, "end_of_turn": sorted(markers)},
    )


class _MessageReader:
    """A row's messages with Axolotl's property mappings and role names applied, checked field by field."""

    def __init__(self, field: str, mappings: dict[str, str], aliases: dict[str, str], training_key: str | None):
        self.field = field
        self.role_key = mappings.get("role", "role")
        self.content_key = mappings.get("content", "content")
        self.renamed = {source: target for target, source in mappings.items()}
        self.aliases = aliases
        self.training_key = training_key

    def __call__(self, row: RawRecord) -> tuple[list[dict[str, Any]], list[bool | None]]:
        raw = row.get(self.field)
        if raw is None:
            raise RowFormatError(self.field, f"missing field '{self.field}' (the list of messages)")
        if not isinstance(raw, list) or not raw:
            raise RowFormatError(self.field, f"field '{self.field}' must be a non-empty list of messages")
        messages, flags = [], []
        for index, message in enumerate(raw):
            where = f"{self.field}[{index}]"
            if not isinstance(message, Mapping):
                raise RowFormatError(where, f"{where} must be a mapping with '{self.role_key}' and '{self.content_key}'")
            role, content = message.get(self.role_key), message.get(self.content_key)
            if not isinstance(role, str):
                raise RowFormatError(f"{where}.{self.role_key}", f"{where} has no text field '{self.role_key}' (the role)")
            if content is None:
                content = ""
            if not isinstance(content, str):
                raise RowFormatError(
                    f"{where}.{self.content_key}", f"{where}.{self.content_key} must be text, got {type(content).__name__}"
                )
            out = {self.renamed.get(k, k): v for k, v in message.items() if v is not None}
            out["role"] = self.aliases.get(role, role)
            out["content"] = content
            flag = message.get(self.training_key) if self.training_key else None
            flags.append(flag if isinstance(flag, bool) else None)
            messages.append(out)
        return messages, flags


def end_of_turn_markers(tokenizer, template: ChatTemplate) -> set[str]:
    """Texts that end a turn: EOS, the built-in template's marker, and end-like special tokens."""
    markers = {token for token in (tokenizer.eos_token, template.end_of_turn) if token}
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if token.special and _END_LIKE.search(token.content) and not _HEADER_LIKE.search(token.content):
            markers.add(token.content)
    return markers


def content_spans(rendered: str, skeleton: str, contents: Sequence[str]) -> list[tuple[int, int] | None] | None:
    """Each message's content span in ``rendered``, walking the sentinel ``skeleton``; None if they disagree."""
    parts = _SENTINEL_RE.split(skeleton)
    spans: list[tuple[int, int] | None] = [None] * len(contents)
    pos = 0
    for k in range(0, len(parts) - 1, 2):
        scaffold, index = parts[k], int(parts[k + 1])
        if not rendered.startswith(scaffold, pos) or index >= len(contents) or spans[index] is not None:
            return None
        pos += len(scaffold)
        content = contents[index]
        for candidate in (content, content.strip(), content.rstrip(), content.lstrip()):
            if rendered.startswith(candidate, pos):
                break
        else:
            return None
        spans[index] = (pos, pos + len(candidate))
        pos += len(candidate)
    return spans if rendered[pos:] == parts[-1] else None


def _search_spans(rendered: str, contents: Sequence[str]) -> list[tuple[int, int] | None]:
    """Fallback: find each content (or its stripped form) after the previous one."""
    spans: list[tuple[int, int] | None] = []
    cursor = 0
    for content in contents:
        found = None
        for candidate in (content, content.strip()):
            if candidate:
                at = rendered.find(candidate, cursor)
                if at >= 0:
                    found = (at, at + len(candidate))
                    break
        spans.append(found)
        if found:
            cursor = found[1]
    return spans


def _marker_end(rendered: str, pos: int, markers: set[str]) -> int | None:
    """End of an end-of-turn marker at ``pos`` (after spaces or newlines), or None."""
    start = pos
    while start < len(rendered) and rendered[start] in " \n":
        start += 1
    for marker in sorted(markers, key=len, reverse=True):
        if rendered.startswith(marker, start):
            return start + len(marker)
    return None


def _trained_ranges(
    rendered: str,
    spans: Sequence[tuple[int, int] | None],
    trainable: Sequence[bool],
    markers: set[str],
    train_on_eos: str,
) -> list[tuple[int, int]]:
    """Character ranges to train: trained contents, plus the end-of-turn markers ``train_on_eos`` picks."""
    rendered_indices = [i for i, span in enumerate(spans) if span is not None]
    last = max(rendered_indices, key=lambda i: spans[i][0]) if rendered_indices else None
    ranges = []
    for index in rendered_indices:
        start, end = spans[index]
        if trainable[index]:
            ranges.append((start, end))
        marker_end = _marker_end(rendered, end, markers)
        if marker_end is None:
            continue
        if (
            (train_on_eos == "turn" and trainable[index])
            or train_on_eos == "all"
            or (train_on_eos == "last" and index == last)
        ):
            ranges.append((end, marker_end))
    return sorted(ranges)


def _split(text: str, ranges: Sequence[tuple[int, int]]) -> list[Segment]:
    """``text`` as alternating masked/trained segments (adjacent ranges merged, empty pieces dropped)."""
    segments: list[Segment] = []
    pos = 0

    def add(piece: str, trainable: bool) -> None:
        if not piece:
            return
        if segments and segments[-1].trainable == trainable:
            segments[-1] = Segment(segments[-1].text + piece, trainable)
        else:
            segments.append(Segment(piece, trainable))

    for start, end in ranges:
        start = max(start, pos)
        add(text[pos:start], False)
        add(text[start:end], True)
        pos = max(pos, end)
    add(text[pos:], False)
    return segments

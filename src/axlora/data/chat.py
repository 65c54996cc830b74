"""Chat rows (``chat_template`` and ``sharegpt``): messages rendered by a chat template, trained per role.

How the trained tokens are found. The conversation is rendered twice with the same template: as it is,
and with every message's content (and reasoning) replaced by a sentinel (``\\ue000<i>\\ue001``, private-use
characters no real text holds). The sentinel rendering is the template's scaffolding with holes; walking it against the
real rendering gives each message's content span exactly, even when a short answer ("A", "user") also
appears in a role header. Templates that ``trim`` content are handled; a template that rewrites content
(e.g. drops reasoning from earlier turns) falls back to searching each content in order.

The spans become ``Segment``s over the rendered text, and the format asks ``tokenize`` to tokenize the
whole text once and mask by character offsets: the ids are exactly those of ``apply_chat_template``.

Worked example (chatml, roles_to_train [assistant], train_on_eos turn)::

    <|im_start|>user\\n2+2?<|im_end|>\\n<|im_start|>assistant\\n4<|im_end|>\\n
    '-------------- masked ---------------------------------' '-trained-' masked

A trained turn is its reasoning and content (and, for a turn with tool calls, the calls up to its
end-of-turn marker). The end-of-turn marker after a trained turn is trained too, so the model learns to
stop. Markers are the tokenizer's EOS and ``eot_tokens`` when set; else EOS, the template's marker, and the
tokenizer's special tokens named like an end (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``</s>``).
A trained-role turn with nothing in it is not trained (it would teach a bare end marker) and is counted.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from axlora.data.chat_messages import THINKING_PAIRS, Conversation, MessageSettings, read_conversation
from axlora.data.segments import FormattedRow, PromptEntry, RawRecord, RowFormat, RowFormatError, Segment
from axlora.data.template_choice import ChatTemplate

_SENTINEL = "\ue000{}\ue001"
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")
_END_LIKE = re.compile(r"end|eot|eom|^</", re.IGNORECASE)
_HEADER_LIKE = re.compile(r"header|start", re.IGNORECASE)  # <|end_header_id|> opens a turn's text


@dataclass(frozen=True)
class TurnEnds:
    """Which end-of-turn markers are trained: ``train_on_eos`` for the EOS token, ``train_on_eot`` for the rest."""

    eos: str | None
    markers: frozenset[str]
    train_on_eos: str
    train_on_eot: str

    def rule(self, marker: str) -> str:
        return self.train_on_eos if marker == self.eos else self.train_on_eot


def chat_format(
    name: str,
    template: ChatTemplate,
    tokenizer,
    settings: MessageSettings,
    roles_to_train: Sequence[str],
    ends: TurnEnds,
    template_kwargs: Mapping[str, Any] | None = None,
    warnings: tuple[str, ...] = (),
) -> RowFormat:
    """The ``RowFormat`` of a chat dataset with these (Axolotl-named) settings."""
    train_roles = frozenset(settings.role(role) for role in roles_to_train)
    extra = dict(template_kwargs or {})

    def render(conversations: list[list[dict[str, Any]]], tools, generation_prompt: bool = False) -> list[str]:
        try:
            return tokenizer.apply_chat_template(
                conversations, chat_template=template.text, tokenize=False, tools=tools,
                add_generation_prompt=generation_prompt, **extra,
            )
        except Exception as exc:  # jinja raises TemplateError, UndefinedError, TypeError...
            raise RowFormatError(settings.field_messages, f"{template.source} failed: {type(exc).__name__}: {exc}") from None

    def segments(row: RawRecord) -> FormattedRow:
        conversation = read_conversation(row, settings)
        trainable, empty_turns = _trainable(conversation, train_roles, settings.thinking_key)
        texts = _part_texts(conversation.messages, settings.thinking_key)
        skeleton_messages = _with_sentinels(conversation.messages, settings.thinking_key)
        rendered, skeleton = render([conversation.messages, skeleton_messages], conversation.tools)
        spans = content_spans(rendered, skeleton, texts) or _search_spans(rendered, texts)
        for index, train in enumerate(trainable):
            if train and spans[2 * index] is None and texts[2 * index]:
                raise RowFormatError(
                    f"{settings.field_messages}[{index}].content",
                    f"{template.source} does not render the content of message {index} as written, so its "
                    "tokens cannot be found",
                )
        turns = _turn_spans(rendered, spans)
        for index, message in enumerate(conversation.messages):
            if trainable[index] and message.get("tool_calls"):
                turns[index] = _with_calls(turns[index], _call_span(render, conversation, index, rendered))
        return FormattedRow(_split(rendered, _trained_ranges(rendered, turns, trainable, ends)), empty_turns)

    def prompt(entry: PromptEntry) -> str:
        tools = None
        if isinstance(entry, str):
            messages = [{"role": "user", "content": entry}]
        elif settings.field_messages in entry:
            conversation = read_conversation(entry, settings)
            messages, tools = conversation.messages, conversation.tools
        else:
            messages = [{"role": "user", **dict(entry)}]
        return render([messages], tools, generation_prompt=True)[0]

    return RowFormat(
        name=name, segments=segments, prompt=prompt, whole_text=True, warnings=warnings,
        settings={"template": template.text, "end_of_turn": sorted(ends.markers), "kwargs": extra},
    )


def _trainable(conversation: Conversation, train_roles: frozenset[str], thinking_key: str) -> tuple[list[bool], int]:
    """Which messages are trained, and how many trained-role turns were left out for having nothing in them."""
    trainable, empty = [], 0
    for message, flag in zip(conversation.messages, conversation.train_flags, strict=True):
        train = flag if flag is not None else message["role"] in train_roles
        if train and not message["content"].strip() and not message.get("tool_calls") and not message.get(thinking_key):
            train, empty = False, empty + 1  # an empty answer would train a bare end-of-turn marker
        trainable.append(train)
    return trainable, empty


def _part_texts(messages: Sequence[dict[str, Any]], thinking_key: str) -> list[str]:
    """Every message's content (part 2i) and reasoning (part 2i+1, empty when it has none)."""
    texts = []
    for message in messages:
        texts += [message["content"], message.get(thinking_key) or ""]
    return texts


def _with_sentinels(messages: Sequence[dict[str, Any]], thinking_key: str) -> list[dict[str, Any]]:
    out = []
    for index, message in enumerate(messages):
        # an empty content stays empty: templates test it (qwen writes no newline before a bare tool call)
        marked = {**message, "content": _SENTINEL.format(2 * index) if message["content"] else ""}
        if message.get(thinking_key):
            marked[thinking_key] = _SENTINEL.format(2 * index + 1)
        out.append(marked)
    return out


def end_of_turn_markers(tokenizer, template: ChatTemplate, eot_tokens: Sequence[str] | None = None) -> set[str]:
    """Texts that end a turn: EOS and ``eot_tokens`` when given; else EOS, the template's marker and the
    tokenizer's end-like special tokens."""
    if eot_tokens is not None:
        return {token for token in (tokenizer.eos_token, *eot_tokens) if token}
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


def _search_spans(rendered: str, texts: Sequence[str]) -> list[tuple[int, int] | None]:
    """Fallback: find each message's reasoning, then its content (or their stripped forms), in order."""
    spans: list[tuple[int, int] | None] = [None] * len(texts)
    cursor = 0
    order = [i + offset for i in range(0, len(texts), 2) for offset in (1, 0)]
    for index in order:
        for candidate in (texts[index], texts[index].strip()):
            at = rendered.find(candidate, cursor) if candidate else -1
            if at >= 0:
                spans[index] = (at, at + len(candidate))
                cursor = at + len(candidate)
                break
    return spans


def _turn_spans(rendered: str, spans: Sequence[tuple[int, int] | None]) -> list[tuple[int, int] | None]:
    """Each message's trainable text: from its reasoning or content to the end of both (reasoning's opening tag
    included)."""
    turns: list[tuple[int, int] | None] = []
    for index in range(0, len(spans), 2):
        parts = [span for span in spans[index:index + 2] if span is not None]
        if not parts:
            turns.append(None)
            continue
        start, end = min(p[0] for p in parts), max(p[1] for p in parts)
        if spans[index + 1] is not None:
            opener = next((o for o, _ in THINKING_PAIRS if rendered[:start].rstrip("\n").endswith(o)), None)
            start = rendered.rindex(opener, 0, start) if opener else start
        turns.append((start, end))
    return turns


def _call_span(render, conversation: Conversation, index: int, rendered: str) -> tuple[int, int] | None:
    """Where message ``index``'s tool calls are written: what differs from the rendering without them.

    The first difference is moved back to a line or tag boundary, so a shared first character ("<" of
    ``<tool_call>`` and of ``<|im_end|>``) does not cut the first token of the calls.
    """
    without = list(conversation.messages)
    without[index] = {k: v for k, v in without[index].items() if k != "tool_calls"}
    other = render([without], conversation.tools)[0]
    start = len(os.path.commonprefix([rendered, other]))
    while start > 0 and rendered[start - 1] not in "\n >}]":
        start -= 1
    suffix = len(os.path.commonprefix([rendered[::-1], other[::-1]]))
    end = max(len(rendered) - suffix, start)
    return (start, end) if end > start else None


def _with_calls(turn: tuple[int, int] | None, calls: tuple[int, int] | None) -> tuple[int, int] | None:
    if calls is None or turn is None:
        return turn or calls
    return min(turn[0], calls[0]), max(turn[1], calls[1])


def _marker_after(rendered: str, pos: int, markers: frozenset[str]) -> tuple[str, int] | None:
    """The end-of-turn marker at ``pos`` (after spaces or newlines) and where it ends, or None."""
    start = pos
    while start < len(rendered) and rendered[start] in " \n":
        start += 1
    for marker in sorted(markers, key=len, reverse=True):
        if rendered.startswith(marker, start):
            return marker, start + len(marker)
    return None


def _trained_ranges(
    rendered: str, turns: Sequence[tuple[int, int] | None], trainable: Sequence[bool], ends: TurnEnds
) -> list[tuple[int, int]]:
    """Character ranges to train: trained turns, plus the end-of-turn markers ``train_on_eos``/``_eot`` pick."""
    rendered_indices = [i for i, span in enumerate(turns) if span is not None]
    last = max(rendered_indices, key=lambda i: turns[i][0]) if rendered_indices else None
    ranges = []
    for index in rendered_indices:
        start, end = turns[index]
        if trainable[index]:
            ranges.append((start, end))
        found = _marker_after(rendered, end, ends.markers)
        if found is None:
            continue
        rule = ends.rule(found[0])
        if (rule == "turn" and trainable[index]) or rule == "all" or (rule == "last" and index == last):
            ranges.append((end, found[1]))
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

"""How a dataset's ``chat_template`` setting picks the template it renders with (the names: ``config.chat_templates``)."""

from __future__ import annotations

from dataclasses import dataclass

from axlora.config.chat_templates import BUILTIN_END_OF_TURN, BUILTIN_TEMPLATES, FALLBACK_PREFIX, is_jinja


@dataclass(frozen=True)
class ChatTemplate:
    """The template a dataset renders with, where it came from (for messages), and its end-of-turn marker."""

    text: str
    source: str
    end_of_turn: str | None = None


class TemplateChoiceError(ValueError):
    """The setting names no usable template; ``formats`` turns it into a ``UserError`` naming the dataset."""


def choose_template(
    setting: str | None,
    jinja_text: str | None,
    tokenizer_template: str | None,
) -> ChatTemplate:
    """The template for a ``chat_template`` setting (None: the tokenizer's own).

    ``jinja_text`` is the ``chat_template_jinja`` that applies; ``tokenizer_template`` the tokenizer's
    template, or None when it has none.
    """
    if setting is None:
        setting = "jinja" if jinja_text else "tokenizer_default"
    if is_jinja(setting):
        return _given(setting, "the Jinja template in chat_template")
    if setting == "jinja":
        if not jinja_text:
            raise TemplateChoiceError("chat_template: jinja needs the template text in chat_template_jinja")
        return _given(jinja_text, "chat_template_jinja")
    if setting == "tokenizer_default":
        if not tokenizer_template:
            raise TemplateChoiceError(
                "chat_template: the tokenizer has no chat template (tokenizer_default); set chat_template to a "
                "built-in name (chatml, llama3, qwen_25, ...) or give chat_template_jinja"
            )
        return _given(tokenizer_template, "the tokenizer's chat template")
    if setting.startswith(FALLBACK_PREFIX):
        name = setting[len(FALLBACK_PREFIX):]
        if tokenizer_template:
            return _given(tokenizer_template, "the tokenizer's chat template")
        return _builtin(name)
    return _builtin(setting)


def _given(text: str, source: str) -> ChatTemplate:
    """A template given as text: its end-of-turn marker is the first known one it writes (chatml's, ...)."""
    found = [(text.find(marker), marker) for marker in set(BUILTIN_END_OF_TURN.values()) if marker and marker in text]
    return ChatTemplate(text, source, min(found)[1] if found else None)


def _builtin(name: str) -> ChatTemplate:
    if name not in BUILTIN_TEMPLATES:
        raise TemplateChoiceError(
            f"chat_template: unknown template '{name}'; built-in: {', '.join(BUILTIN_TEMPLATES)}"
        )
    return ChatTemplate(BUILTIN_TEMPLATES[name], f"built-in template '{name}'", BUILTIN_END_OF_TURN[name])

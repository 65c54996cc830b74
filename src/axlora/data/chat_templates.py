"""Built-in chat templates and how a dataset's ``chat_template`` setting picks the one it renders with.

Names follow Axolotl's (``chatml``, ``llama3``, ``gemma``, ``phi_3``), plus ``tokenizer_default`` (the
tokenizer's own template), ``tokenizer_default_fallback_<name>`` and ``jinja`` (the template text in
``chat_template_jinja``). A value containing Jinja markup is taken as the template itself.

This module is plain data and string logic: the config schema imports it to check names without
importing transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim "
        "+ '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    "phi_3": (
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}
"""Jinja text of each built-in template (as a tokenizer's ``chat_template`` would hold it)."""

BUILTIN_END_OF_TURN: dict[str, str] = {
    "chatml": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "gemma": "<end_of_turn>",
    "phi_3": "<|end|>",
}
"""The marker that ends a turn in each built-in template: trained with ``train_on_eos`` even when the
tokenizer does not hold it as one special token (then the model learns to write it as text)."""

TEMPLATE_CHOICES: tuple[str, ...] = ("tokenizer_default", "jinja", *BUILTIN_TEMPLATES)
FALLBACK_PREFIX = "tokenizer_default_fallback_"


def is_jinja(value: str) -> bool:
    """Whether a ``chat_template`` value is a template itself rather than a name."""
    return "{{" in value or "{%" in value


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
        return ChatTemplate(setting, "the Jinja template in chat_template")
    if setting == "jinja":
        if not jinja_text:
            raise TemplateChoiceError("chat_template: jinja needs the template text in chat_template_jinja")
        return ChatTemplate(jinja_text, "chat_template_jinja")
    if setting == "tokenizer_default":
        if not tokenizer_template:
            raise TemplateChoiceError(
                "chat_template: the tokenizer has no chat template (tokenizer_default); set chat_template to a "
                f"built-in ({', '.join(BUILTIN_TEMPLATES)}) or give chat_template_jinja"
            )
        return ChatTemplate(tokenizer_template, "the tokenizer's chat template")
    if setting.startswith(FALLBACK_PREFIX):
        name = setting[len(FALLBACK_PREFIX):]
        if tokenizer_template:
            return ChatTemplate(tokenizer_template, "the tokenizer's chat template")
        return _builtin(name)
    return _builtin(setting)


def _builtin(name: str) -> ChatTemplate:
    if name not in BUILTIN_TEMPLATES:
        raise TemplateChoiceError(
            f"chat_template: unknown template '{name}'; built-in: {', '.join(BUILTIN_TEMPLATES)}"
        )
    return ChatTemplate(BUILTIN_TEMPLATES[name], f"built-in template '{name}'", BUILTIN_END_OF_TURN[name])

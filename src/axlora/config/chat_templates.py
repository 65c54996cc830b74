"""The chat templates a config may name, and the Jinja text a config gives itself.

Names follow Axolotl's (``chatml``, ``llama3``, ``gemma``, ``phi_3``), plus ``tokenizer_default`` (the
tokenizer's own template), ``tokenizer_default_fallback_<name>`` and ``jinja`` (the template text in
``chat_template_jinja``). A value containing Jinja markup is taken as the template itself. Plain data and
string logic: the schema checks names with it, ``data`` renders with it, ``model`` saves it with the tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from axlora.config.chat_template_catalog import CATALOG
from axlora.core.errors import UserError

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
    **{name: text for name, (text, _) in CATALOG.items()},
}
"""Jinja text of each built-in template (as a tokenizer's ``chat_template`` would hold it)."""

BUILTIN_END_OF_TURN: dict[str, str | None] = {
    "chatml": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "gemma": "<end_of_turn>",
    "phi_3": "<|end|>",
    **{name: marker for name, (_, marker) in CATALOG.items()},
}
"""The marker that ends a turn in each built-in template (None: the EOS token): trained with ``train_on_eos``
even when the tokenizer does not hold it as one special token (then the model learns to write it as text)."""

TEMPLATE_CHOICES: tuple[str, ...] = ("tokenizer_default", "jinja", *BUILTIN_TEMPLATES)
FALLBACK_PREFIX = "tokenizer_default_fallback_"


def is_jinja(value: str) -> bool:
    """Whether a ``chat_template`` value is a template itself rather than a name."""
    return "{{" in value or "{%" in value


def looks_like_template_file(value: str) -> bool:
    """``chat_template_jinja`` holds the template itself, or (as in Axolotl) the path of a .jinja file."""
    return "\n" not in value and "{" not in value and value.endswith((".jinja", ".j2"))


def read_jinja_setting(value: str | None) -> str | None:
    """The Jinja text of a ``chat_template_jinja`` value (read from the file when it names one), or None."""
    if value is None:
        return None
    if looks_like_template_file(value):
        path = Path(value)
        if not path.is_file():
            raise UserError(f"chat_template_jinja: template file '{value}' not found.")
        return path.read_text(encoding="utf-8")
    return value

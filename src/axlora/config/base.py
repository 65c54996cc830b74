"""What every config section shares: the strict base model, and the check of a ``chat_template`` name.

``chat_template`` is both a top-level key and a key of each dataset, so its check lives here, where both
section modules can use it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from axlora.config.chat_templates import TEMPLATE_CHOICES, is_jinja
from axlora.core.suggest import did_you_mean


def known_chat_template(value: str | None) -> str | None:
    """A chat_template value: a Jinja string passes; a name must be one axlora knows."""
    if value is None or is_jinja(value):
        return value
    name = value.removeprefix("tokenizer_default_fallback_")
    if name not in TEMPLATE_CHOICES:
        raise ValueError(f"unknown chat template '{value}'{did_you_mean(name, TEMPLATE_CHOICES)}")
    return value


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors and defaults are validated too."""

    model_config = ConfigDict(extra="forbid", validate_default=True, use_attribute_docstrings=False)


def block_switch(value: Any) -> Any:
    """A settings block also written as a switch (as Axolotl's plugins set it): ``true`` is the block with its
    defaults, ``false`` is off."""
    if value is True:
        return {}
    return None if value is False else value

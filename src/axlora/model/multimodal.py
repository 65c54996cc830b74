"""Text-only training of a multimodal class (``model_type: Llama4ForConditionalGeneration``), as Axolotl's Llama 4
configs ask: the checkpoint loads through the class it was saved with, and the language model trains on text.

The vision tower and its projector are never reached by text rows: they stay frozen and get no LoRA
(``lora_exclusions``), so the adapter holds the language model's layers under the class's own names and loads with
plain peft on the same class.
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable

from axlora.config.model_keys import TEXT_TRAINED_MULTIMODAL
from axlora.core.errors import UserError


def lora_exclusions(model_type: str | None) -> str | None:
    """peft's ``exclude_modules`` for the class: a pattern of every module inside its image-only parts."""
    parts = TEXT_TRAINED_MULTIMODAL.get(model_type or "")
    if not parts:
        return None
    return rf"(.*\.)?({'|'.join(re.escape(part) for part in parts)})(\..*)?"


def train_text_only(model, model_type: str | None, log: Callable[[str], None]) -> None:
    """Freeze the image-only parts and route text-only calls straight to the language model.

    The class's own forward passes text through the same language model, but transformers 5.2x's version then reads
    an ``image_outputs`` field its language model's output does not have, and fails on every call; a text batch
    needs nothing else from it, so the model instance forwards such calls to ``language_model`` (loss included).
    """
    parts = TEXT_TRAINED_MULTIMODAL.get(model_type or "")
    if not parts:
        return
    for part in parts:
        for weight in model.get_submodule(part).parameters():
            weight.requires_grad_(False)
    model.forward = types.MethodType(_text_forward, model)
    log(f"model: {model_type}: training its language model on text; {' and '.join(parts)} stay frozen and unused")


def _text_forward(self, input_ids=None, pixel_values=None, **kwargs):
    if pixel_values is not None:
        raise UserError("model_type: axlora trains the language model of a multimodal class on text only; this "
                        "batch holds images (pixel_values).")
    kwargs.pop("mm_encoder_outputs", None)
    return self.language_model(input_ids=input_ids, **kwargs)

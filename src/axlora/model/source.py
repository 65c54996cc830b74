"""Where the base model and its tokenizer come from: the name ``base_model`` resolves to, and transformers classes.

Both the tokenizer and the model loader start here, so a bad ``base_model`` or class name is refused
with the same message whichever is loaded first.
"""

from __future__ import annotations

from pathlib import Path

from axlora.core.errors import UserError
from axlora.core.names import is_builtin_model
from axlora.model.builtin import resolve_builtin


def resolve_base_model(name: str) -> str:
    """A loadable name or directory for ``base_model`` (built-in demo models are built on first use)."""
    if is_builtin_model(name):
        return str(resolve_builtin(name))
    path = Path(name)
    if path.is_absolute() and not path.exists():
        raise UserError(f"base_model: directory '{name}' not found.")
    if path.is_dir() and not (path / "config.json").exists():
        raise UserError(f"base_model: '{name}' has no config.json; expected a transformers model directory.")
    return name


def transformers_class(name: str, key: str):
    """A class of transformers by name (``AutoTokenizer``, ``LlamaForCausalLM``), or a ``UserError`` naming ``key``."""
    import transformers

    found = getattr(transformers, name, None)
    if found is None or not hasattr(found, "from_pretrained"):
        raise UserError(
            f"{key}: transformers {transformers.__version__} has no class '{name}'; "
            f"use {'AutoTokenizer' if key == 'tokenizer_type' else 'AutoModelForCausalLM'} or a class it provides."
        )
    return found

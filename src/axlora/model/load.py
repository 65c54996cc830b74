"""Base model and tokenizer loading."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from axlora.config.schema import Config
from axlora.demo import is_builtin, resolve_builtin
from axlora.errors import UserError


def resolve_base_model(name: str) -> str:
    """A loadable name or directory for ``base_model`` (built-in demo models are built on first use)."""
    if is_builtin(name):
        return str(resolve_builtin(name))
    path = Path(name)
    if path.is_absolute() and not path.exists():
        raise UserError(f"base_model: directory '{name}' not found.")
    if path.is_dir() and not (path / "config.json").exists():
        raise UserError(f"base_model: '{name}' has no config.json; expected a transformers model directory.")
    return name


def load_tokenizer(config: Config):
    """The run's tokenizer; a missing pad token falls back to EOS (masked out of the loss anyway)."""
    from transformers import AutoTokenizer

    source = config.tokenizer_config or resolve_base_model(config.base_model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code)
    except OSError as exc:
        raise UserError(f"tokenizer: cannot load from '{source}': {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's vocabulary and settings: a changed tokenizer re-prepares the data."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    digest.update(repr((tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)).encode())
    return digest.hexdigest()[:16]


def load_base_model(config: Config, dtype):
    """The base model in ``dtype``, ready for a LoRA."""
    from transformers import AutoModelForCausalLM

    source = resolve_base_model(config.base_model)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=config.trust_remote_code
        )
    except OSError as exc:
        raise UserError(f"base_model: cannot load '{config.base_model}': {exc}") from None
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model

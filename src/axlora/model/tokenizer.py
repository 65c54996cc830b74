"""The run's tokenizer: the base's (or ``tokenizer_config``'s), with the config's tokens and chat template.

Its fingerprint keys the prepared-data cache, so a changed tokenizer re-prepares the data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from axlora.config.chat_templates import FALLBACK_PREFIX, read_jinja_setting
from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.model.source import resolve_base_model, transformers_class

_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


def load_tokenizer(config: Config, log: Callable[[str], None] = print):
    """The run's tokenizer, with the config's special tokens, added tokens and chat template applied.

    A missing pad token falls back to EOS (pads are masked out of the loss anyway).
    """
    source = config.tokenizer_config or resolve_base_model(config.base_model)
    if config.tokenizer_use_mistral_common:
        return _mistral_common_tokenizer(config, source)
    tokenizer_cls = transformers_class(config.tokenizer_type or "AutoTokenizer", "tokenizer_type")
    kwargs: dict = {"trust_remote_code": config.trust_remote_code}
    if config.revision_of_model and not config.tokenizer_config:
        kwargs["revision"] = config.revision_of_model
    if config.tokenizer_use_fast is not None:
        kwargs["use_fast"] = config.tokenizer_use_fast
    if config.tokenizer_legacy is not None:
        kwargs["legacy"] = config.tokenizer_legacy
    try:
        tokenizer = tokenizer_cls.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise UserError(f"tokenizer: cannot load from '{source}': {exc}") from None
    new_tokens = add_configured_tokens(tokenizer, config)
    if new_tokens:
        _require_trainable_embeddings(config, new_tokens)
        log(f"tokenizer: added {len(new_tokens)} new tokens: {', '.join(new_tokens[:8])}"
            + (" ..." if len(new_tokens) > 8 else ""))
    template = configured_chat_template(config)
    if template is not None:
        tokenizer.chat_template = template
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def _mistral_common_tokenizer(config: Config, source: str):
    """``tokenizer_use_mistral_common``: Mistral's tokenizer files read by mistral-common, in its fine-tuning mode
    (conversations may end with the assistant's turn). Its chat format is mistral-common's own."""
    import importlib.util

    if importlib.util.find_spec("mistral_common") is None:
        raise UserError("tokenizer_use_mistral_common: needs the mistral-common package (pip install mistral-common).")
    for key in ("tokens", "special_tokens", "chat_template", "chat_template_jinja", "tokenizer_type"):
        if getattr(config, key):
            raise UserError(f"tokenizer_use_mistral_common / {key}: mistral-common's tokenizer has a fixed vocabulary "
                            f"and chat format; remove {key}.")
    from transformers import MistralCommonBackend

    kwargs = {"revision": config.revision_of_model} if config.revision_of_model and not config.tokenizer_config else {}
    try:
        return MistralCommonBackend.from_pretrained(source, mode="finetuning", **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"tokenizer_use_mistral_common: cannot load Mistral's tokenizer from '{source}': "
                        f"{str(exc).splitlines()[0]}") from None


def add_configured_tokens(tokenizer, config: Config) -> list[str]:
    """Apply ``special_tokens`` and ``tokens``; return the tokens that were new to the vocabulary."""
    vocab = tokenizer.get_vocab()
    wanted: list[str] = []
    special = config.special_tokens
    if special is not None:
        named = {name: getattr(special, name) for name in _SPECIAL_TOKEN_NAMES if getattr(special, name)}
        if named:
            tokenizer.add_special_tokens(named)
            wanted += list(named.values())
        if special.additional_special_tokens:
            tokenizer.add_special_tokens(
                {"extra_special_tokens": list(special.additional_special_tokens)}, replace_extra_special_tokens=False
            )
            wanted += special.additional_special_tokens
    if config.tokens:
        tokenizer.add_tokens(list(config.tokens))
        wanted += config.tokens
    return list(dict.fromkeys(token for token in wanted if token not in vocab))


def _require_trainable_embeddings(config: Config, new_tokens: list[str]) -> None:
    """New tokens get new, untrained embedding rows: a fresh LoRA must train and save them (as Axolotl asks)."""
    if config.lora_model_dir or config.lora_modules_to_save or config.peft_trainable_token_indices:
        return
    raise UserError(
        f"special_tokens / tokens: {len(new_tokens)} token(s) new to the vocabulary ({', '.join(new_tokens[:5])}) "
        "get embedding rows that start untrained: set lora_modules_to_save: [embed_tokens, lm_head] (the names "
        "of the model's input embeddings and output head) so they are trained and saved with the adapter."
    )


def configured_chat_template(config: Config) -> str | None:
    """The chat template the run's tokenizer carries and saves with the adapter, as Axolotl saves it.

    ``chat_template_jinja``, or a built-in named by ``chat_template``; None keeps the tokenizer's own
    (``tokenizer_default``, and the ``tokenizer_default_fallback_*`` names, which the data side resolves).
    """
    from axlora.data.template_choice import TemplateChoiceError, choose_template

    jinja = read_jinja_setting(config.chat_template_jinja)
    setting = config.chat_template
    if setting in (None, "jinja"):
        return jinja
    if setting == "tokenizer_default" or setting.startswith(FALLBACK_PREFIX):
        return None
    try:
        return choose_template(setting, jinja, None).text
    except TemplateChoiceError as exc:
        raise UserError(f"{exc}.") from None


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's vocabulary, settings and chat template: a changed one re-prepares the data."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    digest.update(repr((tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)).encode())
    digest.update(repr(getattr(tokenizer, "chat_template", None)).encode())
    return digest.hexdigest()[:16]

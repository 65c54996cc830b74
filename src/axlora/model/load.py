"""Base model and tokenizer loading: the classes, tokens, attention kernel and quantization a config asks for.

What the machine must provide (a CUDA GPU and bitsandbytes for 4/8-bit weights, the flash-attn package
for flash attention) is checked here, just before the load, and not when the config is validated: a
config validates anywhere, and a run on the wrong machine stops with one message naming the key.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path

from axlora.config.chat_templates import FALLBACK_PREFIX, read_jinja_setting
from axlora.config.schema import ATTENTION_FLAGS, Config
from axlora.core.errors import UserError
from axlora.core.names import is_builtin_model
from axlora.model.builtin import resolve_builtin

_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


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


def load_tokenizer(config: Config, log: Callable[[str], None] = print):
    """The run's tokenizer, with the config's special tokens, added tokens and chat template applied.

    A missing pad token falls back to EOS (pads are masked out of the loss anyway).
    """
    source = config.tokenizer_config or resolve_base_model(config.base_model)
    tokenizer_cls = _transformers_class(config.tokenizer_type or "AutoTokenizer", "tokenizer_type")
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
    from axlora.data.chat_templates import TemplateChoiceError, choose_template

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


def load_base_model(config: Config, dtype, tokenizer=None, log: Callable[[str], None] = print, empty: bool = False):
    """The base model in ``dtype`` (quantized when asked), with embeddings sized for ``tokenizer``, ready for a LoRA.

    ``tokenizer`` is the run's tokenizer (loaded again from the config when not given). ``empty``: the
    structure only, weights on the meta device (another rank loads them and sends them after sharding).
    """
    source = resolve_base_model(config.base_model)
    kwargs = model_load_kwargs(config, dtype, source, log)
    model_cls = _transformers_class(config.model_type or "AutoModelForCausalLM", "model_type")
    try:
        model = _empty_model(model_cls, source, kwargs) if empty else model_cls.from_pretrained(source, **kwargs)
    except OSError as exc:
        raise UserError(f"base_model: cannot load '{config.base_model}': {exc}") from None
    except ImportError as exc:
        raise UserError(f"base_model: loading '{config.base_model}' needs a package that is missing: {exc}") from None
    if tokenizer is None:
        tokenizer = load_tokenizer(config, log=lambda _message: None)
    # new rows of an empty model get their values from the loading rank: nothing to compute them from here
    resize_embeddings(model, len(tokenizer), config, log, mean_resizing=config.mean_resizing_embeddings and not empty)
    if config.quantization_bits():
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs=config.checkpointing_kwargs(),
        )
    elif config.gradient_checkpointing:
        _enable_checkpointing(model, config.checkpointing_kwargs())
    if config.gradient_checkpointing:
        model.config.use_cache = False
    return model


def _empty_model(model_cls, source: str, kwargs: dict):
    """The model built from its config with weights on the meta device; buffers (rotary tables) are real."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    model_config = kwargs.get("config") or AutoConfig.from_pretrained(
        source, trust_remote_code=kwargs["trust_remote_code"],
        **({"revision": kwargs["revision"]} if "revision" in kwargs else {}))
    build = getattr(model_cls, "from_config", None) or model_cls._from_config
    options = {key: kwargs[key] for key in ("dtype", "attn_implementation", "trust_remote_code") if key in kwargs}
    if model_cls.__name__ != "AutoModelForCausalLM":
        options.pop("trust_remote_code", None)
    with init_empty_weights(include_buffers=False):
        model = build(model_config, **options)
    model.tie_weights()  # from_pretrained ties the embeddings; from_config on meta does not
    return model


def _enable_checkpointing(model, kwargs: dict) -> None:
    """transformers 5.2x renamed gradient checkpointing to activation checkpointing; use whichever exists."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def model_load_kwargs(config: Config, dtype, source: str, log: Callable[[str], None] = print) -> dict:
    """``from_pretrained`` arguments for the config; raises ``UserError`` where this machine cannot do what it asks."""
    kwargs: dict = {"dtype": dtype, "trust_remote_code": config.trust_remote_code}
    if config.revision_of_model:
        kwargs["revision"] = config.revision_of_model
    attention = config.attention_implementation()
    if attention is not None:
        require_attention_support(config, attention)
        kwargs["attn_implementation"] = attention
        note = " (xformers_attention runs PyTorch's memory-efficient SDPA kernel)" if config.xformers_attention else ""
        log(f"attention: {attention}{note}")
    bits = config.quantization_bits()
    if bits:
        require_quantization_support(config, bits)
        kwargs["quantization_config"] = bitsandbytes_config(config, bits, dtype)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
        log(f"quantization: base weights in {'4-bit NF4 (double quantization)' if bits == 4 else '8-bit'}, "
            f"compute in {str(dtype).replace('torch.', '')}")
    if config.overrides_of_model_config:
        from transformers import AutoConfig

        kwargs["config"] = AutoConfig.from_pretrained(
            source, trust_remote_code=config.trust_remote_code, **config.overrides_of_model_config,
            **({"revision": config.revision_of_model} if config.revision_of_model else {}),
        )
    return kwargs


def bitsandbytes_config(config: Config, bits: int, compute_dtype):
    """QLoRA's recipe (NF4, double quantization, compute in the run's dtype); ``bnb_config_kwargs`` override it."""
    from transformers import BitsAndBytesConfig

    if bits == 4:
        recipe = {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": compute_dtype,
        }
    else:
        recipe = {"load_in_8bit": True}
    return BitsAndBytesConfig(**{**recipe, **(config.bnb_config_kwargs or {})})


def _quantization_key(config: Config, bits: int) -> str:
    if bits == 8:
        return "load_in_8bit"
    return "load_in_4bit" if config.load_in_4bit else "adapter: qlora"


def require_quantization_support(config: Config, bits: int) -> None:
    """Quantized weights need bitsandbytes and a CUDA GPU; say which is missing and how to run without."""
    import torch

    missing = []
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package is not installed (pip install bitsandbytes)")
    if missing:
        off = "adapter: lora and load_in_4bit: false" if bits == 4 else "load_in_8bit: false"
        raise UserError(
            f"{_quantization_key(config, bits)}: {bits}-bit quantized base weights (QLoRA) need a CUDA GPU and "
            f"bitsandbytes, but {' and '.join(missing)}. To train here without quantization, set {off}."
        )


def require_machine_support(config: Config) -> None:
    """Fail fast, before data preparation, when this machine cannot run the quantization or attention asked for."""
    attention = config.attention_implementation()
    if attention is not None:
        require_attention_support(config, attention)
    bits = config.quantization_bits()
    if bits:
        require_quantization_support(config, bits)


def _attention_key(config: Config) -> str:
    if config.attn_implementation is not None:
        return "attn_implementation"
    return next(flag for flag in ATTENTION_FLAGS if getattr(config, flag))


def require_attention_support(config: Config, implementation: str) -> None:
    """Flash attention needs its package and a CUDA GPU; Hub kernels need ``kernels``. SDPA/eager/flex run anywhere."""
    import torch

    needs = {
        "flash_attention_2": ("flash_attn", "flash-attn"),
        "flash_attention_3": ("flash_attn_interface", "flash-attn 3 (flash_attn_interface)"),
    }
    missing = []
    if implementation in needs:
        module, package = needs[implementation]
        if not torch.cuda.is_available():
            missing.append("no CUDA GPU is visible")
        if importlib.util.find_spec(module) is None:
            missing.append(f"the {package} package is not installed")
    elif "/" in implementation and importlib.util.find_spec("kernels") is None:
        missing.append("the kernels package is not installed (pip install kernels)")
    if missing:
        raise UserError(
            f"{_attention_key(config)}: attention '{implementation}' cannot run here: {' and '.join(missing)}. "
            "Use sdp_attention: true (PyTorch's fused attention, no extra package) or remove the key."
        )


def resize_embeddings(model, vocab_size: int, config: Config, log: Callable[[str], None] = print,
                      mean_resizing: bool | None = None) -> None:
    """Grow the embeddings to the tokenizer's size (or shrink them with ``shrink_embeddings``)."""
    rows = _embedding_rows(model)
    if vocab_size <= rows and not (config.shrink_embeddings and vocab_size < rows):
        return
    model.resize_token_embeddings(
        vocab_size,
        pad_to_multiple_of=32 if config.resize_token_embeddings_to_32x else None,
        mean_resizing=config.mean_resizing_embeddings if mean_resizing is None else mean_resizing,
    )
    log(f"model: embeddings resized from {rows} to {_embedding_rows(model)} rows for the tokenizer's {vocab_size} tokens")


def _embedding_rows(model) -> int:
    # the module's size, not weight.shape: under DeepSpeed ZeRO-3 the weight is a (possibly empty) slice
    embeddings = model.get_input_embeddings()
    return getattr(embeddings, "num_embeddings", None) or embeddings.weight.shape[0]


def _transformers_class(name: str, key: str):
    """A class of transformers by name (``AutoTokenizer``, ``LlamaForCausalLM``), or a ``UserError`` naming ``key``."""
    import transformers

    found = getattr(transformers, name, None)
    if found is None or not hasattr(found, "from_pretrained"):
        raise UserError(
            f"{key}: transformers {transformers.__version__} has no class '{name}'; "
            f"use {'AutoTokenizer' if key == 'tokenizer_type' else 'AutoModelForCausalLM'} or a class it provides."
        )
    return found

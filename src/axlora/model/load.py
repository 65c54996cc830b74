"""Base model loading: the class, attention kernel, quantization and embedding size a config asks for.

The tokenizer (``model.tokenizer``) and the machine checks (``model.machine``) live in their own modules.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.model.diffusion_gemma import diffusion_gemma_class, prepare_diffusion_gemma
from axlora.model.kernels import apply_kernels, hub_kernels_kwargs
from axlora.model.machine import require_attention_support, require_quantization_support
from axlora.model.multimodal import train_text_only
from axlora.model.source import resolve_base_model, transformers_class
from axlora.model.tokenizer import load_tokenizer


def load_base_model(config: Config, dtype, tokenizer=None, log: Callable[[str], None] = print, empty: bool = False):
    """The base model in ``dtype`` (quantized when asked), with embeddings sized for ``tokenizer``, ready for a LoRA.

    ``tokenizer`` is the run's tokenizer (loaded again from the config when not given). ``empty``: the
    structure only, weights on the meta device (another rank loads them and sends them after sharding).
    """
    source = resolve_base_model(config.base_model)
    kwargs = model_load_kwargs(config, dtype, source, log)
    model_cls = transformers_class(config.model_type or diffusion_gemma_class(config) or "AutoModelForCausalLM",
                                   "model_type")
    try:
        model = _empty_model(model_cls, source, kwargs) if empty else _from_pretrained(model_cls, source, kwargs, config)
    except OSError as exc:
        raise UserError(f"base_model: cannot load '{config.base_model}': {exc}") from None
    except ImportError as exc:
        raise UserError(f"base_model: loading '{config.base_model}' needs a package that is missing: {exc}") from None
    model = apply_kernels(model, config, log)
    _reshape_model(model, config, log)
    train_text_only(model, config.model_type, log)
    prepare_diffusion_gemma(model, config, log)
    if tokenizer is None:
        tokenizer = load_tokenizer(config, log=lambda _message: None)
    # new rows of an empty model get their values from the loading rank: nothing to compute them from here
    resize_embeddings(model, len(tokenizer), config, log, mean_resizing=config.mean_resizing_embeddings and not empty)
    if config.quantization_bits():
        from peft import prepare_model_for_kbit_training

        _keep_cpu_4bit_layers_differentiable(model)

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs=config.checkpointing_kwargs(),
        )
        if config.quantize_moe_experts:
            from axlora.model.expert_quant import read_experts_in

            read_experts_in(model, dtype)
    elif config.gradient_checkpointing:
        _enable_checkpointing(model, config.checkpointing_kwargs())
    if config.gradient_checkpointing:
        model.config.use_cache = False
    return model


def _from_pretrained(model_cls, source: str, kwargs: dict, config: Config):
    if not config.llama4_linearized_experts:
        return model_cls.from_pretrained(source, **kwargs)
    from axlora.model.llama4_checkpoint import load_llama4

    return load_llama4(model_cls, source, kwargs, config.base_model)


def _reshape_model(model, config: Config, log: Callable[[str], None]) -> None:
    """What the config changes in the loaded model itself: its attention, its expert layers, their storage."""
    if config.scaling_softmax:
        from axlora.model.ssmax import use_ssmax

        use_ssmax(model, config, log)
    if config.llama4_linearized_experts:
        from axlora.model.llama4_experts import linearize_llama4_experts

        linearize_llama4_experts(model, log)
    if config.quantize_moe_experts:
        from axlora.model.expert_quant import quantize_moe_experts

        quantize_moe_experts(model, config.quantization_bits(), log)
    if config.torchao_quantization() and config.torchao_quantization().weight_dtype == "nf4":
        from axlora.model.torchao_quant import quantize_to_nf4

        quantize_to_nf4(model, config.torchao_quantization(), log)


def _keep_cpu_4bit_layers_differentiable(model) -> None:
    """bitsandbytes repacks a 4-bit weight for its fast CPU inference kernel on the first eval-mode forward without
    gradients (an evaluation), and that kernel has no backward: every later training step would get no gradient.
    Training needs the weights as they are, so the repacking is switched off on each 4-bit layer."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


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
        note = config.attention_note()
        log(f"attention: {attention}" + (f" ({note})" if note else ""))
    kwargs.update(hub_kernels_kwargs(config, log))
    bits = config.quantization_bits()
    if bits:
        require_quantization_support(config, bits)
        kwargs["quantization_config"] = bitsandbytes_config(config, bits, dtype)
        if not _zero3_partitions_weights():  # ZeRO-3 places (and partitions) the weights itself
            kwargs["device_map"] = {"": _quantized_device()}
        log(f"quantization: base weights in {'4-bit NF4 (double quantization)' if bits == 4 else '8-bit'}, "
            f"compute in {str(dtype).replace('torch.', '')}")
    if config.torchao_quantization():
        from axlora.model.torchao_quant import require_torchao_support, torchao_load_kwargs

        require_torchao_support(config)
        kwargs.update(torchao_load_kwargs(config.torchao_quantization(), source, config.trust_remote_code, log))
        kwargs["device_map"] = {"": _quantized_device()}  # torchao quantizes on the device the weights land on
    elif config.model_quantization_config:
        kwargs["quantization_config"] = quantization_config_object(config)
        log(f"quantization: {config.model_quantization_config}({config.model_quantization_config_kwargs or {}})")
    # router_aux_loss_coef is the model config's weight of its router loss (used where a step asks for it)
    overrides = {**(config.overrides_of_model_config or {}),
                 **({"router_aux_loss_coef": config.router_aux_loss_coef} if config.router_aux_loss_coef else {})}
    if overrides:
        from transformers import AutoConfig

        kwargs["config"] = AutoConfig.from_pretrained(
            source, trust_remote_code=config.trust_remote_code, **overrides,
            **({"revision": config.revision_of_model} if config.revision_of_model else {}),
        )
    return kwargs


def quantization_config_object(config: Config):
    """``model_quantization_config`` (a transformers class name) built with ``model_quantization_config_kwargs``."""
    import transformers

    name = config.model_quantization_config
    cls = getattr(transformers, name or "", None)
    if not isinstance(cls, type) or not issubclass(cls, transformers.utils.quantization_config.QuantizationConfigMixin):
        raise UserError(f"model_quantization_config: transformers has no quantization config class '{name}' "
                        "(e.g. Mxfp4Config, BitsAndBytesConfig).")
    try:
        return cls(**(config.model_quantization_config_kwargs or {}))
    except (TypeError, ValueError) as exc:
        raise UserError(f"model_quantization_config_kwargs: {name} does not take these arguments: {exc}") from None


def _zero3_partitions_weights() -> bool:
    """Whether this process runs under DeepSpeed ZeRO-3 (set up by the runtime before the model loads)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


def _quantized_device() -> int | str:
    """bitsandbytes quantizes while loading, on the device the weights land on: this rank's GPU, else the CPU."""
    import torch

    return int(os.environ.get("LOCAL_RANK", "0")) if torch.cuda.is_available() else "cpu"


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
        if config.uses_fsdp() or _zero3_partitions_weights():
            # FSDP- and ZeRO-3-QLoRA: packed 4-bit weights stored in the compute dtype, so they are flattened and
            # partitioned with the rest
            recipe["bnb_4bit_quant_storage"] = compute_dtype
    else:
        recipe = {"load_in_8bit": True}
    return BitsAndBytesConfig(**{**recipe, **(config.bnb_config_kwargs or {})})


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

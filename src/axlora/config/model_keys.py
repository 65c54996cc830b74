"""The model keys: which base model and tokenizer load, which tokens are added, the attention kernel, and
quantized (QLoRA) base weights."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from axlora.config.base import StrictModel, known_chat_template


class ModelSettings(StrictModel):
    base_model: str = Field(
        description="Base model: a local directory, a Hugging Face model id, or a built-in demo model "
        "(axlora:tiny-llama)."
    )
    tokenizer_config: str | None = Field(
        default=None, description="Where to load the tokenizer from, when not from base_model."
    )
    trust_remote_code: bool = Field(default=False, description="Allow model code from the model repo to run.")
    llama4_linearized_experts: bool = Field(
        default=False,
        description="Llama 4 MoE: split the fused routed experts into one linear layer per expert and projection "
        "(feed_forward.experts.gate_projs.N / up_projs.N / down_projs.N), as Axolotl does, so lora_target_modules "
        "and load_in_4bit/8bit reach them. Loads the standard checkpoint (split after loading) or one saved "
        "linearized, as Axolotl's Llama 4 copies are (pre-quantized ones too); LoRA on these layers is saved in the "
        "fused layout (peft target_parameters), so the adapter loads on the standard model.",
    )


class SpecialTokens(StrictModel):
    """``special_tokens:``: tokens to set (or add) as the tokenizer's special tokens, as in Axolotl."""

    bos_token: str | None = Field(default=None, description="Beginning-of-sequence token.")
    eos_token: str | None = Field(default=None, description="End-of-sequence token.")
    pad_token: str | None = Field(default=None, description="Padding token.")
    unk_token: str | None = Field(default=None, description="Unknown-word token.")
    additional_special_tokens: list[str] | None = Field(
        default=None, description="Extra special tokens (never split, skipped when decoding)."
    )


TEXT_TRAINED_MULTIMODAL = {"Llama4ForConditionalGeneration": ("vision_model", "multi_modal_projector")}
"""Multimodal classes ``model_type`` may name, as Axolotl's Llama 4 configs do, to train their language model on
text: the class -> its parts that only images reach (frozen, unused, and never given a LoRA)."""


class TokenizerSettings(StrictModel):
    """How the model and tokenizer classes are chosen and which tokens a run adds (Axolotl's model keys)."""

    model_type: str | None = Field(
        default=None,
        description="Model class to load: AutoModelForCausalLM (default), a transformers ...ForCausalLM class, or "
        "Llama4ForConditionalGeneration (its language model is trained on text; the vision tower stays frozen).",
    )
    tokenizer_type: str | None = Field(
        default=None, description="Tokenizer class to load: AutoTokenizer (default) or a transformers class name."
    )
    tokenizer_use_fast: bool | None = Field(default=None, description="Load the fast (Rust) tokenizer.")
    tokenizer_use_mistral_common: bool = Field(
        default=False,
        description="Load Mistral's own tokenizer (tekken.json / tokenizer.model.v*) with the mistral-common package "
        "(transformers' MistralCommonBackend), as Mistral's models are released.",
    )
    tokenizer_legacy: bool | None = Field(
        default=None, description="The `legacy` flag of sentencepiece tokenizers (Llama 2, T5)."
    )
    revision_of_model: str | None = Field(
        default=None, description="Hub revision (branch, tag or commit) of base_model to load."
    )
    overrides_of_model_config: dict[str, Any] | None = Field(
        default=None, description="Model config values to override when loading, e.g. {rope_scaling: {...}}."
    )
    special_tokens: SpecialTokens | None = Field(
        default=None, description="Set special tokens (bos/eos/pad/unk); added to the vocabulary when new."
    )
    tokens: list[str] | None = Field(default=None, description="Extra tokens to add to the vocabulary.")
    resize_token_embeddings_to_32x: bool = Field(
        default=False, description="When tokens are added, round the embedding rows up to a multiple of 32."
    )
    mean_resizing_embeddings: bool = Field(
        default=False, description="Initialise added token embeddings to the mean of the existing ones."
    )
    shrink_embeddings: bool = Field(
        default=False, description="Shrink the embeddings to the tokenizer's length when it is smaller."
    )
    chat_template: str | None = Field(
        default=None,
        description="Chat template for chat datasets: tokenizer_default, a named template (chatml, llama3, ...), "
        "tokenizer_default_fallback_<name>, or jinja (with chat_template_jinja).",
    )
    chat_template_jinja: str | None = Field(
        default=None, description="A Jinja chat template (or a .jinja file) set on the tokenizer and saved with it."
    )

    @field_validator("chat_template")
    @classmethod
    def _known_top_level_template(cls, value: str | None) -> str | None:
        return known_chat_template(value)

    @field_validator("model_type")
    @classmethod
    def _causal_lm_only(cls, value: str | None) -> str | None:
        if value is not None and not value.endswith("ForCausalLM") and value not in TEXT_TRAINED_MULTIMODAL:
            raise ValueError(
                f"axlora trains causal language models: use AutoModelForCausalLM, a ...ForCausalLM class or "
                f"{', '.join(TEXT_TRAINED_MULTIMODAL)}, not '{value}' (other multimodal classes and heads are not "
                "supported)"
            )
        return value

    @model_validator(mode="after")
    def _check_chat_template(self) -> TokenizerSettings:
        if self.chat_template == "jinja" and not self.chat_template_jinja:
            raise ValueError("chat_template: jinja needs the template text in chat_template_jinja.")
        if self.chat_template_jinja and self.chat_template not in (None, "jinja"):
            raise ValueError(
                f"chat_template / chat_template_jinja: chat_template_jinja is used only with chat_template: jinja "
                f"(or unset), not '{self.chat_template}'."
            )
        return self


ATTENTION_FLAGS = {
    "flash_attention": "flash_attention_2",
    "sdp_attention": "sdpa",
    "xformers_attention": "sdpa",
    "sage_attention": "sdpa",
    "flex_attention": "flex_attention",
    "eager_attention": "eager",
}
"""Axolotl's boolean attention switches and the transformers implementation each selects."""

ATTENTION_ALIASES = {"xformers": "sdpa", "sage": "sdpa"}
"""Axolotl's ``attn_implementation`` names that are not transformers backends, and the kernel that runs instead."""

ATTENTION_NOTES = {
    "xformers": "xformers is not a transformers backend; PyTorch's SDPA runs the same memory-efficient exact "
    "attention",
    "sage": "SageAttention (8-bit quantized attention) is not a transformers backend; PyTorch's SDPA computes the "
    "same attention exactly",
}

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def _same_kernel(flag: str, implementation: str) -> bool:
    """Whether an Axolotl attention switch asks for what ``attn_implementation`` names (flash: any flash kernel)."""
    if flag == "flash_attention":
        return "flash" in implementation
    return ATTENTION_FLAGS[flag] == ATTENTION_ALIASES.get(implementation, implementation)


class AttentionSettings(StrictModel):
    """Which attention kernel the model runs: only speed and memory change, never what is trained."""

    attn_implementation: str | None = Field(
        default=None,
        description="Attention kernel: eager, sdpa, flash_attention_2, flash_attention_3, flex_attention, or a "
        "Hub kernel (kernels-community/...); default: transformers' choice (sdpa).",
    )
    flash_attention: bool = Field(default=False, description="Use flash-attn 2 (attn_implementation: flash_attention_2).")
    sdp_attention: bool = Field(default=False, description="Use PyTorch scaled-dot-product attention (sdpa).")
    xformers_attention: bool = Field(
        default=False, description="Axolotl's xformers switch: runs sdpa, PyTorch's memory-efficient kernel."
    )
    sage_attention: bool = Field(
        default=False, description="Axolotl's SageAttention switch: runs sdpa, the same attention computed exactly."
    )
    flex_attention: bool = Field(default=False, description="Use PyTorch flex attention.")
    eager_attention: bool = Field(default=False, description="Use the plain (eager) attention implementation.")
    gemma4_hybrid_attn_impl: bool = Field(
        default=False,
        description="Axolotl's Gemma 4 hybrid (flash attention on sliding-window layers, SDPA on global ones): axlora "
        "runs SDPA on every layer, the same attention, and says so.",
    )
    scaling_softmax: bool = Field(
        default=False,
        description="Scalable-Softmax (SSMax) attention, as in Axolotl: the logits of the query at position p "
        "(within its sequence) are multiplied by scaling_softmax_factor * log(max(p+1, 2)) + scaling_softmax_bias; "
        "runs around the chosen attention kernel. Changes the model's attention: use it for the runs it was "
        "trained with (the adapter alone does not carry it).",
    )
    scaling_softmax_factor: float = Field(default=0.43, description="SSMax's s (scaling_softmax).")
    scaling_softmax_bias: float = Field(default=0.0, description="SSMax's b (scaling_softmax).")

    @model_validator(mode="after")
    def _ssmax_settings_need_ssmax(self) -> AttentionSettings:
        # a saved config lists every key with its default, so only a changed value asks for SSMax
        stray = sorted(key for key in ("scaling_softmax_factor", "scaling_softmax_bias")
                       if getattr(self, key) != type(self).model_fields[key].default)
        if stray and not self.scaling_softmax:
            raise ValueError(f"{' / '.join(stray)}: set{'s' if len(stray) == 1 else ''} SSMax attention, which is on "
                             "only with scaling_softmax: true.")
        return self

    @model_validator(mode="after")
    def _one_attention_choice(self) -> AttentionSettings:
        chosen = [flag for flag in ATTENTION_FLAGS if getattr(self, flag)]
        if self.attn_implementation is not None:
            value = self.attn_implementation
            if value not in ATTENTION_IMPLEMENTATIONS and value not in ATTENTION_ALIASES and "/" not in value:
                raise ValueError(
                    f"attn_implementation: '{value}' is not available in axlora; use one of "
                    f"{', '.join(ATTENTION_IMPLEMENTATIONS)} or a Hub kernel (kernels-community/...)."
                )
            # Axolotl files often keep the old switch beside attn_implementation: fine when both name the same kernel
            chosen = [flag for flag in chosen if not _same_kernel(flag, value)]
            chosen.insert(0, "attn_implementation")
        if len(chosen) > 1:
            raise ValueError(f"{' / '.join(chosen)}: choose one attention implementation, not {len(chosen)}.")
        return self

    def attention_implementation(self) -> str | None:
        """The transformers ``attn_implementation`` to load the model with (None: transformers' default)."""
        if self.gemma4_hybrid_attn_impl:
            return "sdpa"
        if self.attn_implementation is not None:
            return ATTENTION_ALIASES.get(self.attn_implementation, self.attn_implementation)
        for flag, implementation in ATTENTION_FLAGS.items():
            if getattr(self, flag):
                return implementation
        return None

    def attention_note(self) -> str | None:
        """Why the kernel that runs is not the one named, for Axolotl's names that are not transformers backends."""
        if self.gemma4_hybrid_attn_impl:
            return ("gemma4_hybrid_attn_impl: SDPA on every layer; the hybrid's flash attention on the sliding-window "
                    "layers computes the same attention faster")
        if self.attn_implementation in ATTENTION_NOTES:
            return ATTENTION_NOTES[self.attn_implementation]
        if self.xformers_attention:
            return ATTENTION_NOTES["xformers"]
        if self.sage_attention:
            return ATTENTION_NOTES["sage"]
        return None


TORCHAO_WEIGHT_DTYPES = ("int4", "nf4", "nvfp4", "int8", "fp8")
TORCHAO_DTYPE_ALIASES = {"float8": "fp8", "float8_e4m3fn": "fp8"}
TORCHAO_GROUP_SIZES = {"int4": 128, "int8": 128, "nf4": 64, "nvfp4": 16}
"""Axolotl's default group size per torchao weight dtype (fp8 is scaled per row)."""


class TorchAoQuantization(StrictModel):
    """``model_quantization_config: {backend: torchao, weight_dtype, group_size}``: Axolotl's torchao QLoRA base."""

    backend: Literal["torchao"] = Field(description="Quantization library: torchao.")
    weight_dtype: Literal["int4", "nf4", "nvfp4", "int8", "fp8"] = Field(
        description="Frozen base weight format: int4, nf4 or nvfp4 (4-bit), int8, or fp8 (float8_e4m3fn)."
    )
    group_size: int | None = Field(
        default=None, gt=0,
        description="Weights sharing one scale; default int4/int8: 128, nf4: 64, nvfp4: 16 (fixed by the format).",
    )

    @field_validator("weight_dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, value: Any) -> Any:
        return TORCHAO_DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _group_size_fits(self) -> TorchAoQuantization:
        if self.group_size is not None and self.weight_dtype == "nvfp4" and self.group_size != 16:
            raise ValueError("model_quantization_config.group_size: NVFP4 scales blocks of 16 weights; remove it.")
        if self.group_size is not None and self.weight_dtype == "fp8":
            raise ValueError("model_quantization_config.group_size: fp8 weights are scaled per row; remove it.")
        return self

    def effective_group_size(self) -> int | None:
        return self.group_size or TORCHAO_GROUP_SIZES.get(self.weight_dtype)


class QuantizationSettings(StrictModel):
    """Quantized base weights (QLoRA): bitsandbytes 4/8-bit (load_in_4bit / load_in_8bit), a transformers
    quantization config class, or torchao; LoRA trains on top."""

    load_in_4bit: bool = Field(
        default=False, description="Load the base model in 4-bit NF4 with double quantization (QLoRA); CUDA only."
    )
    load_in_8bit: bool = Field(default=False, description="Load the base model in 8-bit (LLM.int8); CUDA only.")
    bnb_config_kwargs: dict[str, Any] | None = Field(
        default=None, description="Overrides of the bitsandbytes quantization config (BitsAndBytesConfig keys)."
    )

    quantize_moe_experts: bool = Field(
        default=False,
        description="With a quantized base: also store the fused MoE expert weights quantized (bitsandbytes leaves "
        "them in full precision otherwise): 4-bit NF4 with load_in_4bit / qlora, row-wise int8 with load_in_8bit. "
        "Each expert is dequantized when read, and lora_target_parameters trains a LoRA on them as on "
        "full-precision experts.",
    )
    model_quantization_config: str | TorchAoQuantization | None = Field(
        default=None,
        description="A transformers quantization config class to load the base with, e.g. Mxfp4Config (gpt-oss; "
        "with model_quantization_config_kwargs: {dequantize: true} the MXFP4 experts load dequantized); or "
        "{backend: torchao, weight_dtype: int4|nf4|nvfp4|int8|fp8, group_size} for a torchao-quantized frozen base "
        "(Axolotl's torchao QLoRA: weights stored quantized, read dequantized in the run's dtype; int4 is refused "
        "when training: it needs torchao's CUDA kernels and peft has no LoRA over torchao int4 weights).",
    )
    model_quantization_config_kwargs: dict[str, Any] | None = Field(
        default=None, description="Arguments of model_quantization_config's class, e.g. {dequantize: true}."
    )

    @field_validator("model_quantization_config", mode="before")
    @classmethod
    def _read_torchao_block(cls, value: Any) -> Any:
        """A mapping is the torchao block: report its own problems, not that it is not a class name."""
        if not isinstance(value, dict):
            return value
        try:
            return TorchAoQuantization.model_validate(value)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(part) for part in error['loc']) or 'block'}: "
                                 f"{error['msg'].removeprefix('Value error, ')}" for error in exc.errors())
            raise ValueError(f"the torchao block {{backend: torchao, weight_dtype, group_size}}: {problems}") from None

    @model_validator(mode="after")
    def _one_quantization(self) -> QuantizationSettings:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit / load_in_8bit: choose one of them, not both.")
        if self.model_quantization_config_kwargs and not isinstance(self.model_quantization_config, str):
            raise ValueError("model_quantization_config_kwargs: needs model_quantization_config (the class they are "
                             "for, e.g. Mxfp4Config).")
        if self.model_quantization_config and (self.load_in_4bit or self.load_in_8bit):
            raise ValueError("model_quantization_config / load_in_4bit / load_in_8bit: choose one quantization.")
        if isinstance(self.model_quantization_config, str) and not self.model_quantization_config.endswith("Config"):
            raise ValueError(f"model_quantization_config: name a transformers quantization config class such as "
                             f"Mxfp4Config, not '{self.model_quantization_config}'.")
        sharded = getattr(self, "deepspeed", None) or getattr(self, "uses_fsdp", lambda: False)()
        if self.torchao_quantization() and sharded:
            raise ValueError("model_quantization_config / fsdp / deepspeed: a torchao-quantized base trains on one "
                             "process or with DDP (num_processes); remove the sharding.")
        return self

    def torchao_quantization(self) -> TorchAoQuantization | None:
        """The torchao base quantization, when ``model_quantization_config`` asks for one."""
        config = self.model_quantization_config
        return config if isinstance(config, TorchAoQuantization) else None

    # adapter: qlora implies a 4-bit base; that rule and quantization_bits() read the adapter key, so they live
    # on Config.

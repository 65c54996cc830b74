"""The adapter keys: the LoRA itself (rank, alpha, targets, continuing an adapter) and peft's LoRA variants."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from axlora.config.base import StrictModel


class AdapterSettings(StrictModel):
    adapter: Literal["lora", "qlora"] = Field(
        default="lora", description="Adapter kind to train: lora, or qlora (LoRA on a 4-bit base; implies load_in_4bit)."
    )
    lora_model_dir: str | None = Field(
        default=None,
        description="Existing LoRA adapter (or an earlier axlora output_dir) to continue training from.",
    )
    lora_r: int = Field(default=8, gt=0, description="LoRA rank.")
    lora_alpha: float = Field(default=16, gt=0, description="LoRA alpha; the update is scaled by alpha/r.")
    lora_dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_target_modules: list[str] | str | None = Field(
        default=None,
        description="Module names to adapt, e.g. [q_proj, v_proj], or one regular expression that whole module "
        "paths must match (peft's rule), e.g. 'model.layers.[0-9]+.self_attn.(q|v)_proj'.",
    )
    lora_target_parameters: list[str] | None = Field(
        default=None,
        description="Parameters to adapt that are not linear layers, such as fused MoE expert weights "
        "(mlp.experts.gate_up_proj, mlp.experts.down_proj): peft's target_parameters, one LoRA per expert; "
        "needs lora_dropout: 0 (the default with this key).",
    )
    lora_target_linear: bool = Field(
        default=False, description="Adapt every linear layer except the output head."
    )
    peft_use_rslora: bool = Field(default=False, description="Rank-stabilised LoRA: scale by alpha/sqrt(r).")
    strict: bool = Field(
        default=False,
        description="Treat adapter settings in the YAML that contradict the loaded adapter as errors.",
    )
    allow_base_mismatch: bool = Field(
        default=False,
        description="Continue a lora_model_dir adapter whose recorded base model has another name than "
        "base_model (a copy or local snapshot of it); module shapes must still fit.",
    )


class LoftQSettings(StrictModel):
    """``peft: {loftq_config: ...}``: peft's ``LoftQConfig``."""

    loftq_bits: Literal[4, 8] = Field(
        default=4, description="Bits of the quantization LoftQ simulates: 4 (NF4) or 8 (int8), as in peft."
    )
    loftq_iter: int = Field(
        default=1, ge=1, description="Alternating quantize / low-rank steps (peft's loftq_iter; Axolotl uses 1)."
    )


TORCHAO_PEFT_KEYS = ("backend", "weight_dtype", "group_size")
"""Axolotl's older spelling of the quantized base under ``peft:``; moved to their axlora keys when read."""


class PeftBlock(StrictModel):
    """Axolotl's ``peft:`` mapping: LoftQ initialisation (and, in older Axolotl files, the quantized base)."""

    loftq_config: LoftQSettings | None = Field(
        default=None,
        description="LoftQ: each adapted weight W is replaced by its quantized-dequantized Q(W) and the LoRA starts "
        "from the low-rank part of W - Q(W), as peft's init_lora_weights: loftq does (factors not divided by "
        "lora_alpha/lora_r, as in peft). Needs an unquantized base load and bitsandbytes; the adapter is saved "
        "with the Q(W) base weights, so plain peft and merge-lora rebuild the trained model.",
    )


class PeftSettings(StrictModel):
    """LoRA variants and extra trainable modules, passed to peft's ``LoraConfig`` for a fresh adapter."""

    peft: PeftBlock | None = Field(
        default=None,
        description="Axolotl's peft block: {loftq_config: {loftq_bits: 4}} initialises a fresh LoRA with LoftQ. "
        "{backend: torchao|bnb, weight_dtype, group_size} (older Axolotl) is read as model_quantization_config "
        "(torchao) or load_in_4bit / load_in_8bit (bnb).",
    )

    peft_use_dora: bool = Field(default=False, description="DoRA: learn a magnitude per output besides the LoRA.")
    lora_modules_to_save: list[str] | None = Field(
        default=None,
        description="Modules trained and saved in full besides the LoRA, e.g. [embed_tokens, lm_head] after "
        "adding tokens.",
    )
    unfrozen_parameters: list[str] | None = Field(
        default=None,
        description="Regular expressions of base parameter names trained in full beside the LoRA (Axolotl's key), "
        "e.g. ['^lm_head\\..*']; each must cover whole modules, which are saved with the adapter and merged.",
    )
    lora_fan_in_fan_out: bool = Field(
        default=False, description="The adapted layers store weights as (fan_in, fan_out), like GPT-2's Conv1D."
    )
    peft_layers_to_transform: list[int] | int | None = Field(
        default=None, description="Only adapt these layer indices (default: every layer)."
    )
    peft_layers_pattern: list[str] | None = Field(
        default=None, description="Name of the layer list that peft_layers_to_transform indexes (e.g. layers)."
    )
    peft_trainable_token_indices: list[int] | dict[str, list[int]] | None = Field(
        default=None, description="Train only these rows of the embeddings (a lighter lora_modules_to_save)."
    )
    peft_ensure_weight_tying: bool | None = Field(
        default=None, description="Keep tied input and output embeddings tied in the adapter."
    )

    @model_validator(mode="before")
    @classmethod
    def _read_peft_quantized_base(cls, data: Any) -> Any:
        """Older Axolotl files name the quantized base under ``peft:``: move it to the keys that load it."""
        block = data.get("peft") if isinstance(data, dict) else None
        if not isinstance(block, dict) or not any(key in block for key in TORCHAO_PEFT_KEYS):
            return data
        moved = {key: block[key] for key in TORCHAO_PEFT_KEYS if block.get(key) is not None}
        rest = {key: value for key, value in block.items() if key not in TORCHAO_PEFT_KEYS}
        data = {**data, "peft": rest or None}
        if not moved:
            return data
        backend, dtype = moved.get("backend"), moved.get("weight_dtype")
        if backend == "bnb" and dtype in ("nf4", "int8"):
            return {**data, ("load_in_4bit" if dtype == "nf4" else "load_in_8bit"): True}
        if backend == "torchao" and dtype is not None:
            if data.get("model_quantization_config") not in (None, moved):
                raise ValueError("peft / model_quantization_config: both name the quantized base; keep "
                                 "model_quantization_config.")
            # Axolotl spells LoRA on a 4-bit torchao base adapter: qlora; here qlora means a bitsandbytes base
            lora = {"adapter": "lora"} if data.get("adapter") == "qlora" else {}
            return {**data, "model_quantization_config": moved, **lora}
        raise ValueError(f"peft.backend / peft.weight_dtype: expected backend: torchao with a weight_dtype, or "
                         f"backend: bnb with weight_dtype nf4 or int8 (got {moved}).")

    @model_validator(mode="after")
    def _loftq_needs_unquantized_base(self) -> PeftSettings:
        if self.loftq() is None:
            return self
        quantized = [key for key in ("load_in_4bit", "load_in_8bit", "model_quantization_config") if getattr(self, key, None)]
        if getattr(self, "adapter", None) == "qlora":
            quantized.append("adapter: qlora")
        if quantized:
            raise ValueError(f"peft.loftq_config / {' / '.join(quantized)}: LoftQ quantizes the base weights itself "
                             "and needs them loaded unquantized; remove the quantized load (use adapter: lora).")
        if self.peft_use_dora:
            raise ValueError("peft.loftq_config / peft_use_dora: DoRA's magnitudes are taken from the base weights "
                             "LoftQ replaces; use one of them.")
        if getattr(self, "llama4_linearized_experts", False):
            raise ValueError("peft.loftq_config / llama4_linearized_experts: the linearized experts' adapter is saved "
                             "in the fused layout, which has no place for LoftQ's base weights; use one of them.")
        sharded = getattr(self, "uses_fsdp", lambda: False)() or getattr(self, "deepspeed", None) in (
            "zero3", "zero3_offload")
        if sharded:
            raise ValueError("peft.loftq_config / fsdp / deepspeed: LoftQ replaces and saves whole base weights; "
                             "use it without sharding the model (DDP or deepspeed zero1/zero2).")
        return self

    def loftq(self) -> LoftQSettings | None:
        """The LoftQ settings when ``peft.loftq_config`` asks for LoftQ initialisation."""
        return self.peft.loftq_config if self.peft is not None else None

    def peft_kwargs(self) -> dict[str, Any]:
        """Extra ``peft.LoraConfig`` arguments for a fresh adapter (only the ones the config sets)."""
        values = {
            "use_dora": self.peft_use_dora or None,
            "modules_to_save": self.lora_modules_to_save,
            "fan_in_fan_out": self.lora_fan_in_fan_out or None,
            "layers_to_transform": self.peft_layers_to_transform,
            "layers_pattern": self.peft_layers_pattern,
            "trainable_token_indices": self.peft_trainable_token_indices,
            "ensure_weight_tying": self.peft_ensure_weight_tying,
            "target_parameters": getattr(self, "lora_target_parameters", None),
        }
        return {key: value for key, value in values.items() if value is not None}

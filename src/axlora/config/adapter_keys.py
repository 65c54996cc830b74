"""The adapter keys: the LoRA itself (rank, alpha, targets, continuing an adapter) and peft's LoRA variants."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

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


class PeftSettings(StrictModel):
    """LoRA variants and extra trainable modules, passed to peft's ``LoraConfig`` for a fresh adapter."""

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

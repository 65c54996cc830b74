"""``block_diffusion``: block-diffusion fine-tuning of DiffusionGemma (Axolotl's DiffusionGemmaPlugin).

DiffusionGemma encodes the prompt into a KV cache with its causal encoder and denoises a fixed-length canvas of the
response with its bidirectional decoder. A run with ``block_diffusion`` loads ``DiffusionGemmaForBlockDiffusion``
(Axolotl's ``type_of_model``, which the plugin sets), splits each row into prefix and canvas, corrupts the canvas and
trains the decoder to restore it (``train.block_diffusion_loss``).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from axlora.config.base import StrictModel, block_switch
from axlora.core.errors import UserError

DIFFUSION_GEMMA_CLASS = "DiffusionGemmaForBlockDiffusion"
IMAGE_ONLY_PARTS = ("model.encoder.vision_tower", "model.encoder.embed_vision")
"""DiffusionGemma's parts that only images reach: text rows never use them, so they get no LoRA."""


class BlockDiffusion(StrictModel):
    """The block-diffusion objective, with Axolotl's names and defaults."""

    canvas_length: int | None = Field(
        default=None, ge=1, description="Tokens per canvas (block); default: the model config's canvas_length. A "
        "longer response trains one of its canvas-length blocks per step, the blocks before it joining the prefix."
    )
    corruption: Literal["uniform", "mask"] = Field(
        default="uniform", description="How a canvas token is corrupted: uniform: a random vocabulary token (as "
        "DiffusionGemma's sampler starts); mask: mask_token_id (absorbing)."
    )
    mask_token_id: int | None = Field(default=None, ge=0, description="The token of corruption: mask.")
    timestep_eps: float = Field(
        default=1e-3, ge=0.0, le=1.0, description="Smallest diffusion time t (t is drawn from [timestep_eps, 1])."
    )
    loss_weighting: Literal["elbo", "uniform"] = Field(
        default="elbo", description="Weight of a row's mean cross-entropy on its corrupted tokens: elbo: 1/t; "
        "uniform: 1."
    )
    self_conditioning_prob: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Probability that a micro batch first runs a no-grad forward and "
        "feeds its logits back as self-conditioning, as inference does."
    )
    frozen_fp4_experts: Literal["nvfp4", "mxfp4"] | None = Field(
        default=None, description="Store the frozen MoE experts in a torchao 4-bit format (nvfp4, mxfp4); needs a "
        "CUDA GPU and torchao."
    )

    @model_validator(mode="after")
    def _mask_needs_token(self) -> BlockDiffusion:
        if self.corruption == "mask" and self.mask_token_id is None:
            raise ValueError("block_diffusion.corruption: mask needs block_diffusion.mask_token_id.")
        return self


def text_only_targets(names: list[str]) -> str:
    """peft's target_modules as one pattern: the named modules outside DiffusionGemma's image-only parts.

    Its vision tower has q_proj, k_proj, ... of its own, in a wrapper peft cannot adapt; the pattern is saved in
    adapter_config.json, so plain peft adapts the same modules.
    """
    parts = "|".join(re.escape(part) for part in IMAGE_ONLY_PARTS)
    return rf"(?!({parts})\.).*\.({'|'.join(re.escape(name) for name in names)})"


class BlockDiffusionSettings(StrictModel):
    """Block-diffusion training of DiffusionGemma instead of next-token prediction."""

    block_diffusion: BlockDiffusion | None = Field(
        default=None, description="Block-diffusion fine-tuning of DiffusionGemma (DiffusionGemmaForBlockDiffusion): "
        "the prompt is the encoder's prefix, the response a canvas the decoder learns to denoise. true: the defaults."
    )

    @field_validator("block_diffusion", mode="before")
    @classmethod
    def _block_diffusion_switch(cls, value: Any) -> Any:
        return block_switch(value)

    @model_validator(mode="before")
    @classmethod
    def _read_model_class(cls, data: Any) -> Any:
        """``model_type: DiffusionGemmaForBlockDiffusion`` is what block_diffusion loads; the LoRA names skip images."""
        if not isinstance(data, dict):
            return data
        if data.get("model_type") == DIFFUSION_GEMMA_CLASS:
            data = {key: value for key, value in data.items() if key != "model_type"}
            if data.get("block_diffusion") in (None, False):
                data["block_diffusion"] = {}
        elif data.get("block_diffusion") not in (None, False) and data.get("model_type") is not None:
            raise ValueError(f"model_type / block_diffusion: block_diffusion trains {DIFFUSION_GEMMA_CLASS}, not "
                             f"{data['model_type']!r}; remove model_type or set it to {DIFFUSION_GEMMA_CLASS}.")
        targets = data.get("lora_target_modules")
        if data.get("block_diffusion") not in (None, False) and isinstance(targets, list) and targets:
            data = {**data, "lora_target_modules": text_only_targets([str(name) for name in targets])}
        return data

    @model_validator(mode="after")
    def _block_diffusion_fits(self) -> BlockDiffusionSettings:
        if self.block_diffusion is None:
            return self
        clashes = {
            "sample_packing": "the canvas collator builds one prefix and canvas per row",
            "rl": "preference tuning has its own objective",
            "pretraining_dataset": "a row needs a prompt and a response",
            "gradient_checkpointing": "the decoder reads the encoder's KV cache, which recomputation does not rebuild",
            "sample_prompts": "completions are generated token by token",
            "do_causal_lm_eval": "completions are generated token by token",
            "eval_table_size": "completions are generated token by token",
            "router_aux_loss_coef": "the router loss is added to the causal-LM loss only",
            "chunked_cross_entropy": "the canvas loss is computed on the canvas logits",
        }
        for key, why in clashes.items():
            if getattr(self, key, None):
                raise ValueError(f"block_diffusion / {key}: {key} cannot be used with block_diffusion ({why}).")
        return self


def refuse_merge(block_diffusion: BlockDiffusion | None) -> None:
    """merge-lora cannot write a block-diffusion adapter into DiffusionGemma's checkpoint.

    The encoder and decoder share (tie) every text-layer weight, while the LoRA gives each of them a delta of its
    own; one tied tensor cannot hold two merged weights.
    """
    if block_diffusion is not None:
        raise UserError("merge-lora / block_diffusion: DiffusionGemma's encoder and decoder share their weights, and "
                        "the adapter trains a LoRA for each; a merged checkpoint cannot hold both. Load the adapter "
                        "with peft on DiffusionGemmaForBlockDiffusion instead.")

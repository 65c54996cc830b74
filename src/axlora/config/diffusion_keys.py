"""``diffusion:``: masked diffusion language-model training (Axolotl's DiffusionPlugin, LLaDA-style).

Each sequence (each packed document) draws a noise level ``t ~ U(0, 1)``; its answer tokens are replaced by the
mask token with probability ``p = (1 - eps) * t + eps`` (prompt, padding and bos/eos/pad tokens stay visible);
the model sees the whole document at once (bidirectional attention, never across packed documents) and the loss
is the cross-entropy of the original tokens at the masked positions, weighted by ``1 / p``. The keys and their
defaults are Axolotl's; the ones its trainer accepts but does not read (the noise-schedule block, which only
describes ``t ~ U(0, 1)``) are accepted and have no effect here either.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from axlora.config.base import StrictModel, block_switch

DEFAULT_MASK_TOKEN = "<|diffusion_mask|>"
"""The mask token Axolotl looks for when neither ``mask_token_id`` nor ``mask_token_str`` names one."""

_LOSS_REPLACING_KEYS = ("chunked_cross_entropy", "cut_cross_entropy", "liger_cross_entropy",
                        "liger_fused_linear_cross_entropy")
"""Switches that replace the causal token loss, which the diffusion objective already replaces."""


MASKED_ATTENTION = ("sdpa", "eager")
"""Attention implementations that take the 4-D mask a document-isolated bidirectional pass needs."""


class DiffusionUnroll(StrictModel):
    """Axolotl's K-step denoising unroll for native diffusion models; only the single step is built."""

    k_max: Literal[1] = Field(default=1, description="Denoising steps unrolled per training step (1 only).")
    grad_through_steps: Literal[False] = Field(default=False, description="Gradients through unrolled steps (off).")


class DiffusionSettings(StrictModel):
    """The ``diffusion:`` block. Noise level, masking and loss weighting of the masked-diffusion objective."""

    from_causal_lm: bool = Field(
        default=False,
        description="Axolotl: train a causal LM as a diffusion LM. A causal base is converted either way here: "
        "bidirectional attention inside each document, and logits read one position back (as Axolotl does).",
    )
    noise_schedule: Literal["linear", "cosine"] = Field(
        default="linear", description="Accepted as in Axolotl, whose trainer does not read it: t ~ U(0, 1).")
    min_mask_ratio: float = Field(default=0.1, ge=0.0, le=1.0,
                                  description="Accepted as in Axolotl, whose trainer does not read it.")
    max_mask_ratio: float = Field(default=0.9, ge=0.0, le=1.0,
                                  description="Accepted as in Axolotl, whose trainer does not read it.")
    num_diffusion_steps: int = Field(default=128, ge=1,
                                     description="Accepted as in Axolotl, whose trainer does not read it.")
    eps: float = Field(default=1e-3, ge=0.0, le=1.0,
                       description="Lowest masking probability: p = (1 - eps) * t + eps with t ~ U(0, 1).")
    t_eps: float | None = Field(default=None, ge=0.0, le=1.0,
                                description="Axolotl's native name for the noise floor; when set it replaces eps.")
    importance_weighting: bool = Field(
        default=True, description="Weigh each masked token's loss by 1 / p (the unbiased LLaDA estimator).")
    time_weighting: Literal["none", "inv_t", "linear"] | None = Field(
        default=None, description="Weight of a document's loss by its noise level: inv_t (1 / p), linear (1 - p) "
        "or none; when set it replaces importance_weighting.")
    objective_reduction: Literal["supervised_token_mean", "masked_token_mean"] | None = Field(
        default=None, description="Divide the step's summed loss by its answer tokens (supervised_token_mean, "
        "the default) or by its masked tokens (masked_token_mean).")
    mask_token_id: int | None = Field(default=None, ge=0, description="Token id used as the mask.")
    mask_token_str: str | None = Field(
        default=None, description=f"Token used as the mask when mask_token_id is unset (default "
        f"'{DEFAULT_MASK_TOKEN}'); it must be in the tokenizer: add it with special_tokens and train its embedding.")
    generate_samples: bool | None = Field(
        default=None, description="Samples by iterative unmasking during training: not built; set false.")
    generation_interval: int = Field(default=100, ge=1, description="Axolotl: steps between samples (needs "
                                     "generate_samples, which is not built).")
    num_generation_samples: int = Field(default=3, ge=1, description="Axolotl: samples per generation (needs "
                                        "generate_samples).")
    generation_steps: int = Field(default=128, ge=1, description="Axolotl: unmasking steps per sample (needs "
                                  "generate_samples).")
    generation_temperature: float = Field(default=0.0, ge=0.0, description="Axolotl: sampling temperature (needs "
                                          "generate_samples).")
    generation_max_length: int = Field(default=100, ge=1, description="Axolotl: sample length (needs "
                                       "generate_samples).")
    canvas_width: None = Field(default=None, description="Axolotl's decision-read canvas: not supported (leave unset).")
    treat_eos_as_one: Literal[False] | None = Field(
        default=None, description="Axolotl: one noise draw for a trailing EOS run: not supported (false or unset).")
    eos_tail: Literal["none"] | None = Field(
        default=None, description="Axolotl's EOS-tail layout: none (no tail) only; visible_supervised is not built.")
    overflow_policy: Literal["error"] = Field(
        default="error", description="Rows longer than sequence_len follow axlora's usual rule (error only).")
    allow_native_vocab_resize: Literal[False] = Field(default=False, description="Axolotl: always false.")
    unroll: DiffusionUnroll | None = Field(default=None, description="Axolotl's denoising unroll: one step only.")

    @model_validator(mode="after")
    def _check_ratios(self) -> DiffusionSettings:
        if self.min_mask_ratio > self.max_mask_ratio:
            raise ValueError("diffusion.min_mask_ratio must not exceed diffusion.max_mask_ratio.")
        if self.generate_samples:
            raise ValueError("diffusion.generate_samples: sampling by iterative unmasking during training is not "
                             "built in axlora; set generate_samples: false.")
        return self

    @property
    def noise_floor(self) -> float:
        return self.eps if self.t_eps is None else self.t_eps

    @property
    def weighting(self) -> str:
        """How a masked token's loss is weighted by its document's masking probability p."""
        if self.time_weighting is not None:
            return self.time_weighting
        return "inv_t" if self.importance_weighting else "none"

    @property
    def reduction(self) -> str:
        return self.objective_reduction or "supervised_token_mean"


class DiffusionKeys(StrictModel):
    """The masked-diffusion objective (``diffusion:``, or Axolotl's DiffusionPlugin with its defaults)."""

    diffusion: DiffusionSettings | None = Field(
        default=None,
        description="Masked diffusion LM training (Axolotl's DiffusionPlugin): answer tokens masked at a random "
        "rate per sequence, bidirectional attention, loss on the masked tokens weighted by 1 / p. "
        "`true` turns it on with the defaults.",
    )

    @field_validator("diffusion", mode="before")
    @classmethod
    def _diffusion_switch(cls, value: Any) -> Any:
        return block_switch(value)

    @model_validator(mode="after")
    def _check_diffusion_combinations(self) -> DiffusionKeys:
        if self.diffusion is None:
            return self
        problems = [f"diffusion / {key}: the diffusion objective computes its own loss from the logits; "
                    f"turn {key} off." for key in _LOSS_REPLACING_KEYS if getattr(self, key, False)]
        attention = getattr(self, "attention_implementation", lambda: None)()
        if attention is not None and attention not in MASKED_ATTENTION:
            problems.append(f"diffusion / attention: {attention} takes no per-document bidirectional mask; use "
                            "attn_implementation: sdpa or eager.")
        if getattr(self, "rl", None):
            problems.append("diffusion / rl: preference tuning and the diffusion objective are separate "
                            "objectives; choose one.")
        if problems:
            raise ValueError("\n".join(problems))
        return self

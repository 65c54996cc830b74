"""The training keys: optimizer and schedule, evaluation and checkpoints, batching, memory trades, output."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from axlora.config.base import StrictModel

BoolOrAuto = bool | Literal["auto"]
MAX_SEED = 2**32 - 1
"""The largest seed every seeded library takes: numpy's legacy generator (which transformers' set_seed seeds)
accepts 0 to 2**32 - 1; torch accepts a wider range."""


class TrainingSettings(StrictModel):
    micro_batch_size: int = Field(default=1, gt=0, description="Rows per forward pass on each process.")
    gradient_accumulation_steps: int = Field(default=1, gt=0, description="Micro batches per optimizer step.")
    batch_size: int | None = Field(
        default=None, gt=0, description="Rows per optimizer step on each process (Axolotl's batch_size): sets "
        "gradient_accumulation_steps to batch_size // micro_batch_size; set one of the two.",
    )
    num_epochs: float | None = Field(default=None, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(default=None, gt=0, description="Optimizer steps; wins over num_epochs.")
    learning_rate: float = Field(default=2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal[
        "cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"
    ] = Field(default="cosine", description="Learning-rate schedule after warm-up.")
    warmup_steps: int | None = Field(default=None, ge=0, description="Linear warm-up steps.")
    warmup_ratio: float | None = Field(default=None, ge=0, lt=1, description="Warm-up as a fraction of steps.")
    lr_quadratic_warmup: bool = Field(
        default=False, description="With lr_scheduler: cosine, warm up quadratically ((step/warmup)^2) instead of "
        "linearly.",
    )
    optimizer: str = Field(
        default="adamw_torch", description="Optimizer name as transformers knows it (adamw_torch, sgd, ...)."
    )
    weight_decay: float = Field(default=0.0, ge=0, description="Decoupled weight decay.")
    adam_beta1: float = Field(default=0.9, gt=0, lt=1, description="Adam beta1.")
    adam_beta2: float = Field(default=0.999, gt=0, lt=1, description="Adam beta2.")
    adam_epsilon: float = Field(default=1e-8, gt=0, description="Adam epsilon.")
    max_grad_norm: float = Field(default=1.0, ge=0, description="Gradient clipping norm (0 disables).")
    bf16: BoolOrAuto = Field(default="auto", description="bfloat16 training; auto: where the GPU supports it.")
    fp16: bool = Field(default=False, description="float16 mixed precision (GPU only).")
    bfloat16: bool = Field(
        default=False, description="Axolotl's pure-bfloat16 switch: the base weights load in bfloat16 (as bf16: true)."
    )
    float16: bool = Field(
        default=False, description="Axolotl's pure-float16 switch: the base weights load in float16 (as fp16: true; "
        "GPU only).",
    )
    float32: bool = Field(default=False, description="Load and train in float32 (as bf16: false).")
    tf32: BoolOrAuto = Field(default=False, description="Allow TF32 matmuls on Ampere+ GPUs (auto: where supported).")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations to save memory.")
    seed: int = Field(default=42, ge=0, le=MAX_SEED, description="Seed for data order, LoRA init and dropout "
                      f"(0 to {MAX_SEED}).")
    logging_steps: int = Field(default=5, gt=0, description="Log metrics every N optimizer steps.")
    eval_steps: int | float | None = Field(
        default=None, gt=0, description="Evaluate every N steps, or a fraction (<1) of all steps (default: at the end)."
    )
    eval_on_start: bool = Field(
        default=False, description="Evaluate before the first step (logged as step 0): the baseline to beat."
    )
    early_stopping_patience: int | None = Field(
        default=None,
        gt=0,
        description="Stop after N evaluations without a lower eval_loss; final/ then holds the best adapter.",
    )
    save_steps: int | float | None = Field(
        default=None, gt=0, description="Write a resumable checkpoint every N steps, or a fraction (<1) of all steps."
    )
    save_total_limit: int | None = Field(default=None, gt=0, description="Keep at most N checkpoints.")
    resume_from_checkpoint: str | None = Field(
        default=None, description="Checkpoint directory to resume exactly, or auto (newest under output_dir)."
    )
    sample_prompts: list[str | dict[str, str]] = Field(
        default_factory=list,
        description="Prompts completed before and after training, to compare: an instruction, or a mapping "
        "of the dataset format's fields (e.g. {instruction, input}).",
    )
    sample_max_new_tokens: int = Field(default=32, gt=0, description="Tokens generated per sample prompt.")


class EvalSaveSettings(StrictModel):
    """When to evaluate and checkpoint, in Axolotl's words: per epoch, by strategy, or every N steps."""

    evals_per_epoch: int | None = Field(
        default=None, ge=0, description="Evaluate N times per epoch (instead of eval_steps); 0: only at the end."
    )
    saves_per_epoch: int | None = Field(
        default=None, ge=0, description="Write a resumable checkpoint N times per epoch (instead of save_steps); "
        "0: none before final/.",
    )
    eval_strategy: Literal["no", "steps", "epoch"] | None = Field(
        default=None,
        description="no: never evaluate; epoch: after each epoch; steps: every eval_steps (default: inferred, "
        "else at the end).",
    )
    save_strategy: Literal["no", "steps", "epoch"] | None = Field(
        default=None,
        description="no: no checkpoints (final/ is still written); epoch: after each epoch; steps: every save_steps.",
    )
    save_first_step: bool = Field(default=False, description="Also checkpoint after the first step (a quick check).")
    # The interval rules also read eval_steps / save_steps and early_stopping_patience: they live on Config.


class BatchingSettings(StrictModel):
    """How rows form batches: padding and length grouping change speed and memory, never the loss."""

    curriculum_sampling: bool = Field(
        default=False,
        description="Train on the rows in their prepared order every epoch (no per-epoch shuffle), for curricula.",
    )
    group_by_length: bool = Field(
        default=False,
        description="Without sample_packing: batch rows of similar length together (less padding, same rows "
        "per epoch).",
    )
    pad_to_sequence_len: bool = Field(
        default=False, description="Pad every batch to sequence_len (constant shapes, less memory fragmentation)."
    )
    pad_to_multiple_of: int | None = Field(
        default=None, gt=0, description="Pad each batch's length up to a multiple of N."
    )
    # padding() also reads sequence_len (a data key): it lives on Config.


class MemorySettings(StrictModel):
    """Memory-for-compute trades beyond ``gradient_checkpointing``."""

    gradient_checkpointing_kwargs: dict[str, Any] | None = Field(
        default=None,
        description="Arguments of gradient checkpointing, e.g. {use_reentrant: false} (axlora's default).",
    )

    activation_offloading: bool = Field(
        default=False,
        description="Keep the activations saved for backward in CPU memory instead of on the GPU (less GPU memory, "
        "same losses); gradient_checkpointing: offload is gradient checkpointing with this.",
    )

    chunked_cross_entropy: bool = Field(
        default=False,
        description="Compute the loss chunk by chunk, for label tokens only, without the whole logits tensor: the "
        "same loss with far less memory for large vocabularies (Llama 3, Qwen, Gemma families; not with ZeRO-3).",
    )
    chunked_cross_entropy_num_chunks: int = Field(
        default=8, gt=0, description="Chunks the tokens of a micro batch are split into for chunked_cross_entropy."
    )

    def checkpointing_kwargs(self) -> dict[str, Any]:
        """Gradient-checkpointing arguments: non-reentrant unless the config says otherwise."""
        return {"use_reentrant": False, **(self.gradient_checkpointing_kwargs or {})}


class OutputSettings(StrictModel):
    output_dir: str = Field(default="./outputs/lora-out", description="Where the run writes its outputs.")

    @field_validator("output_dir")
    @classmethod
    def _names_a_directory(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a directory (an empty output_dir would write into the current directory)")
        return value

"""The config schema: every key a YAML file may hold, its type, default and one-line description.

Keys are flat and follow Axolotl's names where the meaning is the same, so an Axolotl LoRA config mostly
runs as it is. The fields are grouped into small settings classes (one per concern) that ``Config``
combines; each description becomes ``--help`` text and the JSON Schema ``description``.
Unknown keys are rejected (``extra="forbid"``); ``config.load`` turns that into a did-you-mean message.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

BoolOrAuto = bool | Literal["auto"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, use_attribute_docstrings=False)


class DatasetConfig(_Strict):
    """One entry of ``datasets:``: where rows come from and how to turn them into prompt/completion."""

    path: str = Field(description="Local JSON/JSONL file or directory, or a Hugging Face dataset name.")
    type: str = Field(default="alpaca", description="Row format: alpaca (instruction/input/output).")
    split: str = Field(
        default="train", description='Split to read; slicing takes part of it: "train[:20%]", "train[:500]".'
    )
    data_files: str | list[str] | None = Field(default=None, description="Files inside `path` to read.")
    name: str | None = Field(default=None, description="Dataset configuration name (Hugging Face datasets).")


class ModelSettings(_Strict):
    base_model: str = Field(
        description="Base model: a local directory, a Hugging Face model id, or a built-in demo model "
        "(axlora:tiny-llama)."
    )
    tokenizer_config: str | None = Field(
        default=None, description="Where to load the tokenizer from, when not from base_model."
    )
    trust_remote_code: bool = Field(default=False, description="Allow model code from the model repo to run.")


class AdapterSettings(_Strict):
    adapter: Literal["lora"] = Field(default="lora", description="Adapter kind to train.")
    lora_model_dir: str | None = Field(
        default=None,
        description="Existing LoRA adapter (or an earlier axlora output_dir) to continue training from.",
    )
    lora_r: int = Field(default=8, gt=0, description="LoRA rank.")
    lora_alpha: float = Field(default=16, gt=0, description="LoRA alpha; the update is scaled by alpha/r.")
    lora_dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_target_modules: list[str] | None = Field(
        default=None, description="Module names to adapt, e.g. [q_proj, v_proj]."
    )
    lora_target_linear: bool = Field(
        default=False, description="Adapt every linear layer except the output head."
    )
    peft_use_rslora: bool = Field(default=False, description="Rank-stabilised LoRA: scale by alpha/sqrt(r).")
    strict: bool = Field(
        default=False,
        description="Treat adapter settings in the YAML that contradict the loaded adapter as errors.",
    )


class DataSettings(_Strict):
    datasets: list[DatasetConfig] = Field(min_length=1, description="Training datasets, mixed together.")
    val_set_size: float = Field(
        default=0.0, ge=0, description="Validation rows held out: a fraction (<1) or a row count (>=1)."
    )
    dataset_prepared_path: str | None = Field(
        default=None, description="Where tokenized datasets are cached (default: output_dir/prepared)."
    )
    sequence_len: int = Field(default=2048, gt=1, description="Maximum tokens per sequence.")
    train_on_inputs: bool = Field(default=False, description="Also train on prompt tokens (default: mask them).")
    sample_packing: bool = Field(
        default=False, description="Pack several samples into each sequence_len row (no cross-attention)."
    )


class TrainingSettings(_Strict):
    micro_batch_size: int = Field(default=1, gt=0, description="Rows per forward pass on each process.")
    gradient_accumulation_steps: int = Field(default=1, gt=0, description="Micro batches per optimizer step.")
    num_epochs: float | None = Field(default=None, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(default=None, gt=0, description="Optimizer steps; wins over num_epochs.")
    learning_rate: float = Field(default=2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal[
        "cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"
    ] = Field(default="cosine", description="Learning-rate schedule after warm-up.")
    warmup_steps: int | None = Field(default=None, ge=0, description="Linear warm-up steps.")
    warmup_ratio: float | None = Field(default=None, ge=0, lt=1, description="Warm-up as a fraction of steps.")
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
    tf32: bool = Field(default=False, description="Allow TF32 matmuls on Ampere+ GPUs.")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations to save memory.")
    seed: int = Field(default=42, description="Seed for data order, LoRA init and dropout.")
    logging_steps: int = Field(default=5, gt=0, description="Log metrics every N optimizer steps.")
    eval_steps: int | None = Field(default=None, gt=0, description="Evaluate every N steps (default: at the end).")
    save_steps: int | None = Field(default=None, gt=0, description="Write a resumable checkpoint every N steps.")
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


class OutputSettings(_Strict):
    output_dir: str = Field(default="./outputs/lora-out", description="Where the run writes its outputs.")


class Config(ModelSettings, AdapterSettings, DataSettings, TrainingSettings, OutputSettings):
    """A whole axlora config. Cross-field rules live here so each names the keys involved."""

    model_config = ConfigDict(
        extra="forbid",
        validate_default=True,
        title="axlora config",
        json_schema_extra={"description": "axlora LoRA fine-tuning config (YAML)."},
    )

    @model_validator(mode="after")
    def _check_combinations(self) -> Config:
        problems = []
        if self.max_steps is None and self.num_epochs is None:
            problems.append("num_epochs / max_steps: set at least one of them (how long to train).")
        if (
            self.lora_model_dir is None
            and not self.lora_target_linear
            and not self.lora_target_modules
        ):
            problems.append(
                "lora_target_modules: a fresh LoRA needs target modules: list them "
                "(e.g. [q_proj, v_proj]) or set lora_target_linear: true."
            )
        if self.fp16 and self.bf16 is True:
            problems.append("fp16 / bf16: choose one of them, not both.")
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            problems.append("warmup_steps / warmup_ratio: set one of them, not both.")
        if self.val_set_size >= 1 and self.val_set_size != int(self.val_set_size):
            problems.append("val_set_size: a row count must be a whole number (or a fraction below 1).")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def derived_warmup_steps(self, total_steps: int) -> int:
        """Warm-up steps from ``warmup_steps`` or ``warmup_ratio`` (0 when neither is set)."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        if self.warmup_ratio is not None:
            return int(round(self.warmup_ratio * total_steps))
        return 0

    def effective_batch_per_process(self) -> int:
        """Rows per optimizer step on one process."""
        return self.micro_batch_size * self.gradient_accumulation_steps


def json_schema() -> dict:
    """The JSON Schema of the config, as written to ``schemas/axlora.schema.json``."""
    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema

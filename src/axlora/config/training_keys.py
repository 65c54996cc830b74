"""The training keys: optimizer and schedule, evaluation and checkpoints, batching, memory trades, output."""

from __future__ import annotations

import ast
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from axlora.config.base import StrictModel
from axlora.core.suggest import did_you_mean

BoolOrAuto = bool | Literal["auto"]
CAUSAL_LM_METRICS = ("sacrebleu", "chrf", "ter", "perplexity")
"""What do_causal_lm_eval computes (Axolotl's names; comet needs a model download and is refused)."""
EVAL_TABLE_MAX_NEW_TOKENS = 128
"""Axolotl's default for eval_table_max_new_tokens."""
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
    num_epochs: float = Field(default=1.0, gt=0, description="Passes over the training data (default 1, as in "
                              "Axolotl); max_steps wins over it.")
    max_steps: int | None = Field(default=None, gt=0, description="Optimizer steps; wins over num_epochs.")
    learning_rate: float = Field(default=2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal[
        "cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial", "one_cycle"
    ] = Field(default="cosine", description="Learning-rate schedule after warm-up (one_cycle: torch's OneCycleLR, "
              "its warm-up the warmup steps).")
    lr_scheduler_kwargs: dict[str, Any] | None = Field(
        default=None, description="Arguments of the schedule, e.g. {num_cycles: 2} for cosine_with_restarts, "
        "{lr_end: 1e-7, power: 2} for polynomial, OneCycleLR's for one_cycle; unknown names are refused.",
    )
    cosine_min_lr_ratio: float | None = Field(
        default=None, ge=0, le=1, description="With lr_scheduler: cosine, decay to this fraction of the peak "
        "learning rate instead of to 0.",
    )
    cosine_constant_lr_ratio: float | None = Field(
        default=None, ge=0, le=1, description="With cosine_min_lr_ratio: reach the minimum after this fraction of "
        "the steps and hold it from there.",
    )
    lr_div_factor: float | None = Field(
        default=None, gt=0, description="With lr_scheduler: one_cycle, start at learning_rate / lr_div_factor "
        "(OneCycleLR's div_factor; default 25).",
    )
    warmup_steps: int | float | None = Field(
        default=None, ge=0, description="Linear warm-up steps; below 1, a fraction of the steps (as transformers 5)."
    )
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
    optim_args: str | dict[str, Any] | None = Field(
        default=None, description="More arguments of the optimizer's constructor, as 'momentum=0.9,nesterov=true' or "
        "a mapping; names the optimizer does not take are refused.",
    )
    loraplus_lr_ratio: float | None = Field(
        default=None, gt=0, description="LoRA+: the LoRA B matrices learn at learning_rate times this ratio "
        "(2^4 is the paper's suggestion).",
    )
    loraplus_lr_embedding: float | None = Field(
        default=None, gt=0, description="With loraplus_lr_ratio: the learning rate of LoRA on embedding layers "
        "(default 1e-6).",
    )
    embedding_lr: float | None = Field(
        default=None, gt=0, description="Learning rate of trained embedding and output-head weights "
        "(embed_tokens, lm_head, modules_to_save), without weight decay.",
    )
    embedding_lr_scale: float | None = Field(
        default=None, gt=0, description="As embedding_lr, given as a multiple of learning_rate.",
    )
    neftune_noise_alpha: float | None = Field(
        default=None, ge=0, description="NEFTune: uniform noise of scale alpha / sqrt(tokens x width) added to the "
        "input embeddings in training steps (never in evaluation or generation); 0 or unset: off.",
    )
    max_grad_norm: float = Field(default=1.0, ge=0, description="Gradient clipping norm (0 disables).")
    router_aux_loss_coef: float | None = Field(
        default=None, ge=0, description="Mixture-of-experts models: add the router's load-balancing loss times this "
        "coefficient to each micro batch's training loss (transformers' output_router_logits); logged as aux_loss.",
    )
    bf16: BoolOrAuto = Field(default="auto", description="bfloat16 training; auto: where the GPU supports it.")
    fp16: bool = Field(default=False, description="float16 mixed precision (GPU only).")
    bfloat16: BoolOrAuto = Field(
        default=False, description="Axolotl's pure-bfloat16 switch: the base weights load in bfloat16 (as bf16: true); "
        "auto (written in some of Axolotl's examples): bfloat16 where the GPU supports it, as bf16: auto.",
    )
    float16: bool = Field(
        default=False, description="Axolotl's pure-float16 switch: the base weights load in float16 (as fp16: true; "
        "GPU only).",
    )
    float32: bool = Field(default=False, description="Load and train in float32 (as bf16: false).")

    @field_validator("float16", mode="before")
    @classmethod
    def _pure_dtype_is_a_switch(cls, value: Any) -> Any:
        """Axolotl's schema types float16 as true/false and refuses ``auto`` itself; say which key takes ``auto``."""
        if isinstance(value, str) and value.strip().lower() == "auto":
            raise ValueError("true or false (Axolotl's own schema refuses 'auto' here too); for float16 on a GPU "
                             "write fp16: true")
        return value

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
        description="Stop after N evaluations without a better metric_for_best_model (default: a lower eval_loss); "
        "final/ then holds the best adapter.",
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

    @field_validator("optim_args")
    @classmethod
    def _optim_args_parse(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(value, str):
            parse_optim_args(value)
        return value

    @model_validator(mode="after")
    def _check_schedule_and_rates(self) -> TrainingSettings:
        problems = schedule_problems(self) + learning_rate_group_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def optimizer_arguments(self) -> dict[str, Any]:
        """``optim_args`` as a mapping of typed values (empty when unset)."""
        return parse_optim_args(self.optim_args) if self.optim_args else {}

    def uses_neftune(self) -> bool:
        return bool(self.neftune_noise_alpha)


def parse_optim_args(value: str | dict[str, Any]) -> dict[str, Any]:
    """Axolotl's ``optim_args``: a mapping, or ``"k=v,k=v"`` whose values read as Python literals where they are."""
    if isinstance(value, dict):
        return dict(value)
    arguments: dict[str, Any] = {}
    for item in value.replace(" ", "").split(","):
        if not item:
            continue
        name, equals, text = item.partition("=")
        if not (name and equals):
            raise ValueError(f"expected name=value pairs separated by commas (e.g. 'momentum=0.9,nesterov=true'), "
                             f"got {item!r}")
        arguments[name] = _literal(text)
    return arguments


def _literal(text: str) -> Any:
    if text.lower() in {"true", "false"}:
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a name such as a dtype: the optimizer reads it as text


def schedule_problems(settings: TrainingSettings) -> list[str]:
    """The schedule keys that only apply to some schedules (Axolotl would ignore them elsewhere)."""
    problems = []
    cosine_extras = settings.cosine_min_lr_ratio is not None
    if cosine_extras and settings.lr_scheduler != "cosine":
        problems.append(f"cosine_min_lr_ratio: applies to lr_scheduler: cosine only (got {settings.lr_scheduler}).")
    if cosine_extras and settings.lr_quadratic_warmup:
        problems.append("cosine_min_lr_ratio / lr_quadratic_warmup: the quadratic warm-up schedule decays to 0; "
                        "choose one of them.")
    if settings.cosine_constant_lr_ratio is not None and not cosine_extras:
        problems.append("cosine_constant_lr_ratio: holds the minimum of cosine_min_lr_ratio; set that too.")
    if settings.lr_div_factor is not None and settings.lr_scheduler != "one_cycle":
        problems.append(f"lr_div_factor: applies to lr_scheduler: one_cycle only (got {settings.lr_scheduler}).")
    if settings.lr_scheduler_kwargs and (cosine_extras or settings.lr_quadratic_warmup):
        problems.append("lr_scheduler_kwargs: the schedule of cosine_min_lr_ratio / lr_quadratic_warmup takes no "
                        "further arguments; remove one of them.")
    return problems


def learning_rate_group_problems(settings: TrainingSettings) -> list[str]:
    """LoRA+ and the embedding learning rate each set the groups of the optimizer: one of them at a time."""
    problems = []
    if settings.embedding_lr is not None and settings.embedding_lr_scale is not None:
        problems.append("embedding_lr / embedding_lr_scale: set one of them, not both.")
    if settings.loraplus_lr_ratio is not None and (settings.embedding_lr or settings.embedding_lr_scale):
        problems.append("loraplus_lr_ratio / embedding_lr: LoRA+ sets the embedding rate itself "
                        "(loraplus_lr_embedding); remove embedding_lr / embedding_lr_scale.")
    if settings.loraplus_lr_embedding is not None and settings.loraplus_lr_ratio is None:
        problems.append("loraplus_lr_embedding: applies with loraplus_lr_ratio only; set that too.")
    return problems


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
    do_causal_lm_eval: bool = Field(
        default=False, description="At each evaluation, also complete validation rows greedily and score the answers "
        "with eval_causal_lm_metrics (logged as eval_<metric>).",
    )
    eval_causal_lm_metrics: list[str] = Field(
        default_factory=lambda: list(CAUSAL_LM_METRICS), description="Metrics of do_causal_lm_eval: sacrebleu, chrf, "
        "ter (with the sacrebleu package) and perplexity (of the reference answers given their prompts).",
    )
    eval_max_new_tokens: int = Field(default=128, gt=0, description="Tokens generated per row by do_causal_lm_eval.")
    eval_causal_lm_max_rows: int = Field(
        default=64, gt=0, description="do_causal_lm_eval completes at most this many validation rows (the first).",
    )

    eval_table_size: int | None = Field(
        default=None, ge=0, description="At each evaluation, complete this many validation rows greedily and write "
        "prompt, reference and prediction to logs/eval_predictions.jsonl (and a table to W&B or MLflow when on).",
    )
    eval_table_max_new_tokens: int | None = Field(
        default=None, gt=0, description=f"Tokens generated per row of the eval_table_size predictions (default "
        f"{EVAL_TABLE_MAX_NEW_TOKENS}).",
    )
    load_best_model_at_end: bool = Field(
        default=False, description="final/ holds the adapter of the evaluation with the best metric_for_best_model, "
        "not the last one (early_stopping_patience implies it).",
    )
    metric_for_best_model: str | None = Field(
        default=None, description="The evaluation metric that picks the best adapter and that early stopping "
        "watches: any eval_* value of the metrics log (eval_loss, eval_perplexity, ...; the eval_ prefix may be "
        "left out). Default: eval_loss.",
    )
    greater_is_better: bool | None = Field(
        default=None, description="Whether a higher metric_for_best_model is better (default: false for a name "
        "ending in loss, true otherwise, as in transformers).",
    )

    def eval_table_tokens(self) -> int:
        return self.eval_table_max_new_tokens or EVAL_TABLE_MAX_NEW_TOKENS

    def best_metric(self) -> tuple[str, bool]:
        """The metric that picks the best adapter, with the eval_ prefix, and whether higher is better."""
        name = self.metric_for_best_model or "eval_loss"
        if name == "loss" or not name.startswith("eval_"):
            name = f"eval_{name}"
        higher = self.greater_is_better if self.greater_is_better is not None else not name.endswith("loss")
        return name, higher

    @field_validator("eval_causal_lm_metrics")
    @classmethod
    def _known_metrics(cls, value: list[str]) -> list[str]:
        for name in value:
            if name == "comet":
                raise ValueError("comet scores with a COMET model from the Hub, which axlora does not load; use "
                                 "sacrebleu, chrf, ter or perplexity")
            if name not in CAUSAL_LM_METRICS:
                raise ValueError(f"unknown metric '{name}'{did_you_mean(name, CAUSAL_LM_METRICS)}; choose from "
                                 f"{', '.join(CAUSAL_LM_METRICS)}")
        return value
    # The interval rules also read eval_steps / save_steps and early_stopping_patience: they live on Config.


class BatchingSettings(StrictModel):
    """How rows form batches: padding and length grouping change speed and memory, never the loss."""

    curriculum_sampling: bool = Field(
        default=False,
        description="Train on the rows in their prepared order every epoch (no per-epoch shuffle), for curricula.",
    )
    dataloader_drop_last: bool = Field(
        default=False,
        description="Leave out each epoch's last, shorter step (fewer rows than micro_batch_size x "
        "gradient_accumulation_steps x processes); by default it is trained, its loss normalized by its own tokens.",
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

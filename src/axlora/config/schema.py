"""The config schema: every key a YAML file may hold, its type, default and one-line description.

Keys are flat and follow Axolotl's names where the meaning is the same, so an Axolotl LoRA config mostly
runs as it is. The fields are grouped into small settings classes (one per concern) that ``Config``
combines; each description becomes ``--help`` text and the JSON Schema ``description``.
Unknown keys are rejected (``extra="forbid"``); ``config.load`` turns that into a did-you-mean message.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from axlora.core.suggest import did_you_mean

BoolOrAuto = bool | Literal["auto"]
DatasetType = Literal["alpaca", "chat_template", "sharegpt", "completion", "input_output"]
DATASET_TYPES: tuple[str, ...] = get_args(DatasetType)


_CHAT_KEYS = (
    "chat_template", "chat_template_jinja", "field_messages", "message_property_mappings", "roles", "roles_to_train",
    "train_on_eos", "message_field_training",
)
_KEYS_OF_TYPE = {"chat_template": _CHAT_KEYS, "sharegpt": _CHAT_KEYS, "completion": ("field",)}
"""Dataset keys that only some types read: set on another type, they are an error (never silently ignored)."""


def _known_chat_template(value: str | None) -> str | None:
    """A chat_template value: a Jinja string passes; a name must be one axlora knows."""
    from axlora.config.chat_templates import TEMPLATE_CHOICES, is_jinja

    if value is None or is_jinja(value):
        return value
    name = value.removeprefix("tokenizer_default_fallback_")
    if name not in TEMPLATE_CHOICES:
        raise ValueError(f"unknown chat template '{value}'{did_you_mean(name, TEMPLATE_CHOICES)}")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, use_attribute_docstrings=False)


class DatasetConfig(_Strict):
    """One entry of ``datasets:``: where rows come from and how to turn them into tokens and labels.

    Keys follow Axolotl's. Keys that only mean something for some ``type``s are refused on the others, so a
    misplaced key is an error rather than silently ignored.
    """

    path: str = Field(
        description="Local JSON/JSONL/Parquet/CSV/Arrow file or directory, or a Hugging Face dataset name."
    )
    type: DatasetType | None = Field(
        default=None,
        description="Row format: alpaca, chat_template, sharegpt, completion, input_output; empty: pre-tokenized "
        "rows (input_ids, optional labels and attention_mask).",
    )
    split: str = Field(
        default="train", description='Split to read; slicing takes part of it: "train[:20%]", "train[:500]".'
    )
    data_files: str | list[str] | None = Field(
        default=None, description="Files to read: inside a local `path` directory, or of a Hub dataset."
    )
    name: str | None = Field(default=None, description="Dataset configuration name (Hugging Face datasets).")
    revision: str | None = Field(default=None, description="Hub dataset revision (commit, tag or branch) to read.")
    ds_type: Literal["json", "parquet", "csv", "arrow", "text"] | None = Field(
        default=None, description="File format of local files whose suffix does not say it (default: from suffix)."
    )
    sample: float | None = Field(
        default=None,
        gt=0,
        description="axlora: take part of this dataset at random (by `seed`), after `split`: a fraction (<1) or a "
        "row count (>=1). For mixing some old data into a continued run.",
    )
    field: str | None = Field(default=None, description="completion: the column holding the text (default: text).")
    chat_template: str | None = Field(
        default=None,
        description="chat_template/sharegpt: template for this dataset (overrides the top-level chat_template): "
        "tokenizer_default, a built-in name (chatml, llama3, ...), jinja, or a Jinja template string.",
    )
    chat_template_jinja: str | None = Field(
        default=None, description="chat_template/sharegpt: a Jinja chat template for this dataset."
    )
    field_messages: str | None = Field(
        default=None,
        description="chat_template/sharegpt: the column holding the message list (default: messages; sharegpt: "
        "conversations).",
    )
    message_property_mappings: dict[str, str] | None = Field(
        default=None,
        description="chat_template/sharegpt: message keys to read each property from, e.g. {role: from, "
        "content: value} (default: role/content; sharegpt: from/value).",
    )
    roles: dict[str, list[str]] | None = Field(
        default=None,
        description="chat_template/sharegpt: role names in the data for each template role, e.g. {user: [human], "
        "assistant: [gpt]} (default: human->user, gpt->assistant).",
    )
    roles_to_train: list[str] = Field(
        default_factory=lambda: ["assistant"],
        description="chat_template/sharegpt: roles whose message content is trained on.",
    )
    train_on_eos: Literal["turn", "all", "last", "none"] = Field(
        default="turn",
        description="chat_template/sharegpt: which end-of-turn tokens are trained: after each trained turn (turn), "
        "after every turn (all), after the last turn only (last), or none.",
    )
    message_field_training: str | None = Field(
        default=None,
        description="chat_template/sharegpt: a message key holding true/false that overrides roles_to_train for "
        "that message.",
    )

    @field_validator("type", mode="before")
    @classmethod
    def _known_type(cls, value):
        if value == "":
            return None  # Axolotl: an empty `type:` means pre-tokenized rows
        if isinstance(value, str) and value not in DATASET_TYPES:
            raise ValueError(f"unknown type '{value}'{did_you_mean(value, DATASET_TYPES)}")
        return value

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value):
        return _known_chat_template(value)

    @field_validator("sample")
    @classmethod
    def _whole_count(cls, value):
        if value is not None and value >= 1 and value != int(value):
            raise ValueError("a row count must be a whole number (or a fraction below 1)")
        return value

    @field_validator(*_CHAT_KEYS, "field")
    @classmethod
    def _used_by_the_type(cls, value, info: ValidationInfo):
        if "type" not in info.data:  # the type itself is wrong: that error is enough
            return value
        kind = info.data["type"]
        default = cls.model_fields[info.field_name].get_default(call_default_factory=True)
        if value != default and info.field_name not in _KEYS_OF_TYPE.get(kind, ()):
            raise ValueError(f"not used by type {kind or '(empty: pre-tokenized rows)'}; remove it or change `type`")
        return value


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
    allow_base_mismatch: bool = Field(
        default=False,
        description="Continue a lora_model_dir adapter whose recorded base model has another name than "
        "base_model (a copy or local snapshot of it); module shapes must still fit.",
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
    excess_length_strategy: Literal["drop", "truncate", "raise"] = Field(
        default="drop",
        description="Samples longer than sequence_len: drop them, truncate them to sequence_len, or raise an error.",
    )
    dataset_processes: int | None = Field(
        default=None, gt=0, description="Processes that prepare large datasets (default: the CPUs available)."
    )

    def val_row_count(self, total: int) -> int:
        """Validation rows of ``total``: ``val_set_size`` as a fraction (<1) or a count (>=1), always leaving a
        training row."""
        if self.val_set_size <= 0:
            return 0
        if self.val_set_size < 1:
            return min(max(1, int(round(self.val_set_size * total))), max(total - 1, 0))
        return min(int(self.val_set_size), max(total - 1, 0))


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
    tf32: BoolOrAuto = Field(default=False, description="Allow TF32 matmuls on Ampere+ GPUs (auto: where supported).")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations to save memory.")
    seed: int = Field(default=42, description="Seed for data order, LoRA init and dropout.")
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


class OutputSettings(_Strict):
    output_dir: str = Field(default="./outputs/lora-out", description="Where the run writes its outputs.")


class SpecialTokens(_Strict):
    """``special_tokens:``: tokens to set (or add) as the tokenizer's special tokens, as in Axolotl."""

    bos_token: str | None = Field(default=None, description="Beginning-of-sequence token.")
    eos_token: str | None = Field(default=None, description="End-of-sequence token.")
    pad_token: str | None = Field(default=None, description="Padding token.")
    unk_token: str | None = Field(default=None, description="Unknown-word token.")
    additional_special_tokens: list[str] | None = Field(
        default=None, description="Extra special tokens (never split, skipped when decoding)."
    )


class TokenizerSettings(_Strict):
    """How the model and tokenizer classes are chosen and which tokens a run adds (Axolotl's model keys)."""

    model_type: str | None = Field(
        default=None,
        description="Model class to load: AutoModelForCausalLM (default) or a transformers ...ForCausalLM class.",
    )
    tokenizer_type: str | None = Field(
        default=None, description="Tokenizer class to load: AutoTokenizer (default) or a transformers class name."
    )
    tokenizer_use_fast: bool | None = Field(default=None, description="Load the fast (Rust) tokenizer.")
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
        return _known_chat_template(value)

    @field_validator("model_type")
    @classmethod
    def _causal_lm_only(cls, value: str | None) -> str | None:
        if value is not None and not value.endswith("ForCausalLM"):
            raise ValueError(
                f"axlora trains causal language models: use AutoModelForCausalLM or a ...ForCausalLM class, "
                f"not '{value}' (multimodal and other heads are not supported)"
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
    "flex_attention": "flex_attention",
    "eager_attention": "eager",
}
"""Axolotl's boolean attention switches and the transformers implementation each selects.

xformers is not a transformers backend; PyTorch's SDPA runs the same memory-efficient kernel."""

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


class AttentionSettings(_Strict):
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
    flex_attention: bool = Field(default=False, description="Use PyTorch flex attention.")
    eager_attention: bool = Field(default=False, description="Use the plain (eager) attention implementation.")

    @model_validator(mode="after")
    def _one_attention_choice(self) -> AttentionSettings:
        chosen = [flag for flag in ATTENTION_FLAGS if getattr(self, flag)]
        if self.attn_implementation is not None:
            value = self.attn_implementation
            if value not in ATTENTION_IMPLEMENTATIONS and "/" not in value:
                raise ValueError(
                    f"attn_implementation: '{value}' is not available in axlora; use one of "
                    f"{', '.join(ATTENTION_IMPLEMENTATIONS)} or a Hub kernel (kernels-community/...)."
                )
            chosen.insert(0, "attn_implementation")
        if len(chosen) > 1:
            raise ValueError(f"{' / '.join(chosen)}: choose one attention implementation, not {len(chosen)}.")
        return self

    def attention_implementation(self) -> str | None:
        """The transformers ``attn_implementation`` to load the model with (None: transformers' default)."""
        if self.attn_implementation is not None:
            return self.attn_implementation
        for flag, implementation in ATTENTION_FLAGS.items():
            if getattr(self, flag):
                return implementation
        return None


class QuantizationSettings(_Strict):
    """Quantized base weights (QLoRA): the base model loads in 4 or 8 bits with bitsandbytes; LoRA trains on top."""

    load_in_4bit: bool = Field(
        default=False, description="Load the base model in 4-bit NF4 with double quantization (QLoRA); CUDA only."
    )
    load_in_8bit: bool = Field(default=False, description="Load the base model in 8-bit (LLM.int8); CUDA only.")
    bnb_config_kwargs: dict[str, Any] | None = Field(
        default=None, description="Overrides of the bitsandbytes quantization config (BitsAndBytesConfig keys)."
    )

    @model_validator(mode="after")
    def _one_quantization(self) -> QuantizationSettings:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("load_in_4bit / load_in_8bit: choose one of them, not both.")
        if getattr(self, "adapter", None) == "qlora" and self.load_in_8bit:
            raise ValueError("load_in_8bit / adapter: qlora trains on a 4-bit base; use load_in_4bit or adapter: lora.")
        return self

    def quantization_bits(self) -> int | None:
        """4 or 8 when the base weights load quantized (``adapter: qlora`` implies 4), else None."""
        if self.load_in_4bit or getattr(self, "adapter", None) == "qlora":
            return 4
        return 8 if self.load_in_8bit else None


class PeftSettings(_Strict):
    """LoRA variants and extra trainable modules, passed to peft's ``LoraConfig`` for a fresh adapter."""

    peft_use_dora: bool = Field(default=False, description="DoRA: learn a magnitude per output besides the LoRA.")
    lora_modules_to_save: list[str] | None = Field(
        default=None,
        description="Modules trained and saved in full besides the LoRA, e.g. [embed_tokens, lm_head] after "
        "adding tokens.",
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
        }
        return {key: value for key, value in values.items() if value is not None}


class EvalSaveSettings(_Strict):
    """When to evaluate and checkpoint, in Axolotl's words: per epoch, by strategy, or every N steps."""

    evals_per_epoch: int | None = Field(
        default=None, gt=0, description="Evaluate N times per epoch (instead of eval_steps)."
    )
    saves_per_epoch: int | None = Field(
        default=None, gt=0, description="Write a resumable checkpoint N times per epoch (instead of save_steps)."
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

    @model_validator(mode="after")
    def _check_intervals(self) -> EvalSaveSettings:
        problems = []
        for kind in ("eval", "save"):
            steps = getattr(self, f"{kind}_steps", None)
            per_epoch = getattr(self, f"{kind}s_per_epoch")
            strategy = getattr(self, f"{kind}_strategy")
            if steps is not None and per_epoch is not None:
                problems.append(f"{kind}_steps / {kind}s_per_epoch: set one of them, not both.")
            if steps is not None and steps >= 1 and steps != int(steps):
                problems.append(f"{kind}_steps: a step count must be whole (or a fraction below 1 of all steps).")
            if strategy == "no" and (steps is not None or per_epoch is not None):
                problems.append(f"{kind}_strategy: 'no' contradicts {kind}_steps / {kind}s_per_epoch.")
            if strategy == "steps" and steps is None and per_epoch is None:
                problems.append(f"{kind}_strategy: 'steps' needs {kind}_steps (or {kind}s_per_epoch).")
        if self.eval_strategy == "no" and getattr(self, "early_stopping_patience", None):
            problems.append("eval_strategy / early_stopping_patience: early stopping needs evaluations; "
                            "eval_strategy: no turns them off.")
        if problems:
            raise ValueError("\n".join(problems))
        return self


class BatchingSettings(_Strict):
    """How rows form batches: padding and length grouping change speed and memory, never the loss."""

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

    def padding(self) -> dict[str, Any]:
        """Keyword arguments for the collators' padding policy."""
        return {
            "pad_to_multiple_of": self.pad_to_multiple_of,
            "sequence_len": getattr(self, "sequence_len", None),
            "pad_to_sequence_len": self.pad_to_sequence_len,
        }


class MemorySettings(_Strict):
    """Memory-for-compute trades beyond ``gradient_checkpointing``."""

    gradient_checkpointing_kwargs: dict[str, Any] | None = Field(
        default=None,
        description="Arguments of gradient checkpointing, e.g. {use_reentrant: false} (axlora's default).",
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


class LoggingSettings(_Strict):
    """Experiment trackers (Weights & Biases, MLflow): used only when asked for; axlora sends nothing itself."""

    use_wandb: bool | None = Field(default=None, description="Log to Weights & Biases (default: when wandb_project is set).")
    wandb_project: str | None = Field(default=None, description="W&B project; setting it turns W&B logging on.")
    wandb_entity: str | None = Field(default=None, description="W&B team or user the run belongs to.")
    wandb_name: str | None = Field(default=None, description="W&B run name.")
    wandb_run_id: str | None = Field(default=None, description="W&B run id (a resumed run continues it).")
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(
        default=None, description="online, offline (sync later with `wandb sync`), or disabled."
    )
    wandb_watch: Literal["gradients", "parameters", "all"] | bool | None = Field(
        default=None, description="Log histograms of the trainable weights' gradients (true), parameters or all."
    )
    wandb_log_model: Literal["end"] | bool | None = Field(
        default=None, description="end (or true): upload the final adapter to W&B as a model artifact."
    )
    use_mlflow: bool | None = Field(
        default=None, description="Log to MLflow (default: when mlflow_tracking_uri or mlflow_experiment_name is set)."
    )
    mlflow_tracking_uri: str | None = Field(default=None, description="MLflow tracking server URI (or a local path).")
    mlflow_experiment_name: str | None = Field(default=None, description="MLflow experiment name.")
    mlflow_run_name: str | None = Field(default=None, description="MLflow run name.")
    hf_mlflow_log_artifacts: bool = Field(
        default=False, description="Upload the final adapter to MLflow as run artifacts."
    )

    def wandb_enabled(self) -> bool:
        if self.use_wandb is not None:
            return self.use_wandb and self.wandb_mode != "disabled"
        return bool(self.wandb_project) and self.wandb_mode != "disabled"

    def mlflow_enabled(self) -> bool:
        if self.use_mlflow is not None:
            return self.use_mlflow
        return bool(self.mlflow_tracking_uri or self.mlflow_experiment_name)


class HubSettings(_Strict):
    """Publishing the trained adapter to the Hugging Face Hub at the end of a run."""

    hub_model_id: str | None = Field(
        default=None, description="Hub repo (user/name) that final/ is pushed to at the end; created private if new."
    )
    hub_strategy: Literal["end"] | None = Field(
        default=None, description="When to push: end (the final adapter, once training is complete)."
    )
    hub_revision: str | None = Field(default=None, description="Branch to push to (default: main).")


FSDP_OPTIONS = ("full_shard", "shard_grad_op", "auto_wrap", "offload")
# FSDP1 settings that FSDP2 (what axlora runs) has no counterpart for: read and reported, never acted on
FSDP1_ONLY = ("use_orig_params", "sync_module_states", "limit_all_gathers", "forward_prefetch", "backward_prefetch",
              "backward_prefetch_policy")


class FsdpConfig(_Strict):
    """``fsdp_config:``: how FSDP shards the base model. Axolotl's FSDP1 spellings (``fsdp_offload_params``) work too."""

    offload_params: bool = Field(default=False, description="Keep the sharded base weights in CPU RAM (GPUs only).")
    reshard_after_forward: bool = Field(
        default=True, description="Free the gathered weights after each layer's forward (FULL_SHARD); false keeps "
        "them until backward (SHARD_GRAD_OP): faster, more memory."
    )
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP"] | None = Field(
        default=None, description="FSDP1 name of reshard_after_forward (FULL_SHARD: true, SHARD_GRAD_OP: false)."
    )
    auto_wrap_policy: Literal["TRANSFORMER_BASED_WRAP"] = Field(
        default="TRANSFORMER_BASED_WRAP", description="Shard per transformer layer (the only policy axlora runs)."
    )
    transformer_layer_cls_to_wrap: list[str] | None = Field(
        default=None, description="Layer classes sharded as one unit (default: the model's decoder layer class)."
    )
    state_dict_type: Literal["FULL_STATE_DICT", "SHARDED_STATE_DICT", "LOCAL_STATE_DICT"] = Field(
        default="FULL_STATE_DICT",
        description="Accepted for Axolotl configs: axlora always writes a whole adapter (it is never sharded).",
    )
    activation_checkpointing: bool = Field(default=False, description="Same as gradient_checkpointing: true.")
    cpu_ram_efficient_loading: bool = Field(
        default=False, description="Only rank 0 reads the base weights; the other processes build the model empty "
        "and receive their shards from it (CPU RAM for one copy of the base instead of one per process)."
    )
    version: Literal[1, 2] | None = Field(default=None, description="Same as fsdp_version.")
    use_orig_params: bool | None = Field(default=None, description="FSDP1 only; FSDP2 has no such setting.")
    sync_module_states: bool | None = Field(default=None, description="FSDP1 only; FSDP2 has no such setting.")
    limit_all_gathers: bool | None = Field(default=None, description="FSDP1 only; FSDP2 has no such setting.")
    forward_prefetch: bool | None = Field(default=None, description="FSDP1 only; FSDP2 has no such setting.")
    backward_prefetch: str | None = Field(default=None, description="FSDP1 only; FSDP2 has no such setting.")
    backward_prefetch_policy: str | None = Field(default=None, description="FSDP1 only; FSDP2 has no such setting.")

    @model_validator(mode="before")
    @classmethod
    def _read_fsdp1_names(cls, data: Any) -> Any:
        """``fsdp_offload_params`` -> ``offload_params``; sharding strategies given as accelerate's numbers."""
        if not isinstance(data, dict):
            return data
        renamed: dict[str, Any] = {}
        for key, value in data.items():
            name = key.removeprefix("fsdp_") if isinstance(key, str) else key
            if name in renamed:
                raise ValueError(f"'{key}' and '{name}' are the same setting; keep one of them")
            renamed[name] = value
        strategy = renamed.get("sharding_strategy")
        if isinstance(strategy, int) or (isinstance(strategy, str) and strategy.isdigit()):
            renamed["sharding_strategy"] = {1: "FULL_SHARD", 2: "SHARD_GRAD_OP"}.get(int(strategy), strategy)
        if isinstance(renamed.get("transformer_layer_cls_to_wrap"), str):
            renamed["transformer_layer_cls_to_wrap"] = [
                name.strip() for name in renamed["transformer_layer_cls_to_wrap"].split(",") if name.strip()
            ]
        return renamed


class HardwareSettings(_Strict):
    """How many processes and machines train, and how the model is sharded across them (DeepSpeed ZeRO or FSDP)."""

    num_processes: int | None = Field(
        default=None, gt=0, description="Processes per machine (default: every visible GPU, else 1)."
    )
    num_machines: int = Field(default=1, gt=0, description="Machines taking part (one axlora train per machine).")
    machine_rank: int = Field(default=0, ge=0, description="This machine's rank, 0 .. num_machines-1.")
    main_process_ip: str | None = Field(default=None, description="Address of the rank-0 machine (multi-node).")
    main_process_port: int = Field(default=29500, gt=0, lt=65536, description="Port of the rank-0 machine.")
    ddp_timeout: int = Field(default=1800, gt=0, description="Seconds a process waits for the others (NCCL/gloo).")
    deepspeed: str | None = Field(
        default=None,
        description="DeepSpeed ZeRO: a shipped preset (zero1, zero2, zero3, zero3_offload) or the path of a "
        "DeepSpeed JSON config; batch size, accumulation, clipping and precision come from this YAML.",
    )

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_preset_or_json(cls, value: str | None) -> str | None:
        from axlora.config.deepspeed_presets import PRESETS

        if value is None or value in PRESETS or value.endswith(".json"):
            return value
        raise ValueError(f"'{value}' is neither a shipped preset{did_you_mean(value, PRESETS)} nor a .json file")

    fsdp: list[str] | None = Field(
        default=None,
        description="FSDP (PyTorch's fully sharded data parallel) in Axolotl's FSDP1 form, e.g. [full_shard, auto_wrap]; "
        "fsdp_config alone turns it on too.",
    )
    fsdp_version: Literal[1, 2] | None = Field(
        default=None, description="Axolotl's FSDP version key; axlora always runs FSDP2 (fully_shard)."
    )
    fsdp_config: FsdpConfig | None = Field(default=None, description="FSDP settings; setting it turns FSDP on.")

    @field_validator("fsdp", mode="before")
    @classmethod
    def _fsdp_options(cls, value: Any) -> Any:
        if isinstance(value, str):  # accelerate/transformers write "full_shard auto_wrap"
            value = value.split()
        for option in value or []:
            if option not in FSDP_OPTIONS:
                reason = " (hybrid sharding across machines is not supported)" if "hybrid" in str(option) else ""
                raise ValueError(f"unknown FSDP option '{option}'{reason}{did_you_mean(str(option), FSDP_OPTIONS)}")
        return value

    def uses_fsdp(self) -> bool:
        return bool(self.fsdp) or self.fsdp_config is not None


class Config(
    # pydantic lists fields from the last base to the first: core keys first, Axolotl extras after
    HardwareSettings,
    HubSettings,
    LoggingSettings,
    MemorySettings,
    BatchingSettings,
    EvalSaveSettings,
    PeftSettings,
    QuantizationSettings,
    AttentionSettings,
    TokenizerSettings,
    ModelSettings,
    AdapterSettings,
    DataSettings,
    TrainingSettings,
    OutputSettings,
):
    """A whole axlora config. Cross-field rules live here so each names the keys involved."""

    model_config = ConfigDict(
        extra="forbid",
        validate_default=True,
        title="axlora config",
        json_schema_extra={"description": "axlora LoRA fine-tuning config (YAML)."},
    )

    @model_validator(mode="before")
    @classmethod
    def _read_fsdp_activation_checkpointing(cls, data: Any) -> Any:
        """``fsdp_config.activation_checkpointing`` is FSDP's name for ``gradient_checkpointing``."""
        fsdp_config = data.get("fsdp_config") if isinstance(data, dict) else None
        if isinstance(fsdp_config, dict) and fsdp_config.get("activation_checkpointing") is True:
            return {**data, "gradient_checkpointing": True}
        return data

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
        problems += self._fsdp_problems()
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _fsdp_problems(self) -> list[str]:
        if not self.uses_fsdp():
            if self.fsdp_version is not None:
                return ["fsdp_version: FSDP is on only with fsdp_config (or fsdp: [full_shard, auto_wrap]); add it."]
            return []
        problems = []
        if {"full_shard", "shard_grad_op"} <= set(self.fsdp or ()):
            problems.append("fsdp: full_shard and shard_grad_op are two sharding strategies; keep one.")
        if self.deepspeed:
            problems.append("fsdp / deepspeed: choose one way of sharding the model, not both.")
        if self.quantization_bits():
            problems.append("fsdp: not with a quantized base (load_in_4bit / load_in_8bit); "
                            "use one GPU or DeepSpeed zero2 for QLoRA.")
        if self.chunked_cross_entropy:
            problems.append("chunked_cross_entropy: not with FSDP, which shards the output head's weight; "
                            "turn one of them off.")
        return problems

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
    from axlora.config.axolotl import noop_schema_properties

    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["properties"].update(noop_schema_properties())  # Axolotl keys accepted with no effect
    return schema

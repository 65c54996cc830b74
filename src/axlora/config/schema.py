"""The config schema: every key a YAML file may hold, its type, default and one-line description.

Keys are flat and follow Axolotl's names where the meaning is the same, so an Axolotl LoRA config mostly
runs as it is. The fields are grouped into small settings classes (one per concern, in the modules below)
that ``Config`` combines; each description becomes ``--help`` text and the JSON Schema ``description``.
Unknown keys are rejected (``extra="forbid"``); ``config.load`` turns that into a did-you-mean message.

The sections live by concern: ``datasets`` (dataset entries, data keys), ``model_keys`` (model, tokenizer,
attention, quantization), ``adapter_keys`` (LoRA, peft), ``training_keys`` (training, eval/save, batching,
memory, output), ``tracking`` (loggers, Hub) and ``hardware`` (processes, DeepSpeed, FSDP). Rules that read
keys of more than one section live on ``Config``. The names other code imports from here stay importable.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import ConfigDict, model_validator

from axlora.config.adapter_keys import AdapterSettings, PeftSettings
from axlora.config.axolotl import noop_schema_properties
from axlora.config.block_diffusion_keys import BlockDiffusionSettings
from axlora.config.datasets import DataSettings
from axlora.config.diffusion_keys import DiffusionKeys
from axlora.config.hardware import HardwareSettings
from axlora.config.kernel_keys import KernelSettings
from axlora.config.model_keys import (
    AttentionSettings,
    ModelSettings,
    QuantizationSettings,
    TokenizerSettings,
)
from axlora.config.preference_keys import PreferenceSettings
from axlora.config.relora_keys import ReLoRASettings
from axlora.config.tracking import HubSettings, LoggingSettings
from axlora.config.training_keys import (
    BatchingSettings,
    EvalSaveSettings,
    MemorySettings,
    OutputSettings,
    TrainingSettings,
)


class Config(
    # pydantic lists fields from the last base to the first: core keys first, Axolotl extras after
    BlockDiffusionSettings,
    DiffusionKeys,
    ReLoRASettings,
    KernelSettings,
    PreferenceSettings,  # before DataSettings: its ``datasets`` also takes preference entries
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
        """``fsdp_config.activation_checkpointing`` (FSDP1: ``fsdp_activation_checkpointing``) is FSDP's name for
        ``gradient_checkpointing``."""
        fsdp_config = data.get("fsdp_config") if isinstance(data, dict) else None
        if isinstance(fsdp_config, dict) and any(
            str(key).removeprefix("fsdp_") == "activation_checkpointing" and value is True
            for key, value in fsdp_config.items()
        ):
            return {**data, "gradient_checkpointing": True}
        return data

    @model_validator(mode="before")
    @classmethod
    def _read_offload_checkpointing(cls, data: Any) -> Any:
        """Axolotl's ``gradient_checkpointing: offload`` is gradient checkpointing plus ``activation_offloading``."""
        if isinstance(data, dict) and data.get("gradient_checkpointing") == "offload":
            if data.get("activation_offloading") is False:
                raise ValueError("gradient_checkpointing / activation_offloading: 'offload' asks for activation "
                                 "offloading, activation_offloading: false says not to.")
            return {**data, "gradient_checkpointing": True, "activation_offloading": True}
        return data

    @model_validator(mode="before")
    @classmethod
    def _no_dropout_on_parameters(cls, data: Any) -> Any:
        """peft's LoRA on parameters (lora_target_parameters) has no dropout: the default becomes 0, as in Axolotl."""
        if isinstance(data, dict) and data.get("lora_target_parameters") and data.get("lora_dropout") is None:
            return {**data, "lora_dropout": 0.0}
        return data

    @model_validator(mode="before")
    @classmethod
    def _read_batch_size(cls, data: Any) -> Any:
        """Axolotl's ``batch_size`` is rows per optimizer step on each process: it sets the accumulation."""
        if not isinstance(data, dict) or data.get("batch_size") is None:
            return data
        if data.get("gradient_accumulation_steps") is not None:
            raise ValueError("batch_size / gradient_accumulation_steps: set one of them, not both (batch_size "
                             "sets gradient_accumulation_steps = batch_size // micro_batch_size).")
        batch, micro = data["batch_size"], data.get("micro_batch_size", 1)
        if isinstance(batch, int) and isinstance(micro, int) and micro > 0:
            if batch < micro:
                raise ValueError(f"batch_size: {batch} is smaller than micro_batch_size {micro}.")
            return {**data, "gradient_accumulation_steps": batch // micro}
        return data

    # The "after" rules run in the order they are defined, after those of the sections; the first that fails
    # is the error reported, so this order is part of what a config with several problems is told.
    @model_validator(mode="after")
    def _check_qlora_base(self) -> Config:
        if self.adapter == "qlora" and self.model_quantization_config:
            raise ValueError("model_quantization_config / adapter: qlora loads a bitsandbytes 4-bit base; use adapter: "
                             "lora with model_quantization_config.")
        if self.quantize_moe_experts and not self.quantization_bits():
            raise ValueError("quantize_moe_experts: quantizes the experts like the rest of a quantized base; set "
                             "load_in_4bit: true (or adapter: qlora) or load_in_8bit: true.")
        if self.llama4_linearized_experts and self.quantize_moe_experts:
            raise ValueError("llama4_linearized_experts / quantize_moe_experts: linearized experts are linear layers, "
                             "which load_in_4bit quantizes with the others; remove quantize_moe_experts.")
        if self.adapter == "qlora" and self.load_in_8bit:
            raise ValueError("load_in_8bit / adapter: qlora trains on a 4-bit base; use load_in_4bit or adapter: lora.")
        return self

    @model_validator(mode="after")
    def _check_intervals(self) -> Config:
        """Evaluation and checkpoint intervals: ``*_steps`` (training keys) against the eval/save keys."""
        problems = self._interval_problems("eval") + self._interval_problems("save")
        if self.eval_strategy == "no" and self.early_stopping_patience:
            problems.append("eval_strategy / early_stopping_patience: early stopping needs evaluations; "
                            "eval_strategy: no turns them off.")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _interval_problems(self, kind: str) -> list[str]:
        """What is wrong with the ``eval`` or ``save`` interval settings."""
        steps = getattr(self, f"{kind}_steps")
        per_epoch = getattr(self, f"{kind}s_per_epoch")
        strategy = getattr(self, f"{kind}_strategy")
        problems = []
        if steps is not None and per_epoch is not None:
            problems.append(f"{kind}_steps / {kind}s_per_epoch: set one of them, not both.")
        if steps is not None and steps >= 1 and steps != int(steps):
            problems.append(f"{kind}_steps: a step count must be whole (or a fraction below 1 of all steps).")
        if strategy == "no" and (steps is not None or per_epoch is not None):
            problems.append(f"{kind}_strategy: 'no' contradicts {kind}_steps / {kind}s_per_epoch.")
        if strategy == "steps" and steps is None and per_epoch is None:
            problems.append(f"{kind}_strategy: 'steps' needs {kind}_steps (or {kind}s_per_epoch).")
        return problems

    @model_validator(mode="after")
    def _check_combinations(self) -> Config:
        problems = []
        if (
            self.lora_model_dir is None
            and not self.lora_target_linear
            and not self.lora_target_modules
            and not self.lora_target_parameters
        ):
            problems.append(
                "lora_target_modules: a fresh LoRA needs target modules: list them "
                "(e.g. [q_proj, v_proj]) or set lora_target_linear: true."
            )
        if self.fp16 and self.bf16 is True:
            problems.append("fp16 / bf16: choose one of them, not both.")
        problems += self._precision_problems()
        if self.lora_target_parameters and self.lora_dropout:
            problems.append("lora_target_parameters / lora_dropout: peft's LoRA on parameters has no dropout; "
                            "set lora_dropout: 0.")
        if self.curriculum_sampling and self.group_by_length:
            problems.append("curriculum_sampling / group_by_length: each sets the row order; choose one.")
        if self.lr_quadratic_warmup and self.lr_scheduler != "cosine":
            problems.append(f"lr_quadratic_warmup: applies to lr_scheduler: cosine only (got {self.lr_scheduler}).")
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            problems.append("warmup_steps / warmup_ratio: set one of them, not both.")
        if self.val_set_size >= 1 and self.val_set_size != int(self.val_set_size):
            problems.append("val_set_size: a row count must be a whole number (or a fraction below 1).")
        problems += self._linearized_expert_problems()
        problems += self._fsdp_problems()
        problems += self.expert_parallel_problems()
        problems += self.preference_problems()
        problems += self.relora_problems()
        if self.rl and self.sample_packing:
            problems.append(f"sample_packing / rl: {self.rl} sets each chosen answer against its rejected one in a "
                            "batch; pairs are not packed: set sample_packing: false.")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def _precision_problems(self) -> list[str]:
        """Axolotl's pure-dtype switches (bfloat16, float16, float32) must agree with bf16 / fp16."""
        chosen = {"bf16": self.bf16 is True or self.bfloat16 is True, "fp16": self.fp16 or self.float16, "fp32": self.float32}
        named = [name for name, on in chosen.items() if on]
        problems = []
        if len(named) > 1:
            problems.append(f"bf16 / bfloat16 / fp16 / float16 / float32: these ask for {' and '.join(named)}; "
                            "choose one precision.")
        if self.bfloat16 and self.bf16 is False:
            problems.append(f"bfloat16 / bf16: bfloat16: {str(self.bfloat16).lower()} loads the weights in bfloat16, "
                            "bf16: false says not to.")
        return problems

    def _linearized_expert_problems(self) -> list[str]:
        """``llama4_linearized_experts`` replaces the fused expert parameters, on whole weights (FSDP shards after)."""
        if not self.llama4_linearized_experts:
            return []
        problems = []
        fused = [name for name in self.lora_target_parameters or [] if "experts." in name]
        if fused:
            problems.append(f"llama4_linearized_experts / lora_target_parameters: {', '.join(fused)} are fused "
                            "expert parameters, which linearizing replaces; target experts.gate_projs / up_projs / "
                            "down_projs with lora_target_modules instead.")
        if self.deepspeed in ("zero3", "zero3_offload"):
            problems.append("llama4_linearized_experts / deepspeed: ZeRO-3 partitions the weights as the model is "
                            "built, before the experts are linearized; use fsdp, DDP (num_processes) or deepspeed "
                            "zero1/zero2.")
        return problems

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
        if self.chunked_cross_entropy:
            problems.append("chunked_cross_entropy: not with FSDP, which shards the output head's weight; "
                            "turn one of them off.")
        return problems

    def quantization_bits(self) -> int | None:
        """4 or 8 when the base weights load quantized (``adapter: qlora`` implies 4), else None."""
        if self.load_in_4bit or self.adapter == "qlora":
            return 4
        return 8 if self.load_in_8bit else None

    def padding(self) -> dict[str, Any]:
        """Keyword arguments for the collators' padding policy."""
        return {
            "pad_to_multiple_of": self.pad_to_multiple_of,
            "sequence_len": self.sequence_len,
            "pad_to_sequence_len": self.pad_to_sequence_len,
        }

    def derived_warmup_steps(self, total_steps: int) -> int:
        """Warm-up steps from ``warmup_steps`` or ``warmup_ratio`` (0 when neither is set)."""
        if self.warmup_steps is not None:
            if 0 < self.warmup_steps < 1:
                return math.ceil(self.warmup_steps * total_steps)
            return int(self.warmup_steps)
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
    schema["properties"].update(noop_schema_properties())  # Axolotl keys accepted with no effect
    return schema

"""The hardware keys: processes and machines, and how the model is sharded (DeepSpeed ZeRO or FSDP)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from axlora.config.base import StrictModel
from axlora.config.deepspeed_presets import PRESETS
from axlora.core.suggest import did_you_mean

FSDP_OPTIONS = ("full_shard", "shard_grad_op", "auto_wrap", "offload")
# FSDP1 settings that FSDP2 (what axlora runs) has no counterpart for: read and reported, never acted on
FSDP1_ONLY = ("use_orig_params", "sync_module_states", "limit_all_gathers", "forward_prefetch", "backward_prefetch",
              "backward_prefetch_policy")


class FsdpConfig(StrictModel):
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
    final_state_dict_type: Literal["FULL_STATE_DICT", "SHARDED_STATE_DICT", "LOCAL_STATE_DICT"] | None = Field(
        default=None, description="How Axolotl saves the model at the end: axlora always writes final/ as one whole "
        "adapter (FULL_STATE_DICT), whatever state_dict_type the checkpoints use.",
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


class HardwareSettings(StrictModel):
    """How many processes and machines train, and how the model is sharded across them (DeepSpeed ZeRO or FSDP)."""

    num_processes: int | None = Field(
        default=None, gt=0, description="Processes per machine (default: every visible GPU, else 1)."
    )
    num_machines: int = Field(default=1, gt=0, description="Machines taking part (one axlora train per machine).")
    machine_rank: int = Field(default=0, ge=0, description="This machine's rank, 0 .. num_machines-1.")
    main_process_ip: str | None = Field(default=None, description="Address of the rank-0 machine (multi-node).")
    main_process_port: int = Field(default=29500, gt=0, lt=65536,
                                   description="Port of the rank-0 machine (on one machine, a free port unless set).")
    ddp_timeout: int = Field(default=1800, gt=0, description="Seconds a process waits for the others (NCCL/gloo).")
    deepspeed: str | None = Field(
        default=None,
        description="DeepSpeed ZeRO: a shipped preset (zero1, zero2, zero3, zero3_offload) or the path of a "
        "DeepSpeed JSON config; batch size, accumulation, clipping and precision come from this YAML.",
    )

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_preset_or_json(cls, value: str | None) -> str | None:
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
    expert_parallel_size: int = Field(
        default=1, ge=1,
        description="Expert parallelism for MoE models: each group of this many processes splits every MoE layer's "
        "experts among its members, and each token travels to the process holding its expert and back (all-to-all); "
        "1 is off. It must divide the number of processes and the expert count; with data parallelism (DDP), not "
        "FSDP or DeepSpeed; the experts stay frozen (LoRA on attention and other linear layers).",
    )

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

    def expert_parallel_problems(self) -> list[str]:
        """What ``expert_parallel_size`` cannot be combined with; the expert count is checked on the model."""
        size = self.expert_parallel_size
        if size == 1:
            return []
        problems = []
        if self.deepspeed or self.uses_fsdp():
            problems.append(f"expert_parallel_size / {'deepspeed' if self.deepspeed else 'fsdp'}: expert parallelism "
                            "runs with data parallelism (DDP) only; remove one of them.")
        world = (self.num_processes or 0) * self.num_machines
        if world and world % size:
            problems.append(f"expert_parallel_size / num_processes: {size} does not divide the {world} process(es) "
                            f"(num_processes x num_machines); use a multiple of {size}.")
        expert_targets = [name for name in getattr(self, "lora_target_parameters", None) or [] if "experts" in name]
        if expert_targets:
            problems.append(f"expert_parallel_size / lora_target_parameters: {', '.join(expert_targets)} would train "
                            "the experts, which expert parallelism keeps frozen; remove them or set "
                            "expert_parallel_size: 1.")
        if getattr(self, "quantize_moe_experts", False):
            problems.append("expert_parallel_size / quantize_moe_experts: quantized experts are not split over "
                            "processes; remove one of them.")
        return problems

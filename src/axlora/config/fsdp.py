"""What ``fsdp`` / ``fsdp_config`` ask for, in FSDP2 terms: read from the config alone, without torch.

Axolotl's configs speak FSDP1; axlora runs FSDP2 (``fully_shard``). This maps one onto the other and
collects a note for each setting that maps differently or not at all, printed by ``validate`` and ``train``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from axlora.config.hardware import FSDP1_ONLY, FsdpConfig
from axlora.config.schema import Config


@dataclass(frozen=True)
class FsdpSettings:
    reshard_after_forward: bool
    offload_params: bool
    layer_classes: tuple[str, ...] | None  # None: the model's own decoder-layer classes
    load_on_main_only: bool = False  # cpu_ram_efficient_loading: rank 0 reads the weights, sends each its shards
    notes: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        strategy = "FULL_SHARD" if self.reshard_after_forward else "SHARD_GRAD_OP"
        return (strategy + (", base weights offloaded to CPU RAM" if self.offload_params else "")
                + (", base loaded by rank 0 only" if self.load_on_main_only else ""))


def fsdp_settings(config: Config) -> FsdpSettings | None:
    """The FSDP settings of ``fsdp`` / ``fsdp_config`` (None when FSDP is off), with notes on what maps how."""
    if not config.uses_fsdp():
        return None
    settings = config.fsdp_config or FsdpConfig()
    options = set(config.fsdp or ())
    reshard = settings.reshard_after_forward
    if settings.sharding_strategy is not None:
        reshard = settings.sharding_strategy == "FULL_SHARD"
    if "shard_grad_op" in options:
        reshard = False
    notes = []
    if 1 in (config.fsdp_version, settings.version):
        notes.append("fsdp_version 1: axlora runs FSDP2 (fully_shard); the FSDP1 settings map onto it")
    unused = [name for name in FSDP1_ONLY if getattr(settings, name) is not None]
    if unused:
        notes.append(f"fsdp_config: {', '.join(unused)}: FSDP1 settings with no FSDP2 counterpart; not used")
    if settings.state_dict_type != "FULL_STATE_DICT":
        notes.append(f"fsdp_config.state_dict_type {settings.state_dict_type}: the adapter is never sharded; "
                     "final/ and checkpoints hold it whole")
    if settings.final_state_dict_type not in (None, "FULL_STATE_DICT"):
        notes.append(f"fsdp_config.final_state_dict_type {settings.final_state_dict_type}: final/ holds the whole "
                     "adapter (FULL_STATE_DICT), which is what plain peft loads")
    load_on_main_only = settings.cpu_ram_efficient_loading
    if load_on_main_only and config.quantization_bits():
        load_on_main_only = False  # the quantized layers and their scales are made while loading, by each process
        notes.append("fsdp_config.cpu_ram_efficient_loading: with a quantized base every process reads and quantizes "
                     "the weights itself (more CPU RAM while loading; the same training)")
    if config.quantization_bits() == 8:
        notes.append("fsdp / load_in_8bit: the int8 weights stay whole on every process (their row scales cannot be "
                     "split from them); the rest of the base is sharded. load_in_4bit shards all of it")
    return FsdpSettings(
        reshard_after_forward=reshard,
        offload_params=settings.offload_params or "offload" in options,
        layer_classes=tuple(settings.transformer_layer_cls_to_wrap) if settings.transformer_layer_cls_to_wrap else None,
        load_on_main_only=load_on_main_only,
        notes=tuple(notes),
    )

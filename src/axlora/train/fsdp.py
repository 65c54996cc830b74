"""FSDP: the base model's weights sharded across processes with PyTorch's ``fully_shard`` (FSDP2).

Only the frozen base is sharded. The tensors the adapter file holds (the LoRA, ``lora_modules_to_save`` and
embeddings peft saves after a vocabulary resize) stay whole on every rank, and their gradients are
all-reduced as DDP would: they are a small fraction of the weights, and keeping them whole means saving,
early stopping and the optimizer state work as without sharding (a checkpoint is the same as DDP's).

axlora calls ``fully_shard`` itself instead of going through accelerate's FSDP plugin: without GPUs
accelerate would silently run DDP, while ``fully_shard`` over gloo really shards, so a CPU run exercises
the code a GPU run uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from axlora.config.schema import FSDP1_ONLY, Config, FsdpConfig
from axlora.errors import UserError


@dataclass(frozen=True)
class FsdpSettings:
    reshard_after_forward: bool
    offload_params: bool
    layer_classes: tuple[str, ...] | None  # None: the model's own decoder-layer classes
    notes: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        strategy = "FULL_SHARD" if self.reshard_after_forward else "SHARD_GRAD_OP"
        return strategy + (", base weights offloaded to CPU RAM" if self.offload_params else "")


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
    if settings.cpu_ram_efficient_loading:
        notes.append("fsdp_config.cpu_ram_efficient_loading: every process loads the base into CPU RAM before "
                     "sharding (deepspeed: zero3 loads it partitioned, if CPU RAM is short)")
    return FsdpSettings(
        reshard_after_forward=reshard,
        offload_params=settings.offload_params or "offload" in options,
        layer_classes=tuple(settings.transformer_layer_cls_to_wrap) if settings.transformer_layer_cls_to_wrap else None,
        notes=tuple(notes),
    )


def whole_parameters(peft_model) -> list:
    """Parameters that stay whole on every rank: the trainable ones and any other tensor the adapter file holds."""
    from peft import get_peft_model_state_dict

    saved = {tensor.data_ptr() for tensor in get_peft_model_state_dict(peft_model).values()}
    return [p for p in peft_model.parameters() if p.requires_grad or p.data_ptr() in saved]


def shard_model(peft_model, settings: FsdpSettings, device) -> dict[str, Any]:
    """Shard the base weights per layer (then the rest at the root) across all processes; returns figures.

    The model arrives on the CPU: each rank moves only its shards to ``device``, never the whole base.
    """
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    base = peft_model.get_base_model()
    classes = settings.layer_classes or tuple(getattr(base, "_no_split_modules", None) or ())
    layers = [module for module in base.modules() if type(module).__name__ in classes]
    if not layers:
        known = sorted({type(m).__name__ for m in base.modules() if type(m).__name__.endswith("Layer")})
        raise UserError(f"fsdp_config.transformer_layer_cls_to_wrap: {type(base).__name__} has no layer of class "
                        f"{', '.join(classes) or '(none declared)'}; its layer classes: {', '.join(known) or 'none'}.")
    whole = whole_parameters(peft_model)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    shard_options = dict(mesh=mesh, reshard_after_forward=settings.reshard_after_forward, ignored_params=set(whole),
                         offload_policy=CPUOffloadPolicy() if settings.offload_params else OffloadPolicy())
    for layer in layers:
        fully_shard(layer, **shard_options)
    # the root is the transformers model, not peft's wrapper: generate() calls its forward directly
    fully_shard(base, **shard_options)
    with torch.no_grad():
        for parameter in whole:
            parameter.data = parameter.data.to(device)
    return shard_figures(peft_model, len(layers))


def shard_figures(model, units: int) -> dict[str, Any]:
    """What this rank holds: read from the parameters themselves (a DTensor's local shard), not assumed."""
    from torch.distributed.tensor import DTensor

    sharded = [p for p in model.parameters() if isinstance(p, DTensor)]
    whole = [p for p in model.parameters() if not isinstance(p, DTensor)]
    return {
        "layers_sharded": units,
        "sharded_parameters": sum(p.numel() for p in sharded),
        "sharded_parameters_on_this_rank": sum(p.to_local().numel() for p in sharded),
        "whole_parameters": sum(p.numel() for p in whole),
    }

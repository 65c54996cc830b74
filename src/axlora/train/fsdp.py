"""FSDP: the base model's weights sharded across processes with PyTorch's ``fully_shard`` (FSDP2).

Only the frozen base is sharded. The tensors the adapter file holds (the LoRA, ``lora_modules_to_save`` and
embeddings peft saves after a vocabulary resize) stay whole on every rank, and their gradients are
all-reduced as DDP would: they are a small fraction of the weights, and keeping them whole means saving,
early stopping and the optimizer state work as without sharding (a checkpoint is the same as DDP's).

axlora calls ``fully_shard`` itself instead of going through accelerate's FSDP plugin: without GPUs
accelerate would silently run DDP, while ``fully_shard`` over gloo really shards, so a CPU run exercises
the code a GPU run uses.

Quantized MoE experts (``quantize_moe_experts``) are a tensor subclass that sharding would turn into plain dense
weights; their packed bytes first move into a flat parameter of the compute dtype, which is sharded like any weight
(FSDP-QLoRA's quantized storage, ``model.expert_quant.store_experts_flat``).
"""

from __future__ import annotations

import sys
from typing import Any

from axlora.config.fsdp import FsdpSettings
from axlora.core.errors import UserError


def whole_parameters(peft_model) -> list:
    """Parameters that stay whole on every rank: the trainable ones and any other tensor the adapter file holds."""
    from peft import get_peft_model_state_dict

    saved = {tensor.data_ptr() for tensor in get_peft_model_state_dict(peft_model).values()}
    return [p for p in peft_model.parameters() if p.requires_grad or p.data_ptr() in saved]


def int8_weights(model) -> list:
    """LLM.int8 weights (``load_in_8bit``): their row scales live beside the int8 bytes, which a shard would cut
    apart from them, so each rank keeps them whole (only the rest of the base is sharded)."""
    return [p for p in model.parameters() if type(p).__name__ == "Int8Params"]


def materialize_empty(model) -> None:
    """Give a model built on the meta device real (uninitialized) CPU storage, keeping its buffers and tied weights.

    The pages are not touched until sharding copies this rank's slice, so the whole base never occupies RAM;
    the values arrive from rank 0 after sharding (``send_main_weights``).
    """
    import torch

    tied: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(parameter), []).append(name)
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    for names in tied.values():  # to_empty gives each use of a shared weight its own tensor: share it again
        shared = model.get_parameter(names[0])
        for name in names[1:]:
            owner, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(owner), attribute, shared)


def shard_model(peft_model, settings: FsdpSettings, device) -> dict[str, Any]:
    """Shard the base weights per layer (then the rest at the root) across all processes; returns figures.

    The model arrives on the CPU: each rank moves only its shards to ``device``, never the whole base. With
    ``load_on_main_only`` only rank 0's model holds the weights; the others' are filled from it afterwards.
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
    packed_stacks = _flat_expert_storage(base, device)
    whole = whole_parameters(peft_model) + int8_weights(base)
    world = torch.distributed.get_world_size()
    sending = settings.load_on_main_only and world > 1
    # rank 0's whole tensors, held until they are sent (sharding replaces the model's own with slices)
    main_weights = dict(_named_tensors(peft_model)) if sending and torch.distributed.get_rank() == 0 else None
    mesh = init_device_mesh(device.type, (world,))
    shard_options = dict(mesh=mesh, reshard_after_forward=settings.reshard_after_forward,
                         ignored_params=set(whole) | set(packed_stacks),
                         offload_policy=CPUOffloadPolicy() if settings.offload_params else OffloadPolicy())
    for layer in layers:
        fully_shard(layer, **shard_options)
    # the root is the transformers model, not peft's wrapper: generate() calls its forward directly
    fully_shard(base, **shard_options)
    with torch.no_grad():
        for parameter in whole:
            parameter.data = parameter.data.to(device)
            for scales in ("CB", "SCB"):  # an int8 weight's row scales travel with its bytes
                if getattr(parameter, scales, None) is not None:
                    setattr(parameter, scales, getattr(parameter, scales).to(device))
    if sending:
        send_main_weights(peft_model, main_weights, device)
    return shard_figures(peft_model, len(layers))


def _flat_expert_storage(model, device) -> list:
    """Packed MoE experts (``quantize_moe_experts``) in the flat storage FSDP shards; returns the expert stacks, which
    then hold no bytes of their own and stay out of FSDP. Their module is loaded only when a model has them."""
    expert_quant = sys.modules.get("axlora.model.expert_quant")
    return expert_quant.store_experts_flat(model, device) if expert_quant else []


def _named_tensors(model):
    yield from model.named_parameters()
    yield from model.named_buffers()


def send_main_weights(model, main_weights: dict | None, device) -> None:
    """Rank 0 broadcasts each weight whole, one at a time; every other rank keeps its slice (or all of a whole one).

    Written in place, so tied weights, the optimizer's parameters and FSDP's own storage stay what they are.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    is_main = dist.get_rank() == 0
    with torch.no_grad():
        for name, tensor in _named_tensors(model):
            if is_main:
                whole = main_weights[name].to(device)
            else:
                whole = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
            dist.broadcast(whole, src=0)
            if is_main:
                continue
            if isinstance(tensor, DTensor):
                tensor.to_local().copy_(
                    distribute_tensor(whole, tensor.device_mesh, tensor.placements, src_data_rank=None).to_local())
            else:
                tensor.copy_(whole)


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
        "int8_parameters": sum(p.numel() for p in int8_weights(model)),
    }

"""``expert_parallel_size``: the expert groups of a run and the experts each process keeps.

Processes ``g*G .. g*G+G-1`` form expert group ``g`` (consecutive ranks, so a group stays on one machine when
it fits there): each holds ``1/G`` of every MoE layer's experts and exchanges tokens with the others of its
group (``model.expert_parallel``). Data parallelism is unchanged: every process trains on its own rows and
DDP averages the adapter's gradients over all processes. The experts are frozen base weights, so nothing of
them is reduced or saved; the adapter is the one a run without expert parallelism writes. Each group talks
over a process group of its own, apart from DDP's gradient reductions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from axlora.config.schema import Config
from axlora.core.errors import UserError

if TYPE_CHECKING:
    from axlora.model.expert_parallel import ExpertGroup


def start_expert_groups(config: Config, world_size: int, rank: int) -> ExpertGroup | None:
    """This process's expert group (None with ``expert_parallel_size: 1``); every process builds every group."""
    size = config.expert_parallel_size
    if size == 1:
        return None
    if world_size % size:
        raise UserError(f"expert_parallel_size: {size} does not divide the {world_size} process(es) of this run; "
                        "set num_processes (x num_machines) to a multiple of it.")
    import torch.distributed as dist

    from axlora.model.expert_parallel import ExpertGroup

    mine = None
    for first in range(0, world_size, size):  # new_group must be called by every process, in the same order
        group = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            mine = ExpertGroup(group=group, rank=rank - first, size=size)
    return mine


def place_experts(model, group: ExpertGroup | None, say) -> None:
    """Keep this process's experts of every MoE layer; ``model`` is the peft model, before DDP wraps it."""
    if group is None:
        return
    from axlora.model.expert_parallel import fused_experts, shard_experts, trained_expert_parameters

    found = fused_experts(model)
    if not found:
        raise UserError("expert_parallel_size: the base model has no fused MoE experts (transformers' stacked "
                        "gate_up_proj / down_proj experts) to spread over processes; set expert_parallel_size: 1.")
    trained = trained_expert_parameters(model)
    if trained:
        raise UserError(f"expert_parallel_size: the experts are trained here ({', '.join(trained[:2])}, ...: LoRA on "
                        "expert parameters, from lora_target_parameters or the continued adapter); expert "
                        "parallelism keeps the experts frozen: set expert_parallel_size: 1.")
    total = found[0][1].num_experts
    sliced = {id(parameter) for parameter in shard_experts(model, group)}
    from torch.nn.parallel import DistributedDataParallel

    # every process holds other experts under the same names: DDP's start-up copy from rank 0 must skip them
    ignored = [name for name, parameter in model.named_parameters() if id(parameter) in sliced]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    say(f"expert parallel: {len(found)} MoE layers, {total} experts each over {group.size} processes: each keeps "
        f"{total // group.size} and exchanges tokens with the others of its group")

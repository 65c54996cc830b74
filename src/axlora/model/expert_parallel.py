"""Expert parallelism: each process of a group keeps a slice of every MoE layer's experts, and tokens travel.

transformers 5 stores a MoE layer's experts as one module of stacked weights (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``, experts on dim 0) called as ``experts(hidden_states, top_k_index, top_k_weights)``.
Under expert parallelism the ``G`` processes of a group each keep ``E / G`` consecutive experts. In every MoE
layer each process sends each (token, expert) pair to the process holding that expert (an all-to-all with
uneven splits), that process runs its local experts on what it received, the results travel back by the
reverse all-to-all, and the sender weighs them with its routing weights and sums them per token, as the
unsharded layer does. The exchange is differentiable: its backward is the same all-to-all the other way, so
gradients reach the tokens' own processes. Every process of a group must run the same number of MoE forwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from axlora.core.errors import UserError


@dataclass(frozen=True)
class ExpertGroup:
    """The processes that share one copy of the experts: this process's place in it and its process group."""

    group: Any  # torch.distributed ProcessGroup
    rank: int
    size: int


def _exchange(rows: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    received = rows.new_empty((sum(recv_splits), *rows.shape[1:]))
    dist.all_to_all_single(received, rows.contiguous(), output_split_sizes=recv_splits,
                           input_split_sizes=send_splits, group=group)
    return received


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` whose gradient takes the way back (receive splits and send splits swapped)."""

    @staticmethod
    def forward(ctx, rows, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return _exchange(rows, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        return _exchange(grad, recv_splits, send_splits, ctx.group), None, None, None


class ExpertParallelExperts(nn.Module):
    """A MoE layer's experts spread over an expert group; ``local`` is this process's slice of them."""

    def __init__(self, local: nn.Module, group: ExpertGroup, num_experts: int):
        super().__init__()
        self.local = local
        self.expert_group = group
        self.num_experts = num_experts  # over the whole group
        self.local_count = num_experts // group.size

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        tokens, top_k = top_k_index.shape
        group = self.expert_group
        expert_ids = top_k_index.reshape(-1)
        # sorted by expert, the pairs are also sorted by owner: process r holds experts r*L .. (r+1)*L-1
        order = torch.argsort(expert_ids, stable=True)
        per_expert = torch.bincount(expert_ids, minlength=self.num_experts)
        received_per_expert = _exchange(per_expert, [self.local_count] * group.size,
                                        [self.local_count] * group.size, group.group)
        send_splits = per_expert.view(group.size, -1).sum(dim=1).tolist()
        recv_splits = received_per_expert.view(group.size, -1).sum(dim=1).tolist()
        received = _AllToAll.apply(hidden_states[order // top_k], send_splits, recv_splits, group.group)
        computed = self._run_local(received, received_per_expert)
        returned = _AllToAll.apply(computed, recv_splits, send_splits, group.group)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        pairs = returned[inverse] * top_k_weights.reshape(-1, 1)
        return pairs.view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)

    def _run_local(self, received: torch.Tensor, received_per_expert: torch.Tensor) -> torch.Tensor:
        """The local experts on the rows other processes sent, each row to one expert with weight 1.

        With nothing received the output still depends on ``received``, so this process's backward runs the
        return exchange like every other process's."""
        if received.shape[0] == 0:
            return received * 0
        local_ids = torch.arange(self.local_count, device=received.device).repeat(self.expert_group.size)
        expert_of_row = torch.repeat_interleave(local_ids, received_per_expert)
        ones = torch.ones((received.shape[0], 1), dtype=received.dtype, device=received.device)
        return self.local(received, expert_of_row.unsqueeze(1), ones).to(received.dtype)


def fused_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every fused experts module: transformers' expert classes mark their instances
    with ``_is_expert_parallel`` and keep the expert count in ``num_experts``."""
    return [(name, module) for name, module in model.named_modules()
            if hasattr(module, "_is_expert_parallel") and isinstance(getattr(module, "num_experts", None), int)
            and not isinstance(module, ExpertParallelExperts)]


def trained_expert_parameters(model: nn.Module) -> list[str]:
    """Trainable parameters inside (or wrapped around) an experts module: LoRA on experts, unfrozen experts."""
    slots = {_slot_name(name) for name, _ in fused_experts(model)}
    return [name for name, parameter in model.named_parameters()
            if parameter.requires_grad and any(name.startswith(slot + ".") for slot in slots)]


def _slot_name(name: str) -> str:
    """Where the experts sit in their layer: a peft wrapper around them adds ``.base_layer``."""
    while name.endswith(".base_layer"):
        name = name.removesuffix(".base_layer")
    return name


def shard_experts(model: nn.Module, group: ExpertGroup) -> list[nn.Parameter]:
    """Keep this process's slice of every experts module and route its layer through ``ExpertParallelExperts``.

    Returns the sliced parameters: each process holds different values under the same names, which DDP must
    not overwrite with rank 0's at start-up.
    """
    sliced: list[nn.Parameter] = []
    for name, experts in fused_experts(model):
        total = experts.num_experts
        if total % group.size:
            raise UserError(f"expert_parallel_size: {group.size} does not divide the {total} experts of {name}; "
                            f"choose a divisor of {total}.")
        sliced += _keep_slice(experts, total, group)
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attribute, ExpertParallelExperts(experts, group, total))
    return sliced


def _keep_slice(experts: nn.Module, total: int, group: ExpertGroup) -> list[nn.Parameter]:
    """Replace every per-expert parameter (weights and biases, experts on dim 0) with this process's experts; a
    copy, so the full tensors are freed."""
    count = total // group.size
    start = group.rank * count
    sliced = []
    for attribute, parameter in list(experts.named_parameters(recurse=False)):
        if parameter.dim() == 0 or parameter.shape[0] != total:
            continue
        local = nn.Parameter(parameter.data[start:start + count].clone(), requires_grad=parameter.requires_grad)
        setattr(experts, attribute, local)
        sliced.append(local)
    experts.num_experts = count
    return sliced

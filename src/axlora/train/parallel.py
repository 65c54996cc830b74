"""How the processes of a run cooperate: plain data parallelism (DDP), FSDP, or DeepSpeed ZeRO.

The training loop speaks to one of three small classes with the same methods, so it reads the same for
all. They differ in who accumulates and steps (the loop with ``no_sync`` under DDP; the loop with one
all-reduce of the adapter's gradients under FSDP; the DeepSpeed engine under ZeRO), where optimizer state
lives (whole on every rank, or partitioned: each rank saves its own part), and how the adapter's weights
are read (under ZeRO-3 each rank holds a slice of every tensor, so they are gathered first: a bare
``save_pretrained`` would write empty tensors). Under FSDP and ZeRO-3 every forward gathers weights from
all ranks, so ranks must run the same number of forwards (``sharded_weights``).
"""

from __future__ import annotations

import contextlib
import copy
import os
from datetime import timedelta
from typing import Any

from axlora.config.schema import Config
from axlora.core.errors import RunFailed
from axlora.train.deepspeed import DeepSpeedSetup, load_deepspeed_setup


def deepspeed_setup(config: Config, precision: str) -> DeepSpeedSetup | None:
    """The worker's DeepSpeed config (None without the ``deepspeed`` key); the launcher set WORLD_SIZE."""
    if config.deepspeed is None:
        return None
    return load_deepspeed_setup(config, int(os.environ.get("WORLD_SIZE", "1")), precision)


def make_accelerator(config: Config, mixed_precision: str, deepspeed: DeepSpeedSetup | None):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    if not cuda:
        # accelerate imports DeepSpeed whenever it is installed, which then warns that it guessed the CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    timeout = timedelta(seconds=config.ddp_timeout)
    if deepspeed is None:
        return Accelerator(mixed_precision=mixed_precision, cpu=not cuda,
                           kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])
    from accelerate.utils import DeepSpeedPlugin

    # accelerate's DeepSpeed path runs only with cpu=False; without CUDA it must be told gloo, or every
    # worker would start as a world of one
    return Accelerator(
        mixed_precision=mixed_precision,
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=copy.deepcopy(deepspeed.config)),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout, backend="nccl" if cuda else "gloo")],
    )


class DataParallel:
    """One process, or DDP through accelerate: the loop accumulates with ``no_sync`` and steps itself."""

    sharded_optimizer = False
    sharded_weights = False

    def __init__(self, accelerator, model, optimizer):
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def any_rank(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag: true on any process. Every process gets the same answers, so all act alike."""
        if self.world_size == 1:
            return tuple(flags)
        import torch

        counts = torch.tensor([int(flag) for flag in flags], device=self.accelerator.device)
        return tuple(bool(count) for count in self.accelerator.reduce(counts, reduction="sum").tolist())

    def micro_step(self, last: bool):
        """Context for one micro batch's forward and backward; gradients are all-reduced on the last."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)

    def backward(self, loss) -> None:
        self.accelerator.backward(loss)

    def finish_step(self, max_grad_norm: float) -> float:
        """Clip, step and zero the gradients; returns the gradient norm before clipping (nan if not clipped)."""
        grad_norm = float("nan")
        if max_grad_norm > 0:
            params = [p for p in self.model.parameters() if p.requires_grad]
            grad_norm = float(self.accelerator.clip_grad_norm_(params, max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def gathered_adapter(self, modify: bool = False):
        """Context in which the adapter's tensors are whole on every rank (always so without ZeRO-3)."""
        return contextlib.nullcontext()

    def optimizer_state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


class ZeroParallel(DataParallel):
    """DeepSpeed ZeRO: the engine accumulates, reduces, clips (``gradient_clipping``) and steps.

    The loop marks the last micro batch of a step as the accumulation boundary itself, so a short last
    step of an epoch (fewer micro batches) steps at the right time, and it passes losses already scaled
    for the step (``scale_wrt_gas=False``): the global label-token normalization stays the loop's.
    """

    sharded_optimizer = True

    def __init__(self, accelerator, model, optimizer, stage: int):
        super().__init__(accelerator, model, optimizer)
        self.engine = model  # accelerate hands back the DeepSpeedEngine as the model
        self.stage = stage
        self.sharded_weights = stage == 3

    def micro_step(self, last: bool):
        self.engine.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def finish_step(self, max_grad_norm: float) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None and max_grad_norm > 0 else float("nan")

    def gathered_adapter(self, modify: bool = False):
        if self.stage < 3:
            return contextlib.nullcontext()
        import deepspeed

        params = [p for p in self.engine.module.parameters() if p.requires_grad]
        # modifier_rank=0: what rank 0 writes into the whole tensors is partitioned back to every rank
        return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)

    def optimizer_state(self) -> dict[str, Any]:
        return self.engine.optimizer.state_dict()  # this rank's partition

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        # ZeRO reads its own rank's entry; fp32 master weights come from the checkpoint, not from the
        # (possibly bf16) adapter weights, so the resumed run is the uninterrupted one
        states = [state if index == self.rank else None for index in range(self.world_size)]
        self.engine.optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)


class FsdpParallel(DataParallel):
    """FSDP: the base is sharded (``train.fsdp``), the adapter whole; its gradients are all-reduced once a step."""

    sharded_weights = True

    def __init__(self, accelerator, model, optimizer, figures: dict[str, Any]):
        super().__init__(accelerator, model, optimizer)
        self.figures = figures  # what this rank holds, for the log and the summary

    def micro_step(self, last: bool):
        return contextlib.nullcontext()  # gradients accumulate locally; finish_step reduces them once

    def finish_step(self, max_grad_norm: float) -> float:
        self._average_gradients()
        return super().finish_step(max_grad_norm)

    def _average_gradients(self) -> None:
        import torch
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        if self.world_size == 1:
            return
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # every rank must contribute the same tensors to the reduction
                p.grad = torch.zeros_like(p)
        for dtype in sorted({p.grad.dtype for p in params}, key=str):
            grads = [p.grad for p in params if p.grad.dtype == dtype]
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            flat /= self.world_size
            for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
                grad.copy_(reduced)


def build_parallel(accelerator, model, optimizer, deepspeed_stage: int | None) -> DataParallel:
    if deepspeed_stage is None:
        return DataParallel(accelerator, model, optimizer)
    return ZeroParallel(accelerator, model, optimizer, deepspeed_stage)


def prepare_parallel(accelerator, model, optimizer, deepspeed_stage: int | None, fsdp):
    """The model ready to train (wrapped, or sharded under FSDP) and the matching ``DataParallel`` kind.

    Under FSDP accelerate prepares only the optimizer: its ``prepare`` would wrap the sharded model in DDP.
    """
    if fsdp is None:
        model, optimizer = accelerator.prepare(model, optimizer)
        return model, build_parallel(accelerator, model, optimizer, deepspeed_stage)
    from axlora.train.fsdp import shard_model

    figures = shard_model(model, fsdp, accelerator.device)
    optimizer = accelerator.prepare_optimizer(optimizer)
    return model, FsdpParallel(accelerator, model, optimizer, figures)


def check_complete(state: dict[str, Any], where: str) -> None:
    """Refuse to write an adapter with an empty tensor (a partitioned ZeRO-3 weight read without gathering)."""
    empty = [name for name, tensor in state.items() if tensor.numel() == 0]
    if empty:
        raise RunFailed(f"{where}: adapter tensors are empty ({empty[:3]}...); refusing to save an incomplete adapter.")

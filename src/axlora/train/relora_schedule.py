"""Jagged learning-rate restarts: the run's schedule, scaled down at each restart and warmed up again.

Axolotl's ``JaggedLRRestartScheduler`` (formerly ``ReLoRAScheduler``), as a factor on the schedule of step ``s``:
with N restart steps, W warm-up and A anneal steps and p = s mod N, the factor is 1 before step N - W; after it,
it is ``min_scale + (1 - min_scale) * t`` with t = p / W while p < W (the rise after a restart), t = (N - p) / A
while p > N - A (the fall before the next one) and t = 1 otherwise. ``min_scale`` is ``cosine_min_lr_ratio``, else
0.001. The first restart comes at step N: the step that follows the N-th optimizer step learns at the lowest rate.
"""

from __future__ import annotations

from collections.abc import Callable

from axlora.config.schema import Config
from axlora.core.errors import UserError

MIN_LR_SCALE = 0.001
"""Axolotl's lowest factor at a restart when ``cosine_min_lr_ratio`` is unset."""


def jagged_factor(step: int, restart_steps: int, warmup_steps: int, anneal_steps: int,
                  min_scale: float = MIN_LR_SCALE) -> float:
    """The factor on the schedule's learning rate at ``step`` (0-based, the step about to be taken)."""
    if step < restart_steps - warmup_steps:
        return 1.0
    progress = step % restart_steps
    if progress < warmup_steps:
        rise = min(1.0, progress / warmup_steps)
    elif progress > restart_steps - anneal_steps:
        rise = min(1.0, (restart_steps - progress) / anneal_steps)
    else:
        rise = 1.0
    return rise * (1.0 - min_scale) + min_scale


def with_jagged_restarts(scheduler, optimizer, config: Config):
    """The schedule ``config`` builds, restarted every ``jagged_restart_steps`` (unchanged without restarts).

    The run's schedules are ``LambdaLR`` factors of the step, so the restarted schedule is one ``LambdaLR`` whose
    factor is the product: a plain state dict, and a resume restores it like any other schedule.
    """
    restart_steps = config.restart_steps()
    if restart_steps is None:
        return scheduler
    from torch.optim.lr_scheduler import LambdaLR

    if not isinstance(scheduler, LambdaLR):
        raise UserError(f"jagged_restart_steps: restarts rescale a schedule step by step; lr_scheduler: "
                        f"{config.lr_scheduler} is not one of those (use cosine, linear or constant).")
    warmup, anneal = config.restart_warmup_steps(), config.restart_anneal_steps()
    min_scale = config.cosine_min_lr_ratio or MIN_LR_SCALE

    def restarted(inner: Callable[[int], float]) -> Callable[[int], float]:
        def factor(step: int) -> float:
            return inner(step) * jagged_factor(step, restart_steps, warmup, anneal, min_scale)
        return factor

    return LambdaLR(optimizer, [restarted(inner) for inner in scheduler.lr_lambdas])

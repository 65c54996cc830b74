"""When a run evaluates and checkpoints: Axolotl's ``*_steps``, ``*s_per_epoch`` and ``*_strategy`` keys, turned
into yes/no for each optimizer step once the run knows its length."""

from __future__ import annotations

from typing import Literal

from axlora.config.schema import Config


def evaluates_at(config: Config, step: int, total_steps: int, steps_per_epoch: int) -> bool:
    """Whether to evaluate after optimizer step ``step`` (1-based); the last step always, unless ``no``."""
    if config.eval_strategy == "no":
        return False
    every = _interval(config, "eval", steps_per_epoch, total_steps)
    return step == total_steps or (every is not None and step % every == 0)


def saves_at(config: Config, step: int, total_steps: int, steps_per_epoch: int) -> bool:
    """Whether to write ``checkpoints/step-N`` after ``step`` (the last step writes ``final/`` instead)."""
    if step >= total_steps or config.save_strategy == "no":
        return False
    if config.save_first_step and step == 1:
        return True
    every = _interval(config, "save", steps_per_epoch, total_steps)
    return every is not None and step % every == 0


def _interval(config: Config, kind: Literal["eval", "save"], steps_per_epoch: int, total_steps: int) -> int | None:
    """Steps between evaluations (or saves), None for none but the last."""
    per_epoch = getattr(config, f"{kind}s_per_epoch")
    every = getattr(config, f"{kind}_steps")
    strategy = getattr(config, f"{kind}_strategy")
    if strategy == "no" or per_epoch == 0:  # evals_per_epoch: 0 / saves_per_epoch: 0: none on the way
        return None
    if per_epoch:
        return max(1, round(steps_per_epoch / per_epoch))
    if every:
        # a whole number as is, a fraction (<1) of the run's total steps
        return max(1, round(every * total_steps)) if every < 1 else int(every)
    if strategy == "epoch":
        return steps_per_epoch
    return None

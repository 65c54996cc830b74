"""Optimizer and learning-rate schedule, by the names transformers' Trainer knows."""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from types import SimpleNamespace

from axlora.config.schema import Config
from axlora.core.errors import UserError


def resolve_optimizer(config: Config):
    """The optimizer class and keyword arguments ``config.optimizer`` names, as the Trainer maps them."""
    from transformers import Trainer, TrainingArguments
    from transformers.training_args import OptimizerNames

    known = {o.value for o in OptimizerNames}
    if config.optimizer not in known:
        from axlora.core.suggest import did_you_mean

        raise UserError(
            f"optimizer: unknown optimizer '{config.optimizer}'{did_you_mean(config.optimizer, known)}"
        )
    # Trainer's mapping reads only plain attributes of its arguments. A real TrainingArguments would set up
    # torch.distributed by itself and reset accelerate's process state, so hand it the field defaults.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainingArguments) if f.default is not dataclasses.MISSING}
    args = SimpleNamespace(**{
        **defaults,
        "output_dir": config.output_dir,
        "optim": OptimizerNames(config.optimizer),
        "learning_rate": config.learning_rate,
        "weight_decay": config.weight_decay,
        "adam_beta1": config.adam_beta1,
        "adam_beta2": config.adam_beta2,
        "adam_epsilon": config.adam_epsilon,
    })
    try:
        return Trainer.get_optimizer_cls_and_kwargs(args)
    except (ImportError, ValueError) as exc:
        raise UserError(f"optimizer: '{config.optimizer}' is not usable here: {exc}") from None


def build_optimizer(model, config: Config, optimizer_cls, kwargs):
    """The optimizer over the trainable (LoRA) parameters only."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": params, "weight_decay": config.weight_decay}]
    return optimizer_cls(groups, **kwargs)


def build_lr_scheduler(optimizer, config: Config, total_steps: int):
    from transformers import get_scheduler

    if config.lr_quadratic_warmup:  # the config allows it with lr_scheduler: cosine only
        return _cosine_with_quadratic_warmup(optimizer, config.derived_warmup_steps(total_steps), total_steps)
    return get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.derived_warmup_steps(total_steps),
        num_training_steps=total_steps,
    )


def quadratic_warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Axolotl's ``lr_quadratic_warmup``: (step / warmup)^2 during warm-up, then a half cosine to 0."""
    if step < warmup_steps:
        return (step / max(1, warmup_steps)) ** 2
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def _cosine_with_quadratic_warmup(optimizer, warmup_steps: int, total_steps: int):
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, partial(quadratic_warmup_cosine_factor, warmup_steps=warmup_steps,
                                       total_steps=total_steps))

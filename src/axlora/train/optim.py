"""Optimizer and learning-rate schedule, by the names transformers' Trainer knows.

Beyond the Trainer's mapping: ``optim_args`` reach the optimizer's constructor (checked against its signature, so a
misspelt name fails before the model loads), LoRA+ and the embedding learning rate set parameter groups, and the
schedule takes Axolotl's cosine floor (``cosine_min_lr_ratio`` / ``cosine_constant_lr_ratio``), ``one_cycle`` and
``lr_scheduler_kwargs``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from functools import partial
from types import SimpleNamespace
from typing import Any

from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.core.suggest import did_you_mean

LORAPLUS_EMBEDDING_LR = 1e-6
"""LoRA+'s learning rate of LoRA on embedding layers when ``loraplus_lr_embedding`` is unset (Axolotl's and peft's)."""
EMBEDDING_NAMES = ("embed_tokens", "lm_head", "modules_to_save.default.weight")
"""Parameter names that ``embedding_lr`` / ``embedding_lr_scale`` apply to, as Axolotl picks them."""


def resolve_optimizer(config: Config):
    """The optimizer class and keyword arguments ``config.optimizer`` names, as the Trainer maps them, plus
    ``optim_args``."""
    from transformers.training_args import OptimizerNames

    known = {o.value for o in OptimizerNames}
    if config.optimizer not in known:
        raise UserError(
            f"optimizer: unknown optimizer '{config.optimizer}'{did_you_mean(config.optimizer, known)}"
        )
    optimizer_cls, kwargs = _trainer_mapping(config)
    arguments = config.optimizer_arguments()
    if arguments:
        kwargs = {**kwargs, **_constructor_arguments(config, optimizer_cls, kwargs, arguments)}
    return optimizer_cls, kwargs


def _trainer_mapping(config: Config, optim_args: str | None = None):
    from transformers import Trainer, TrainingArguments
    from transformers.training_args import OptimizerNames

    # Trainer's mapping reads only plain attributes of its arguments. A real TrainingArguments would set up
    # torch.distributed by itself and reset accelerate's process state, so hand it the field defaults.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainingArguments) if f.default is not dataclasses.MISSING}
    args = SimpleNamespace(**{
        **defaults,
        "output_dir": config.output_dir,
        "optim": OptimizerNames(config.optimizer),
        "optim_args": optim_args,
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


def _constructor_arguments(config: Config, optimizer_cls, kwargs: dict[str, Any],
                           arguments: dict[str, Any]) -> dict[str, Any]:
    """What ``optim_args`` add to the optimizer's keyword arguments.

    An argument the Trainer's mapping reads for this optimizer (``beta1`` of AdEMAMix, ``momentum_dtype`` of
    AnyPrecisionAdamW) goes through the mapping, which converts it; any other must be a parameter of the
    optimizer's constructor.
    """
    accepted = constructor_parameters(optimizer_cls)
    added: dict[str, Any] = {}
    for name, value in arguments.items():
        mapped = _mapped_by_trainer(config, name, value, kwargs)
        if mapped:
            added.update(mapped)
        elif accepted is None or name in accepted:
            added[name] = value
        else:
            raise UserError(
                f"optim_args: {optimizer_cls.__name__} (optimizer: {config.optimizer}) takes no argument "
                f"'{name}'{did_you_mean(name, accepted)}; it takes: {', '.join(sorted(accepted))}."
            )
    return added


def constructor_parameters(optimizer_cls) -> set[str] | None:
    """The keyword arguments the optimizer's constructor takes (None: any, it has ``**kwargs``)."""
    parameters = inspect.signature(optimizer_cls).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.name != "params" and p.kind is not inspect.Parameter.VAR_POSITIONAL}


def _mapped_by_trainer(config: Config, name: str, value: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments that change when the Trainer's mapping reads ``name=value`` (empty: it ignores it)."""
    try:
        _, with_argument = _trainer_mapping(config, f"{name}={value}")
    except (UserError, ValueError):
        return {}
    return {key: setting for key, setting in with_argument.items() if key not in kwargs or kwargs[key] != setting}


def build_optimizer(model, config: Config, optimizer_cls, kwargs, say: Callable[[str], None] = print):
    """The optimizer over the trainable (LoRA) parameters only; LoRA+ and the embedding rate as their own groups."""
    if config.loraplus_lr_ratio:
        from peft.optimizers import create_loraplus_optimizer

        rest = {key: value for key, value in kwargs.items() if key != "lr"}
        return create_loraplus_optimizer(
            model, optimizer_cls, lr=kwargs.get("lr", config.learning_rate), loraplus_lr_ratio=config.loraplus_lr_ratio,
            loraplus_lr_embedding=config.loraplus_lr_embedding or LORAPLUS_EMBEDDING_LR,
            loraplus_weight_decay=config.weight_decay, **rest,
        )
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    embedding_lr = _embedding_lr(config, kwargs.get("lr", config.learning_rate))
    embedding = [p for name, p in named if embedding_lr is not None and _is_embedding(name)]
    if embedding_lr is not None and not embedding:
        say("note: embedding_lr: no embedding or output-head weight trains in this run (add embed_tokens / lm_head "
            "to lora_modules_to_save to train them); every weight learns at learning_rate")
    chosen = {id(p) for p in embedding}
    groups = [{"params": [p for _, p in named if id(p) not in chosen], "weight_decay": config.weight_decay}]
    if embedding:
        groups.append({"params": embedding, "weight_decay": 0.0, "lr": embedding_lr})
    return optimizer_cls(groups, **kwargs)


def _embedding_lr(config: Config, lr: float) -> float | None:
    if config.embedding_lr_scale is not None:
        return lr * config.embedding_lr_scale
    return config.embedding_lr


def _is_embedding(name: str) -> bool:
    return any(part in name for part in EMBEDDING_NAMES)


def build_lr_scheduler(optimizer, config: Config, total_steps: int):
    warmup = config.derived_warmup_steps(total_steps)
    if config.lr_scheduler == "one_cycle":
        return _one_cycle(optimizer, config, warmup, total_steps)
    factor = _cosine_variant(config, warmup, total_steps)
    if factor is not None:
        from torch.optim.lr_scheduler import LambdaLR

        return LambdaLR(optimizer, factor)
    from transformers import get_scheduler

    return get_scheduler(config.lr_scheduler, optimizer=optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps, scheduler_specific_kwargs=scheduler_arguments(config))


def _cosine_variant(config: Config, warmup: int, total_steps: int) -> Callable[[int], float] | None:
    """Axolotl's own cosine schedules (the config allows each with lr_scheduler: cosine only)."""
    if config.lr_quadratic_warmup:
        return partial(quadratic_warmup_cosine_factor, warmup_steps=warmup, total_steps=total_steps)
    if config.cosine_min_lr_ratio is not None:
        return partial(cosine_min_lr_factor, warmup_steps=warmup, total_steps=total_steps,
                       min_ratio=config.cosine_min_lr_ratio, constant_ratio=config.cosine_constant_lr_ratio)
    return None


def scheduler_arguments(config: Config) -> dict[str, Any]:
    """``lr_scheduler_kwargs``, checked against the schedule's parameters (fails before the model loads)."""
    arguments = dict(config.lr_scheduler_kwargs or {})
    if not arguments:
        return {}
    accepted = _schedule_parameters(config.lr_scheduler)
    for name in arguments:
        if name not in accepted:
            takes = ", ".join(sorted(accepted)) or "nothing"
            raise UserError(f"lr_scheduler_kwargs: lr_scheduler: {config.lr_scheduler} takes no argument "
                            f"'{name}'{did_you_mean(name, accepted)}; it takes: {takes}.")
    return arguments


def _schedule_parameters(name: str) -> set[str]:
    set_by_axlora = {"optimizer", "num_warmup_steps", "num_training_steps", "last_epoch", "max_lr", "total_steps",
                     "epochs", "steps_per_epoch", "div_factor"}
    if name == "one_cycle":
        from torch.optim.lr_scheduler import OneCycleLR as schedule
    else:
        from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

        schedule = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    return set(inspect.signature(schedule).parameters) - set_by_axlora


def _one_cycle(optimizer, config: Config, warmup: int, total_steps: int):
    """Axolotl's one_cycle: torch's OneCycleLR peaking at each group's rate, rising over the warm-up steps."""
    from torch.optim.lr_scheduler import OneCycleLR

    # OneCycleLR peaks at step pct_start * total - 1, and divides by zero when that is step 0: one warm-up step
    # is no warm-up there, and the peak comes before the last step
    rising = min(warmup, total_steps - 1)
    rising = rising if rising > 1 else 0
    arguments = {"pct_start": rising / max(total_steps, 1), "anneal_strategy": "cos", **scheduler_arguments(config)}
    if config.lr_div_factor is not None:
        arguments["div_factor"] = config.lr_div_factor
    peaks = [group["lr"] for group in optimizer.param_groups]
    return OneCycleLR(optimizer, max_lr=peaks, total_steps=max(total_steps, 1), **arguments)


def quadratic_warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Axolotl's ``lr_quadratic_warmup``: (step / warmup)^2 during warm-up, then a half cosine to 0."""
    if step < warmup_steps:
        return (step / max(1, warmup_steps)) ** 2
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def cosine_min_lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float,
                         constant_ratio: float | None = None) -> float:
    """Axolotl's cosine with a floor: linear warm-up, then a half cosine from 1 down to ``min_ratio``.

    With ``constant_ratio`` the cosine reaches the floor at that fraction of all steps and stays there.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    end = total_steps if constant_ratio is None else int(total_steps * constant_ratio)
    progress = (min(step, end) - warmup_steps) / max(1, end - warmup_steps)
    return min_ratio + (1.0 - min_ratio) * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

"""Where and how this process trains: precision, the accelerator, DeepSpeed or FSDP, and the trackers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from axlora.config.fsdp import FsdpSettings, fsdp_settings
from axlora.config.schema import Config
from axlora.train.deepspeed import DeepSpeedSetup
from axlora.train.expert_parallel_setup import start_expert_groups
from axlora.train.integrations import Integrations, start_integrations
from axlora.train.neftune import check_neftune
from axlora.train.optim import resolve_optimizer, scheduler_arguments
from axlora.train.parallel import DataParallel, deepspeed_setup, make_accelerator, prepare_parallel
from axlora.train.precision import Precision, choose_precision


@dataclass
class Runtime:
    """The run's process-level setup; ``say`` prints on the main process only."""

    accelerator: Any
    precision: Precision
    optimizer_choice: tuple[type, dict[str, Any]]  # resolved before the model loads: a bad name fails in seconds
    deepspeed: DeepSpeedSetup | None
    fsdp: FsdpSettings | None
    integrations: Integrations
    say: Callable[[str], None]
    expert_group: Any = None  # expert_parallel_size: this process's group (``train.expert_parallel_setup``)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def zero_stage(self) -> int | None:
        return self.deepspeed.stage if self.deepspeed else None

    def wrap(self, model, optimizer) -> tuple[Any, DataParallel]:
        """The model and optimizer prepared for this run's kind of parallelism (DDP, ZeRO or FSDP)."""
        model, parallel = prepare_parallel(self.accelerator, model, optimizer, self.zero_stage, self.fsdp)
        if self.expert_group is not None:  # each forward exchanges tokens: every rank runs as many forwards
            parallel.sharded_weights = True
        if self.fsdp:
            self.say(_sharding_line(self.fsdp, parallel.figures, self.world_size))
        return model, parallel


def start_runtime(config: Config, log: Callable[[str], None]) -> Runtime:
    """Choose precision and optimizer, start the accelerator (and process group), report, start trackers."""
    precision = choose_precision(config)
    optimizer_choice = resolve_optimizer(config)
    scheduler_arguments(config)  # an unknown schedule argument fails before the model loads
    check_neftune(config)
    deepspeed = deepspeed_setup(config, precision.name)
    fsdp = fsdp_settings(config)
    accelerator = make_accelerator(config, precision.mixed_precision, deepspeed)
    expert_group = start_expert_groups(config, accelerator.num_processes, accelerator.process_index)
    is_main = accelerator.is_main_process
    say = log if is_main else _silent
    if deepspeed:
        for note in deepspeed.notes:
            say(f"note: {note}")
        say(f"deepspeed: ZeRO stage {deepspeed.stage} ({deepspeed.source}) on {accelerator.num_processes} process(es)")
    for note in fsdp.notes if fsdp else ():
        say(f"note: {note}")
    integrations = start_integrations(config, log=say, enabled=is_main)
    return Runtime(accelerator, precision, optimizer_choice, deepspeed, fsdp, integrations, say, expert_group)


def _silent(*_) -> None:
    pass


def _sharding_line(fsdp: FsdpSettings, figures: dict, world_size: int) -> str:
    share = figures["sharded_parameters_on_this_rank"] / max(figures["sharded_parameters"], 1)
    return (f"fsdp: {fsdp.describe()} over {world_size} process(es), {figures['layers_sharded']} layers: rank 0 "
            f"holds {figures['sharded_parameters_on_this_rank']:,} of {figures['sharded_parameters']:,} base weights "
            f"({100 * share:.1f}%); the adapter's {figures['whole_parameters'] - figures['int8_parameters']:,}"
            + (f" and the int8 base's {figures['int8_parameters']:,}" if figures["int8_parameters"] else "")
            + " stay whole on every rank")

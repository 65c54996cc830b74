"""Resuming a run: decided before the model loads, restored once the model is ready.

A changed dataset or batch shape is refused before the model loads (seconds, not minutes). The adapter's
weights go into the plain peft model before it is wrapped; optimizer, scheduler and RNG state after, since
under ZeRO the optimizer state belongs to the engine's partitions. RNG comes last: nothing may draw after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from axlora.config.schema import Config
from axlora.core.layout import RunLayout
from axlora.train import checkpoint as ckpt
from axlora.train.early_stopping import EarlyStopping
from axlora.train.metrics import set_aside_earlier_logs
from axlora.train.runtime import Runtime


@dataclass
class Resume:
    """The checkpoint this run continues (``state`` None: a fresh run) and the settings it must share."""

    checkpoint: Path | None
    state: dict[str, Any] | None
    key: ckpt.ResumeKey

    @property
    def resuming(self) -> bool:
        return self.state is not None


def decide_resume(config: Config, runtime: Runtime, checkpoint: Path | None, data_fingerprint: str) -> Resume:
    """Check ``checkpoint`` against this run's data and batch shape, and tidy ``output_dir/checkpoints``.

    A fresh run sets an earlier run's checkpoints and logs aside; a resumed one drops half-written saves.
    """
    key = ckpt.ResumeKey.for_run(config, data_fingerprint, runtime.world_size, runtime.zero_stage)
    state = ckpt.read_checkpoint_state(checkpoint, key) if checkpoint is not None else None
    if runtime.is_main:
        output_dir = Path(config.output_dir)
        if state is None:
            ckpt.set_aside_earlier_checkpoints(output_dir, runtime.say)
            set_aside_earlier_logs(RunLayout(output_dir), runtime.say)
        else:
            ckpt.remove_unfinished_saves(output_dir, runtime.say)
    return Resume(checkpoint, state, key)


def load_checkpoint_adapter(resume: Resume, peft_model) -> None:
    """The checkpoint's adapter weights, after checking its LoRA settings match this run's."""
    assert resume.checkpoint is not None
    ckpt.check_adapter_unchanged(resume.checkpoint, peft_model)
    ckpt.load_adapter_weights(peft_model, resume.checkpoint)


def restore_training_state(resume: Resume, parallel, scheduler, early: EarlyStopping) -> None:
    """Optimizer, scheduler, early stopping and RNG as the checkpoint left them (call after wrapping)."""
    assert resume.checkpoint is not None and resume.state is not None
    ckpt.load_training_state(resume.checkpoint, parallel, scheduler)  # RNG last: nothing may draw after it
    early.restore(resume.state.get("early_stopping"), ckpt.load_best_adapter(resume.checkpoint))

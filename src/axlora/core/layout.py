"""The output directory a run writes, in one place (see the design's Outputs)::

    output_dir/
      final/                 the adapter, tokenizer, axlora.yml and train_summary.json
      checkpoints/step-N/    full training state, published by one rename when complete
      checkpoints-earlier-K/ an earlier run's checkpoints, set aside by a fresh run
      logs-earlier-K/        an earlier run's logs, set aside by a fresh run
      run.lock               the running run's pid, host and start time (one run per output_dir)
      merged/                merge-lora's plain model
      logs/                  metrics.jsonl, tensorboard events, the loss curve
      prepared/              the tokenized-data cache (unless dataset_prepared_path says elsewhere)

Every layer that reads or writes these paths asks here, so a later run, merge-lora and a resumed run agree on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from axlora.core.names import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN

CHECKPOINT_STATE = "trainer_state.json"
"""Written last into a checkpoint: a ``step-N`` directory without it is not a checkpoint."""

TRAIN_SUMMARY = "train_summary.json"
_STEP_PREFIX = "step-"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run's ``output_dir``."""

    root: Path

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def prepared(self) -> Path:
        return self.root / "prepared"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"{_STEP_PREFIX}{step}"

    def earlier_checkpoints(self, index: int) -> Path:
        return self.root / f"checkpoints-earlier-{index}"

    def earlier_logs(self, index: int) -> Path:
        return self.root / f"logs-earlier-{index}"

    @property
    def lock(self) -> Path:
        """Held by the run writing this directory (pid, host, start time); see ``core.run_lock``."""
        return self.root / "run.lock"

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first.

        Only ``step-N`` directories holding the state file count: a save builds ``.step-N.tmp-PID`` and renames
        it into place when complete, so a save killed half way leaves nothing a resume would trust.
        """
        try:
            children = list(self.checkpoints.iterdir()) if self.checkpoints.is_dir() else []
        except OSError:
            return []
        found = []
        for child in children:
            number = child.name[len(_STEP_PREFIX):]
            if child.name.startswith(_STEP_PREFIX) and number.isdigit() and (child / CHECKPOINT_STATE).is_file():
                found.append((int(number), child))
        return [path for _, path in sorted(found)]


def is_adapter_dir(path: Path) -> bool:
    """Whether ``path`` holds a peft adapter (its config and weights)."""
    try:
        return (path / ADAPTER_CONFIG).is_file() and any(
            (path / name).is_file() for name in (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN)
        )
    except OSError:
        return False

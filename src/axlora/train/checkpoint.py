"""Resumable checkpoints (``checkpoints/step-N/``) and the final adapter, written atomically.

A checkpoint holds everything a resumed run needs to continue exactly where the uninterrupted run would
be: adapter weights, optimizer, scheduler, every RNG state, and the step (which fixes the data position,
see ``schedule``). It also records the settings that must not change across a resume, so a changed
dataset or batch shape is refused with an explanation instead of silently training something else.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from axlora.atomic import atomic_directory
from axlora.config.schema import Config
from axlora.errors import UserError
from axlora.model.adapter import complete_checkpoints

STATE_FILE = "trainer_state.json"
RESOLVED_CONFIG = "axlora.yml"


@dataclass
class ResumeKey:
    """Settings a resumed run must share with the run that wrote the checkpoint."""

    data_fingerprint: str
    sequence_len: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    sample_packing: bool
    seed: int

    def differences(self, other: dict[str, Any]) -> list[str]:
        ours = asdict(self)
        return [
            f"{key}: checkpoint has {other.get(key)!r}, this run has {value!r}"
            for key, value in ours.items()
            if other.get(key) != value
        ]


def write_resolved_config(config: Config, path: Path) -> None:
    """The config as the run used it (paths absolute, defaults filled in): re-runnable as is."""
    data = config.model_dump(mode="json", exclude_none=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    save_adapter,
    optimizer,
    scheduler,
    config: Config,
    resume_key: ResumeKey,
    extra_state: dict[str, Any],
    save_total_limit: int | None,
) -> Path:
    """Write ``checkpoints/step-N`` atomically, then prune the oldest beyond ``save_total_limit``."""
    import torch

    target = output_dir / "checkpoints" / f"step-{step}"
    with atomic_directory(target) as tmp:
        save_adapter(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng_state.pt")
        write_resolved_config(config, tmp / RESOLVED_CONFIG)
        state = {"step": step, "resume_key": asdict(resume_key), **extra_state}
        # written last inside the temporary dir; the rename publishes the whole checkpoint at once
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    if save_total_limit:
        for old in complete_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def resolve_resume(config: Config, log=print) -> Path | None:
    """The checkpoint ``resume_from_checkpoint`` names (``auto``: newest complete one, or none yet)."""
    value = config.resume_from_checkpoint
    if value is None:
        return None
    if value == "auto":
        found = complete_checkpoints(Path(config.output_dir))
        if not found:
            log(f"resume: auto found no checkpoint under {config.output_dir}/checkpoints; starting fresh")
            return None
        return found[-1]
    path = Path(value)
    if not (path / STATE_FILE).is_file():
        raise UserError(
            f"resume_from_checkpoint: '{path}' is not a complete axlora checkpoint (no {STATE_FILE}); "
            "expected output_dir/checkpoints/step-N or auto."
        )
    return path


def read_checkpoint_state(path: Path, resume_key: ResumeKey) -> dict[str, Any]:
    """The checkpoint's state, after checking that the run's data and batch shape are unchanged."""
    state = json.loads((path / STATE_FILE).read_text())
    differences = resume_key.differences(state.get("resume_key", {}))
    if differences:
        raise UserError(
            f"resume_from_checkpoint: cannot resume {path} exactly; these settings changed:\n  "
            + "\n  ".join(differences)
            + "\nEither restore them, or start a new run that continues this checkpoint's adapter with "
            f"lora_model_dir: {path} (and no resume_from_checkpoint)."
        )
    return state


def load_training_state(path: Path, optimizer, scheduler) -> None:
    import torch

    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    restore_rng_state(torch.load(path / "rng_state.pt", weights_only=False))

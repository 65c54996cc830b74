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

from axlora.config.schema import Config
from axlora.core.atomic import atomic_directory, recover_directory
from axlora.core.errors import UserError
from axlora.core.layout import CHECKPOINT_STATE, RunLayout
from axlora.core.names import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RESOLVED_CONFIG
from axlora.train.checkpoint_verify import FILES_KEY, checkpoint_problem, file_record
from axlora.train.divergence import require_finite
from axlora.train.parallel import check_complete

BEST_ADAPTER = "best_adapter.safetensors"
REFERENCE_LOGPS = "reference_logps.safetensors"


@dataclass
class ResumeKey:
    """Settings a resumed run must share with the run that wrote the checkpoint.

    Together they fix which rows each step trains on and how its loss is normalized, so a resume with any
    of them changed would silently train something else than the interrupted run.
    """

    data_fingerprint: str
    datasets: list[str]
    val_set_size: float
    train_on_inputs: bool
    sequence_len: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int
    sample_packing: bool
    seed: int
    zero_stage: int | None = None  # DeepSpeed partitions the optimizer state per rank and stage

    @classmethod
    def for_run(cls, config: Config, data_fingerprint: str, world_size: int, zero_stage: int | None) -> ResumeKey:
        return cls(
            data_fingerprint=data_fingerprint,
            datasets=[_describe_dataset(d) for d in config.datasets or config.pretraining_dataset or []],
            val_set_size=config.val_set_size,
            train_on_inputs=config.train_on_inputs,
            sequence_len=config.sequence_len,
            micro_batch_size=config.micro_batch_size,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            world_size=world_size,
            sample_packing=config.sample_packing,
            seed=config.seed,
            zero_stage=zero_stage,
        )

    def differences(self, other: dict[str, Any]) -> list[str]:
        """One line per changed setting, in the user's terms ("checkpoint has X, this run has Y")."""
        changed = [key for key, value in asdict(self).items() if other.get(key) != value]
        if "data_fingerprint" in changed and len(changed) > 1:
            changed.remove("data_fingerprint")  # explained by the named settings that changed with it
        ours = asdict(self)
        lines = []
        for key in changed:
            if key == "data_fingerprint":
                lines.append("the prepared data: the dataset files' content or the tokenizer changed "
                             f"(fingerprint {other.get(key)} -> {ours[key]})")
            else:
                lines.append(f"{_KEY_LABELS.get(key, key)}: checkpoint has {other.get(key)!r}, "
                             f"this run has {ours[key]!r}")
        return lines


_KEY_LABELS = {"world_size": "number of processes (world size)", "zero_stage": "DeepSpeed ZeRO stage"}
# Settings an exact resume takes from the checkpoint's optimizer and scheduler state, not from the YAML.
_OPTIMIZER_KEYS = ("learning_rate", "lr_scheduler", "warmup_steps", "warmup_ratio", "optimizer", "weight_decay",
                   "adam_beta1", "adam_beta2", "adam_epsilon")


def _describe_dataset(dataset) -> str:
    text = f"{dataset.label} ({dataset.type}, split {dataset.split}"
    text += f", files {dataset.data_files}" if dataset.data_files else ""
    text += f", name {dataset.name}" if dataset.name else ""
    return text + ")"


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


def save_adapter(peft_model, directory: Path) -> None:
    """``save_pretrained``, after checking that no tensor is empty (a ZeRO-3 slice read without gathering)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    check_complete(state, str(directory))
    require_finite(state, str(directory))
    peft_model.save_pretrained(directory)


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    parallel,
    save_adapter,
    scheduler,
    config: Config,
    resume_key: ResumeKey,
    extra_state: dict[str, Any],
    save_total_limit: int | None,
    best_adapter: dict | None = None,
    reference_logps: dict | None = None,
) -> Path:
    """Write ``checkpoints/step-N`` atomically, then prune the oldest beyond ``save_total_limit``.

    Called on every rank. Each rank first stages what only it holds (its RNG state and, under DeepSpeed
    ZeRO, its partition of the optimizer state) as ``rank-R.pt``; the main process then writes the rest
    and publishes everything with one rename, so a checkpoint is whole for all ranks or absent. (On
    several machines ``output_dir`` must therefore be on a shared filesystem.) ``best_adapter`` (the
    weights of the best evaluation so far, for early stopping) travels with the checkpoint so a resumed run
    still ends with the best adapter, even one from before the interruption. ``reference_logps`` (preference
    rows' reference log-probs, where a resumed run cannot compute them again) travel with it the same way.
    """
    import torch
    from safetensors.torch import save_file

    target = RunLayout(output_dir).checkpoint(step)
    staging = target.with_name(f".{target.name}.tmp-ranks")
    per_rank = parallel.world_size > 1 or parallel.sharded_optimizer
    if per_rank:
        staging.mkdir(parents=True, exist_ok=True)
        mine = {"rng": rng_state()}
        if parallel.sharded_optimizer:
            mine["optimizer"] = parallel.optimizer_state()
        torch.save(mine, staging / f"rank-{parallel.rank}.pt")
    parallel.barrier()
    with parallel.gathered_adapter():
        if parallel.is_main:
            with atomic_directory(target) as tmp:
                save_adapter(tmp)
                if not parallel.sharded_optimizer:
                    torch.save(parallel.optimizer_state(), tmp / "optimizer.pt")
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
                torch.save(rng_state(), tmp / "rng_state.pt")
                if per_rank:
                    for rank in range(parallel.world_size):
                        (staging / f"rank-{rank}.pt").rename(tmp / f"rank-{rank}.pt")
                if best_adapter is not None:
                    save_file({k: v.contiguous() for k, v in best_adapter.items()}, str(tmp / BEST_ADAPTER))
                if reference_logps is not None:
                    save_file(reference_logps, str(tmp / REFERENCE_LOGPS))
                write_resolved_config(config, tmp / RESOLVED_CONFIG)
                state = {"step": step, "resume_key": asdict(resume_key), **extra_state, FILES_KEY: file_record(tmp)}
                # written last inside the temporary dir; the rename publishes the whole checkpoint at once
                (tmp / CHECKPOINT_STATE).write_text(json.dumps(state, indent=2))
            shutil.rmtree(staging, ignore_errors=True)
            if save_total_limit:
                for old in RunLayout(output_dir).complete_checkpoints()[:-save_total_limit]:
                    shutil.rmtree(old, ignore_errors=True)
    parallel.barrier()
    return target


def resolve_resume(config: Config, log=print) -> Path | None:
    """The checkpoint ``resume_from_checkpoint`` names, verified (``auto``: the newest intact one, or none yet)."""
    value = config.resume_from_checkpoint
    if value is None:
        return None
    if value == "auto":
        return _newest_intact(RunLayout(Path(config.output_dir)), log)
    path = Path(value)
    if not (path / CHECKPOINT_STATE).is_file():
        raise UserError(
            f"resume_from_checkpoint: '{path}' is not a complete axlora checkpoint (no {CHECKPOINT_STATE}); "
            "expected output_dir/checkpoints/step-N or auto."
        )
    problem = checkpoint_problem(path)
    if problem:
        raise UserError(f"resume_from_checkpoint: {path} is damaged: {problem}. Name an earlier checkpoint, or "
                        "use auto, which takes the newest intact one.")
    return path


def _newest_intact(layout: RunLayout, log) -> Path | None:
    """The newest complete checkpoint that verifies; each newer damaged one is named with its problem."""
    found = layout.complete_checkpoints()
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            newest = " (the newest intact one)" if path != found[-1] else ""
            log(f"resume: auto picked the newest complete checkpoint, checkpoints/{path.name}{newest}")
            return path
        log(f"resume: skipped checkpoints/{path.name}: {problem}")
    what = "no intact checkpoint" if found else "no complete checkpoint"
    log(f"resume: auto found {what} under {layout.checkpoints}; starting fresh")
    return None


def read_checkpoint_state(path: Path, resume_key: ResumeKey) -> dict[str, Any]:
    """The checkpoint's state, after checking that the run's data and batch shape are unchanged."""
    try:
        state = json.loads((path / CHECKPOINT_STATE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"resume_from_checkpoint: cannot read {path / CHECKPOINT_STATE}: {exc}") from None
    differences = resume_key.differences(state.get("resume_key", {}))
    if differences:
        raise _refused_resume(path, differences)
    return state


def check_adapter_unchanged(path: Path, peft_model) -> None:
    """Refuse a resume whose LoRA (rank, alpha, dropout, targets) differs from the checkpoint's."""
    try:
        saved = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"resume_from_checkpoint: cannot read {path / ADAPTER_CONFIG}: {exc}") from None
    current = peft_model.peft_config[peft_model.active_adapter]
    differences = []
    for yaml_key, peft_key in _ADAPTER_KEYS.items():
        theirs, ours = _comparable(saved.get(peft_key)), _comparable(getattr(current, peft_key, None))
        if theirs != ours:
            differences.append(f"{yaml_key}: checkpoint has {theirs!r}, this run has {ours!r}")
    if differences:
        raise _refused_resume(path, differences)


_ADAPTER_KEYS = {"lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
                 "peft_use_rslora": "use_rslora", "lora_target_modules": "target_modules"}


def _comparable(value):
    return sorted(value) if isinstance(value, list | set | tuple) else value


def _refused_resume(path: Path, differences: list[str]) -> UserError:
    return UserError(
        f"resume_from_checkpoint: cannot resume {path} exactly; these settings differ from the run "
        "that wrote it:\n  " + "\n  ".join(differences)
        + "\nA resume replays the interrupted run step by step, so they must match. Two ways forward:\n"
        "  1. restore the settings above and resume again: the run ends exactly where the "
        "uninterrupted one would;\n"
        f"  2. continue the checkpoint's adapter as a new run: set lora_model_dir: {path}, remove "
        "resume_from_checkpoint and set a new output_dir (the adapter's weights carry over; optimizer, "
        "learning-rate schedule and step start afresh with the new settings)."
    )


def resume_notes(path: Path, config: Config, state: dict[str, Any], total_steps: int) -> list[str]:
    """Warnings for settings that changed since the checkpoint but do not stop an exact resume."""
    notes = []
    try:
        earlier = yaml.safe_load((path / RESOLVED_CONFIG).read_text()) or {}
    except (OSError, yaml.YAMLError):
        earlier = {}
    now = config.model_dump(mode="json")
    for key in _OPTIMIZER_KEYS:
        if key in earlier and earlier[key] != now.get(key):
            notes.append(f"{key}: checkpoint has {earlier[key]!r}, this run has {now.get(key)!r}; a resume "
                         "restores the checkpoint's optimizer and scheduler state, so the change may not take "
                         "effect (to train on with new settings, continue with lora_model_dir instead)")
    planned = state.get("total_steps")
    if planned is not None and planned != total_steps:
        notes.append(f"total steps: checkpoint planned {planned}, this run plans {total_steps}; the "
                     f"learning-rate schedule follows the new total from step {state['step']} on")
    return notes


def set_aside_earlier_checkpoints(output_dir: Path, log=print) -> Path | None:
    """A fresh run moves an earlier run's checkpoints in its ``output_dir`` to ``checkpoints-earlier-N/``.

    Left in place, a later ``resume_from_checkpoint: auto`` (a re-queued job) would take the earlier run's
    checkpoint for this run's; deleted, a run started without ``auto`` by mistake would throw away hours of
    training. Moved aside, they can still be resumed (``resume_from_checkpoint: <that dir>/step-N``).
    Half-written saves are never trusted and are removed. Returns where the checkpoints went.
    """
    remove_unfinished_saves(output_dir, log)
    earlier = RunLayout(output_dir).complete_checkpoints()
    if not earlier:
        return None
    index = 1
    layout = RunLayout(output_dir)
    while layout.earlier_checkpoints(index).exists():
        index += 1
    target = layout.earlier_checkpoints(index)
    layout.checkpoints.rename(target)
    log(f"checkpoints: this run starts fresh; the {len(earlier)} checkpoint(s) of an earlier run in this output_dir "
        f"({', '.join(p.name for p in earlier)}) are moved to {target} (resume_from_checkpoint: auto would have "
        "continued them; delete that directory once it is not needed)")
    return target


def remove_unfinished_saves(output_dir: Path, log=print) -> None:
    """Tidy what killed saves left in ``checkpoints/``: restore, delete, never lose a complete checkpoint.

    ``.step-N.old-PID`` is a complete checkpoint a replacement had set aside when it was killed: put back
    where ``step-N`` is missing (and said so), else deleted. ``.step-N.tmp-PID`` was never complete: deleted
    (the run lock guarantees no other run is still writing it).
    """
    root = RunLayout(output_dir).checkpoints
    if not root.is_dir():
        return
    for child in list(root.iterdir()):
        if child.name.startswith(".step-") and ".old-" in child.name:
            recover_directory(root / child.name[1:child.name.index(".old-")], log)
    for child in list(root.iterdir()):
        if child.name.startswith(".step-") and (".tmp-" in child.name or ".old-" in child.name):
            shutil.rmtree(child, ignore_errors=True)


def load_adapter_weights(peft_model, checkpoint_dir: Path) -> None:
    """The checkpoint's adapter weights into this run's LoRA (refused if it holds weights the LoRA lacks)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint_dir / ADAPTER_WEIGHTS))
    # after a vocabulary resize peft also saves each trained embedding as `<module>.modules_to_save.weight`, a
    # copy of `<module>.weight` that its own loader does not read back; the canonical key carries the weights
    weights = {name: tensor for name, tensor in weights.items()
               if not (".modules_to_save." in name and name.replace(".modules_to_save.", ".") in weights)}
    result = set_peft_model_state_dict(peft_model, weights)
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise UserError(f"resume_from_checkpoint: {checkpoint_dir} holds adapter weights this run's LoRA "
                        f"lacks ({unexpected[:3]}); was it written with other adapter settings?")


def load_training_state(path: Path, parallel, scheduler) -> None:
    """Optimizer, scheduler and this rank's RNG state; RNG last, so nothing after it draws from the RNG."""
    import torch

    rank_file = path / f"rank-{parallel.rank}.pt"
    mine = torch.load(rank_file, weights_only=False) if rank_file.is_file() else {}
    if parallel.sharded_optimizer:
        parallel.load_optimizer_state(mine["optimizer"])
    else:
        parallel.load_optimizer_state(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    restore_rng_state(mine.get("rng") or torch.load(path / "rng_state.pt", weights_only=False))


def load_best_adapter(path: Path) -> dict | None:
    """The best-so-far adapter weights a checkpoint carries (None when it was written without early stopping)."""
    from safetensors.torch import load_file

    best = path / BEST_ADAPTER
    return load_file(str(best)) if best.is_file() else None


def load_reference_logps(path: Path) -> dict | None:
    """The reference log-probs a checkpoint carries (None when its run saved none: it needed no precomputed ones)."""
    from safetensors.torch import load_file

    saved = path / REFERENCE_LOGPS
    return load_file(str(saved)) if saved.is_file() else None

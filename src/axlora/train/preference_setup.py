"""What ``rl:`` adds to a run's setup: the preference rows, the objective, and its reference.

The reference is never a second copy of the base. For a fresh LoRA it is the policy with its adapter
disabled, computed at each step (or once before training with ``precompute_ref_log_probs``). When continuing
an adapter, the reference is that adapter as it was when the round started: its log-probs are computed in one
pass before the first step (and before a checkpoint's weights are loaded on resume), so the reference is
exactly the policy at step 0 and the DPO loss starts at ln 2. Under ZeRO-3, whose engine must hold the
checkpoint's adapter from its start, a resumed run reads them from its checkpoint instead.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.data.preference_prepare import prepare_preferences, renderer_for
from axlora.model.adapter_choice import AdapterChoice
from axlora.model.tokenizer import load_tokenizer, tokenizer_fingerprint
from axlora.train import checkpoint as ckpt
from axlora.train.data_setup import TrainingData
from axlora.train.preference_batch import PreferenceCollator, answer_logps
from axlora.train.preference_step import PreferenceObjective
from axlora.train.resume import Resume, load_checkpoint_adapter
from axlora.train.runtime import Runtime


@dataclass
class PreparedPreferences:
    """Preference rows as the run reads them; ``fingerprint`` keys checkpoints like the supervised cache's."""

    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    fingerprint: str
    report: dict[str, Any] = field(default_factory=dict)


def prepare_preference_rows(config: Config, runtime: Runtime) -> tuple[Any, PreparedPreferences]:
    tokenizer = load_tokenizer(config, log=runtime.say)
    data = prepare_preferences(config, tokenizer, runtime.say)
    digest = hashlib.sha256(tokenizer_fingerprint(tokenizer).encode())
    for rows in (data.train, data.val):
        digest.update(json.dumps(rows, sort_keys=True).encode())
    return tokenizer, PreparedPreferences(data.train, data.val, digest.hexdigest()[:16], data.report)


def lay_out_preference_rows(config: Config, tokenizer, prepared: PreparedPreferences, say) -> TrainingData:
    collate = PreferenceCollator(pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                 else tokenizer.eos_token_id)
    return TrainingData(tokenizer, prepared, prepared.train, collate, prepared.val, collate)  # type: ignore[arg-type]


def preference_prompt_texts(config: Config, tokenizer) -> list[str]:
    """``sample_prompts`` as the first preference dataset renders a prompt (a user message)."""
    renderer = renderer_for(config, config.datasets[0], tokenizer, 0)  # type: ignore[arg-type]
    return [renderer.prompt([{"role": "user", "content": str(prompt)}]) for prompt in config.sample_prompts or ()]


def build_objective(config: Config, model, adapter: AdapterChoice, data: TrainingData, runtime: Runtime
                    ) -> PreferenceObjective:
    """The objective; reference log-probs computed now where the method needs them and must not move (under
    FSDP and ZeRO-3 once the weights are placed: ``attach_deferred_reference``)."""
    objective, say = PreferenceObjective(config), runtime.say
    if not config.uses_reference():
        say(f"preference: rl: {config.rl}, beta {config.beta():g}, no reference model")
        return objective
    continuing = adapter.case == "continue"
    if not (continuing or config.precompute_ref_log_probs):
        objective.disabled_adapter = model.disable_adapter
        say(f"preference: rl: {config.rl}, beta {config.beta():g}; reference: the base model (adapter disabled)")
    elif runtime.fsdp or runtime.zero_stage == 3:
        objective.deferred_reference = "adapter" if continuing else "base"
        objective.reference_checkpointed = runtime.zero_stage == 3
    else:
        _place_for_reference_pass(config, model, runtime)
        _reference_pass(config, model, data, runtime, from_base=not continuing)
    return objective


def loads_adapter_after_reference(objective: PreferenceObjective | None) -> bool:
    """Whether a resumed run loads its checkpoint's adapter after the reference pass (FSDP), not before wrapping."""
    return (objective is not None and objective.deferred_reference is not None
            and not objective.reference_checkpointed)


def attach_deferred_reference(config: Config, objective: PreferenceObjective, model, data: TrainingData,
                              runtime: Runtime, resume: Resume) -> None:
    """The reference once the weights are placed; ``model`` is the unwrapped peft model.

    FSDP: the pass on the sharded model, right after wrapping (a rank may not hold the whole base before:
    ``cpu_ram_efficient_loading``), then a resumed run's checkpoint adapter (whole on every rank). ZeRO-3: the
    weights load partitioned, so the pass runs once the engine has started; a resumed run's engine already
    holds the checkpoint's adapter (its fp32 copies live in the optimizer's partitions, so it cannot be swapped
    in later), and its reference log-probs are read from the checkpoint, which saved those of the first pass.
    In a pass every rank runs the forwards of every row, each gathering the weights from all ranks, so every
    rank holds all the reference log-probs."""
    if objective.deferred_reference is None:
        return
    from_base = objective.deferred_reference == "base"
    if objective.reference_checkpointed and resume.resuming:
        assert resume.checkpoint is not None
        _read_reference(config, resume.checkpoint, data, runtime, from_base)
    else:
        _reference_pass(config, model, data, runtime, from_base)
    objective.deferred_reference = None
    if resume.resuming and not objective.reference_checkpointed:
        load_checkpoint_adapter(resume, model)


def _reference_source(from_base: bool) -> str:
    return "the base model (adapter disabled)" if from_base else "the adapter this round starts from"


def _reference_pass(config: Config, model, data: TrainingData, runtime: Runtime, from_base: bool) -> None:
    for rows in (data.train_rows, data.val_rows):
        attach_reference_logps(model, rows, data.collate, config.micro_batch_size, disable=from_base,
                               autocast=runtime.accelerator.autocast)
    runtime.say(f"preference: rl: {config.rl}, beta {config.beta():g}; reference: {_reference_source(from_base)}, "
                f"log-probs of {len(data.train_rows) + len(data.val_rows)} rows computed before training")


def reference_tensors(data: TrainingData) -> dict[str, Any]:
    """The rows' reference log-probs as float32 tensors (rows x sequences), as a checkpoint saves them: the
    values are float32 already, so a resumed run reads back exactly what the first pass computed."""
    import torch

    return {split: torch.tensor([row["ref_logps"] for row in rows], dtype=torch.float32)
            for split, rows in (("train", data.train_rows), ("val", data.val_rows)) if rows}


def _read_reference(config: Config, checkpoint: Path, data: TrainingData, runtime: Runtime, from_base: bool) -> None:
    saved = ckpt.load_reference_logps(checkpoint) or {}
    for split, rows in (("train", data.train_rows), ("val", data.val_rows)):
        values = saved.get(split)
        if rows and (values is None or values.shape[0] != len(rows)):
            raise UserError(f"resume_from_checkpoint: {checkpoint} holds no reference log-probs for this run's "
                            f"{len(rows)} {split} rows ({ckpt.REFERENCE_LOGPS}); under DeepSpeed ZeRO-3 a resumed "
                            "run reads them from its checkpoint. Resume it with the rl settings that wrote it, or "
                            "start the round afresh.")
        for row, value in zip(rows, values.tolist() if rows else [], strict=True):
            row["ref_logps"] = value
    runtime.say(f"preference: rl: {config.rl}, beta {config.beta():g}; reference: {_reference_source(from_base)}, "
                f"log-probs of {len(data.train_rows) + len(data.val_rows)} rows read from checkpoints/"
                f"{checkpoint.name}")


def _place_for_reference_pass(config: Config, model, runtime: Runtime) -> None:
    """The reference pass runs before the model is wrapped for parallelism: on this process's device, which the
    wrapping would move the model to anyway."""
    if config.quantization_bits() is None:
        model.to(runtime.accelerator.device)


def attach_reference_logps(model, rows: list[dict[str, Any]], collate, batch_size: int, disable: bool,
                           autocast) -> None:
    """Each row's reference log-probs (``ref_logps``: chosen, rejected; KTO: the completion, the mismatched
    completion), one pass in eval mode, in the precision the steps compute in (so that at step 0 the policy's
    log-probs equal them)."""
    import contextlib

    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad(), (model.disable_adapter() if disable else contextlib.nullcontext()):
        for start in range(0, len(rows), batch_size):
            chunk = [{key: value for key, value in row.items() if key != "ref_logps"}
                     for row in rows[start:start + batch_size]]
            batch = collate(chunk)
            with autocast():
                values = _per_row_logps(model, batch, device)
                if batch.mismatched is not None:
                    values = [mine + other for mine, other in
                              zip(values, _per_row_logps(model, batch.mismatched, device), strict=True)]
            for row, value in zip(rows[start:start + batch_size], values, strict=True):
                row["ref_logps"] = value
    model.train(was_training)


def _per_row_logps(model, batch, device) -> list[list[float]]:
    logps, _ = answer_logps(model, batch, device)
    return logps.logps.float().cpu().view(-1, batch.pairs).T.tolist()  # sides x rows -> rows x sides

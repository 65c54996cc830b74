"""What ``rl:`` adds to a run's setup: the preference rows, the objective, and its reference.

The reference is never a second copy of the base. For a fresh LoRA it is the policy with its adapter
disabled, computed at each step (or once before training with ``precompute_ref_log_probs``). When continuing
an adapter, the reference is that adapter as it was when the round started: its log-probs are computed in one
pass before the first step (and before a checkpoint's weights are loaded on resume), so the reference is
exactly the policy at step 0 and the DPO loss starts at ln 2.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.data.preference_prepare import prepare_preferences, renderer_for
from axlora.model.adapter_choice import AdapterChoice
from axlora.model.tokenizer import load_tokenizer, tokenizer_fingerprint
from axlora.train.data_setup import TrainingData
from axlora.train.preference_batch import PreferenceCollator, answer_logps
from axlora.train.preference_step import PreferenceObjective
from axlora.train.runtime import Runtime


@dataclass
class PreparedPreferences:
    """Preference rows as the run reads them; ``fingerprint`` keys checkpoints like the supervised cache's."""

    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    fingerprint: str
    report: dict[str, Any] = field(default_factory=dict)


def check_preference_run(config: Config) -> None:
    """What a preference run cannot combine with, said before anything loads."""
    if config.rl == "kto":
        raise UserError("rl: kto: axlora prepares KTO datasets but does not train them yet; use dpo, ipo, simpo or "
                        "orpo on chosen / rejected pairs.")


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
    """The objective; reference log-probs computed now where the method needs them and must not move."""
    objective, say = PreferenceObjective(config), runtime.say
    if not config.uses_reference():
        say(f"preference: rl: {config.rl}, beta {config.beta():g}, no reference model")
        return objective
    continuing = adapter.case == "continue"
    if continuing or config.precompute_ref_log_probs:
        _place_for_reference_pass(config, model, runtime)
        source = "the adapter this round starts from" if continuing else "the base model (adapter disabled)"
        for rows in (data.train_rows, data.val_rows):
            attach_reference_logps(model, rows, data.collate, config.micro_batch_size, disable=not continuing,
                                   autocast=runtime.accelerator.autocast)
        say(f"preference: rl: {config.rl}, beta {config.beta():g}; reference: {source}, log-probs of "
            f"{len(data.train_rows) + len(data.val_rows)} rows computed before training")
    else:
        objective.disabled_adapter = model.disable_adapter
        say(f"preference: rl: {config.rl}, beta {config.beta():g}; reference: the base model (adapter disabled)")
    return objective


def _place_for_reference_pass(config: Config, model, runtime: Runtime) -> None:
    """The reference pass runs before the model is wrapped for parallelism: on this process's device, which the
    wrapping would move the model to anyway. Sharded weights (FSDP, ZeRO-3) are not whole on any rank yet."""
    if runtime.fsdp or runtime.zero_stage == 3:
        raise UserError("rl / fsdp, deepspeed zero3: the reference log-probs of a continued adapter (or "
                        "precompute_ref_log_probs) are computed before the weights are sharded, which FSDP and ZeRO-3 "
                        "do not allow yet; use DDP or ZeRO-1/2, or a fresh LoRA without precompute_ref_log_probs.")
    if config.quantization_bits() is None:
        model.to(runtime.accelerator.device)


def attach_reference_logps(model, rows: list[dict[str, Any]], collate, batch_size: int, disable: bool,
                           autocast) -> None:
    """Each row's reference log-probs (``ref_logps``: chosen, rejected), one pass in eval mode, in the precision
    the steps compute in (so that at step 0 the policy's log-probs equal them)."""
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
                logps, _ = answer_logps(model, batch, device)
            values = logps.logps.float().cpu().view(-1, batch.pairs).T.tolist()  # sides x pairs -> pairs x sides
            for row, value in zip(rows[start:start + batch_size], values, strict=True):
                row["ref_logps"] = value
    model.train(was_training)

"""The training run: setup -> train -> save, readable top to bottom.

A small loop on accelerate rather than transformers' Trainer, because the properties users depend on
need control of each step: the loss of an optimizer step is the sum of token losses over all its micro
batches (and processes) divided by the step's global label-token count, so micro batch size, gradient
accumulation, packing and process count do not change what is optimized; the data position is a pure
function of the step, so a resumed run is bitwise the uninterrupted one; and every directory a later run
trusts is written atomically.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from axlora import __version__
from axlora.config.fsdp import fsdp_settings
from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.core.names import RESOLVED_CONFIG
from axlora.data.collate import PackedCollator, PaddedCollator, model_inputs
from axlora.data.pack import pack_examples
from axlora.data.prepare import PreparedData, prepare_data
from axlora.model.adapter import AdapterChoice, attach_adapter, effective_adapter_settings, resolve_adapter
from axlora.model.load import load_base_model, load_tokenizer, require_machine_support, tokenizer_fingerprint
from axlora.train import checkpoint as ckpt
from axlora.train.completions import generate_completions, sample_prompt_texts
from axlora.train.data_order import DataOrder
from axlora.train.fsdp import materialize_empty
from axlora.train.integrations import start_integrations
from axlora.train.intervals import evaluates_at, saves_at
from axlora.train.length_groups import build_data_order
from axlora.train.metrics import MetricsLog
from axlora.train.optim import build_lr_scheduler, build_optimizer, resolve_optimizer
from axlora.train.parallel import check_complete, deepspeed_setup, make_accelerator, prepare_parallel
from axlora.train.precision import choose_precision
from axlora.train.progress import Progress


@dataclass
class RunResult:
    output_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)


def run_training(config: Config, log=print) -> RunResult:
    """Train the LoRA the config describes and write ``output_dir`` (see the design's Outputs)."""
    started = time.perf_counter()
    # decided from the config and the disk alone, before torch loads: a bad lora_model_dir fails in a second
    _check_eval_settings(config)
    plan = resolve_adapter(config)
    require_machine_support(config)  # a missing GPU/bitsandbytes/flash-attn fails in a second
    from accelerate.utils import set_seed

    output_dir = Path(config.output_dir)
    precision = choose_precision(config)
    optimizer_cls, optimizer_kwargs = resolve_optimizer(config)
    deepspeed = deepspeed_setup(config, precision.name)
    fsdp = fsdp_settings(config)
    accelerator = make_accelerator(config, precision.mixed_precision, deepspeed)
    zero_stage = deepspeed.stage if deepspeed else None
    is_main = accelerator.is_main_process
    say = log if is_main else (lambda *_: None)
    if deepspeed:
        for note in deepspeed.notes:
            say(f"note: {note}")
        say(f"deepspeed: ZeRO stage {zero_stage} ({deepspeed.source}) on {accelerator.num_processes} process(es)")
    for note in fsdp.notes if fsdp else ():
        say(f"note: {note}")
    integrations = start_integrations(config, log=say, enabled=is_main)

    # ---- setup: data, resume check, model -----------------------------------------------------------
    resume_from = ckpt.resolve_resume(config, say)
    tokenizer = load_tokenizer(config, log=say)
    with accelerator.main_process_first():  # one rank prepares, the others then read its cache
        prepared = prepare_data(config, tokenizer, tokenizer_fingerprint(tokenizer), say)
    _check_val_rows(config, prepared)
    resume_key = ckpt.ResumeKey.for_run(config, prepared.fingerprint, accelerator.num_processes, zero_stage)
    # refused before the model loads: a changed dataset or batch shape costs seconds, not minutes
    state = ckpt.read_checkpoint_state(resume_from, resume_key) if resume_from is not None else None
    if is_main:
        if state is None:
            ckpt.set_aside_earlier_checkpoints(output_dir, say)
        else:
            ckpt.remove_unfinished_saves(output_dir)
    train_rows, collate = _layout_rows(prepared, config, tokenizer, say)
    val_rows, val_collate = _layout_val(prepared, config, tokenizer)

    set_seed(config.seed)
    # fsdp_config.cpu_ram_efficient_loading: only rank 0 reads the weights; the others get theirs after sharding
    empty = bool(fsdp and fsdp.load_on_main_only and accelerator.num_processes > 1 and not is_main)
    model = load_base_model(config, precision.torch_dtype, tokenizer=tokenizer, log=say, empty=empty)
    # seeded again: the LoRA's initial weights must not depend on what loading drew from the RNG
    # (DeepSpeed ZeRO-3 loads the base partitioned, which draws differently)
    set_seed(config.seed)
    model = attach_adapter(model, config, plan, say)
    if empty:
        materialize_empty(model)
    loss_mode = _loss_mode(config, model, say)
    run_config = _config_as_trained(config, model, plan)
    trainable, total = _count_parameters(model)
    say(f"model: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%), {precision.name}")


    schedule = build_data_order(config, train_rows, accelerator.num_processes)
    total_steps = schedule.total_steps(config.num_epochs, config.max_steps)
    optimizer = build_optimizer(model, config, optimizer_cls, optimizer_kwargs)
    scheduler = build_lr_scheduler(optimizer, config, total_steps)
    early = EarlyStopping(config.early_stopping_patience)

    start_step, totals = 0, {"tokens": 0, "label_tokens": 0, "train_seconds": 0.0}
    if state is not None:
        assert resume_from is not None
        ckpt.check_adapter_unchanged(resume_from, model)
        _load_adapter_weights(model, resume_from)

    model, parallel = prepare_parallel(accelerator, model, optimizer, zero_stage, fsdp)
    if fsdp:
        _report_sharding(fsdp, parallel.figures, accelerator.num_processes, say)
    prompts = sample_prompt_texts(config, tokenizer)
    # under ZeRO-3 and FSDP every rank holds a slice of the weights: all ranks generate (in step), main reports
    sharded_weights = parallel.sharded_weights
    samples_before = (generate_completions(accelerator.unwrap_model(model), tokenizer, prompts,
                                       config.sample_max_new_tokens, synced_ranks=sharded_weights)
                      if is_main or sharded_weights else [])
    if state is not None:
        assert resume_from is not None
        # after prepare: under ZeRO the optimizer state belongs to the engine's partitions
        ckpt.load_training_state(resume_from, parallel, scheduler)  # RNG last: nothing may draw after it
        early.restore(state.get("early_stopping"), ckpt.load_best_adapter(resume_from))
        start_step, totals = state["step"], state.get("totals", totals)
        for note in ckpt.resume_notes(resume_from, config, state, total_steps):
            say(f"warning: resume: {note}")
        say(f"resume: resumed from checkpoints/{resume_from.name} at step {start_step}/{total_steps}")
    metrics = MetricsLog(output_dir / "logs", resume_step=start_step, enabled=is_main)
    integrations.watch(accelerator.unwrap_model(model))
    say(
        f"train: {len(train_rows)} rows, {schedule.rows_per_step} rows/step "
        f"({config.micro_batch_size} micro x {config.gradient_accumulation_steps} accum x "
        f"{accelerator.num_processes} proc), {total_steps} steps, {schedule.steps_per_epoch} steps/epoch"
    )

    # ---- train --------------------------------------------------------------------------------------
    progress = Progress(total_steps, start_step, enabled=is_main)
    last: dict[str, Any] = {}
    eval_loss = state.get("last_eval_loss") if state else None
    if config.eval_on_start and start_step == 0:
        eval_loss = evaluate(model, accelerator, val_rows, val_collate, config.micro_batch_size)
        early.observe(0, eval_loss, accelerator.unwrap_model(model), parallel)
        metrics.write({"step": 0, "eval_loss": eval_loss})
        integrations.log({"step": 0, "eval_loss": eval_loss})
        progress.log_line(0, {"eval_loss": eval_loss})
    done = start_step
    for step in range(start_step, total_steps):
        step_started = time.perf_counter()
        loss, grad_norm, tokens, label_tokens = _train_step(
            model, parallel, schedule, step, train_rows, collate, config.max_grad_norm, loss_mode
        )
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        seconds = time.perf_counter() - step_started
        totals["tokens"] += tokens
        totals["label_tokens"] += label_tokens
        totals["train_seconds"] += seconds
        done = step + 1
        last = {"step": done, "epoch": round(schedule.epoch_of(done), 4), "loss": loss, "lr": lr,
                "grad_norm": grad_norm, "tokens_per_second": tokens / max(seconds, 1e-9)}
        progress.update(done, last)
        row: dict[str, Any] | None = dict(last) if (done % config.logging_steps == 0 or done == total_steps) else None
        if val_rows and evaluates_at(config, done, total_steps, schedule.steps_per_epoch):
            eval_loss = evaluate(model, accelerator, val_rows, val_collate, config.micro_batch_size)
            early.observe(done, eval_loss, accelerator.unwrap_model(model), parallel)
            row = {**(row or {"step": done}), "eval_loss": eval_loss}
        if row is not None:
            metrics.write(row)
            integrations.log(row)
            progress.log_line(done, row)
        if early.should_stop and done < total_steps:
            say(f"early stopping: eval_loss has not improved on step {early.best_step}'s "
                f"{early.best_eval_loss:.4f} for {early.patience} evaluations; stopping at step {done}")
            break
        if saves_at(config, done, total_steps, schedule.steps_per_epoch):
            ckpt.save_checkpoint(
                output_dir, done, parallel=parallel,
                save_adapter=lambda d: _save_adapter(accelerator.unwrap_model(model), d),
                scheduler=scheduler, config=run_config, resume_key=resume_key,
                extra_state={"totals": totals, "total_steps": total_steps, "last_eval_loss": eval_loss,
                             "early_stopping": early.state()},
                save_total_limit=config.save_total_limit,
                best_adapter=early.best_weights,
            )
    progress.close()

    # ---- save ---------------------------------------------------------------------------------------
    unwrapped = accelerator.unwrap_model(model)
    if early.enabled and early.best_step is not None:
        with parallel.gathered_adapter(modify=True):
            early.restore_best(unwrapped)
        say(f"final: the best adapter, step {early.best_step} (eval_loss {early.best_eval_loss:.4f}), "
            f"of {done} steps trained")
    samples_after = (generate_completions(unwrapped, tokenizer, prompts, config.sample_max_new_tokens,
                                      synced_ranks=sharded_weights)
                     if is_main or sharded_weights else [])
    summary = {
        "axlora_version": __version__,
        "steps": done,
        "planned_steps": total_steps,
        "resumed_from_step": start_step or None,
        "epochs": round(schedule.epoch_of(done), 4),
        "world_size": accelerator.num_processes,
        "deepspeed": {"config": deepspeed.source, "zero_stage": zero_stage} if deepspeed else None,
        "fsdp": {"sharding": fsdp.describe(), **parallel.figures} if fsdp else None,
        "adapter": {"case": plan.case, "reason": plan.reason,
                    "continued_from": str(plan.adapter_dir) if plan.adapter_dir else None},
        "train_rows": len(prepared.train),
        "val_rows": len(prepared.val),
        "tokens": totals["tokens"],
        "label_tokens": totals["label_tokens"],
        "tokens_per_second": totals["tokens"] / max(totals["train_seconds"], 1e-9),
        "final_train_loss": last.get("loss"),
        "final_eval_loss": eval_loss,
        "early_stopping": early.summary(done, total_steps) if early.enabled else None,
        "peak_memory_bytes": _peak_memory(),
        "wall_seconds": time.perf_counter() - started,
        "precision": precision.name,
        "samples": [
            {"prompt": p, "before": b, "after": a}
            for p, b, a in zip(prompts, samples_before, samples_after, strict=True)
        ] if is_main else [],  # only the main process generates (under ZeRO-3 and FSDP all do, main reports)
        "versions": _versions(),
    }
    with parallel.gathered_adapter():
        if is_main:
            _write_final(output_dir, unwrapped, tokenizer, run_config, summary)
    if is_main:
        metrics.plot_loss()
        metrics.close()
        _print_samples(summary["samples"], say)
        say(f"saved: {output_dir / 'final'}")
        integrations.finish(output_dir / "final", summary)
    accelerator.wait_for_everyone()
    return RunResult(output_dir=output_dir, summary=summary)


def _check_eval_settings(config: Config) -> None:
    """Evaluation features need a validation split, and early stopping needs evaluations to count."""
    for key in ("eval_on_start", "early_stopping_patience"):
        if getattr(config, key) and not config.val_set_size:
            raise UserError(f"{key}: needs validation rows to evaluate; set val_set_size (e.g. 0.05).")
    if config.early_stopping_patience and config.eval_steps is None:
        raise UserError("early_stopping_patience: needs eval_steps (evaluate every N steps) so that "
                        "evaluations without improvement can be counted.")


def _check_val_rows(config: Config, prepared: PreparedData) -> None:
    for key in ("eval_on_start", "early_stopping_patience"):
        if getattr(config, key) and not prepared.val:
            raise UserError(f"{key}: val_set_size {config.val_set_size:g} leaves no validation rows; "
                            "raise it (a fraction, or a row count >= 1).")


def _config_as_trained(config: Config, model, plan: AdapterChoice) -> Config:
    """The config with a continued adapter's own rank/alpha/targets, so final/axlora.yml tells the truth."""
    if plan.case != "continue":
        return config
    return config.model_copy(update=effective_adapter_settings(model))


@dataclass
class EarlyStopping:
    """``early_stopping_patience``: count evaluations without a lower eval_loss, keep the best adapter.

    The best weights are a copy of the (small) adapter held in memory and written into each checkpoint,
    so the run ends with the best adapter in ``final/`` (transformers' ``load_best_model_at_end``) even
    when it was resumed after the best step. With ``eval_on_start`` the starting adapter (step 0) is a
    candidate too: a continued run that never beats its baseline hands that adapter back unchanged.
    """

    patience: int | None
    best_step: int | None = None
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    best_weights: dict | None = None

    @property
    def enabled(self) -> bool:
        return self.patience is not None

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.evals_without_improvement >= self.patience

    def observe(self, step: int, eval_loss: float, model, parallel) -> None:
        if not self.enabled:
            return
        if self.best_eval_loss is None or eval_loss < self.best_eval_loss:
            self.best_step, self.best_eval_loss, self.evals_without_improvement = step, eval_loss, 0
            with parallel.gathered_adapter():
                self.best_weights = _adapter_weights(model)
        else:
            self.evals_without_improvement += 1

    def state(self) -> dict[str, Any]:
        return {"best_step": self.best_step, "best_eval_loss": self.best_eval_loss,
                "evals_without_improvement": self.evals_without_improvement}

    def restore(self, state: dict[str, Any] | None, weights: dict | None) -> None:
        if self.enabled and state:
            self.best_step = state.get("best_step")
            self.best_eval_loss = state.get("best_eval_loss")
            self.evals_without_improvement = state.get("evals_without_improvement", 0)
            self.best_weights = weights

    def restore_best(self, model) -> None:
        if self.best_weights is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, self.best_weights)

    def summary(self, steps_trained: int, planned_steps: int) -> dict[str, Any]:
        return {
            "patience": self.patience,
            "load_best_model_at_end": True,
            "best_step": self.best_step,
            "best_eval_loss": self.best_eval_loss,
            "stopped_early_at_step": steps_trained if steps_trained < planned_steps else None,
            "final_adapter": f"the adapter of step {self.best_step} (lowest eval_loss), "
                             f"not of the last step trained ({steps_trained})",
        }


def _adapter_weights(model) -> dict:
    from peft import get_peft_model_state_dict

    return {key: value.detach().clone().cpu() for key, value in get_peft_model_state_dict(model).items()}


def _layout_rows(prepared: PreparedData, config: Config, tokenizer, say):
    """Training rows as the loop consumes them: packed rows when ``sample_packing``, else samples."""
    pad = tokenizer.pad_token_id
    if not config.sample_packing:
        return prepared.train, PaddedCollator(pad_token_id=pad, **config.padding())
    rows = pack_examples(prepared.train, config.sequence_len)
    real = sum(len(r["input_ids"]) for r in rows)
    say(f"packing: {len(prepared.train)} samples -> {len(rows)} rows of {config.sequence_len} "
        f"({100 * real / (len(rows) * config.sequence_len):.1f}% full)")
    return rows, PackedCollator(pad_token_id=pad, **config.padding())


def _layout_val(prepared: PreparedData, config: Config, tokenizer):
    # validation rows stay unpacked: eval loss is then comparable across packing settings
    return prepared.val, PaddedCollator(pad_token_id=tokenizer.pad_token_id)


def _train_step(model, parallel, schedule: DataOrder, step: int, rows, collate, max_grad_norm, loss_mode):
    """One optimizer step; the loss is normalized by the label tokens of the whole step on all ranks.

    The last step of an epoch may give ranks different numbers of micro batches (or none). Every rank
    still runs as many passes as the busiest one, the extra ones on a filler batch whose loss counts zero:
    sharded weights are gathered in every forward, and a rank that skipped it would leave the others waiting.
    """
    import torch

    accelerator = parallel.accelerator
    chunks = schedule.micro_batches(step, accelerator.process_index)
    micro_batches = [collate([rows[i] for i in chunk]) for chunk in chunks]
    local = sum(batch["num_label_tokens"] for batch in micro_batches)
    tokens = sum(len(rows[i]["input_ids"]) for chunk in chunks for i in chunk)
    counts = torch.tensor([local, tokens], device=accelerator.device, dtype=torch.long)
    if accelerator.num_processes > 1:
        counts = accelerator.reduce(counts, reduction="sum")
    global_label_tokens, global_tokens = int(counts[0]), int(counts[1])
    passes = [(batch, 1.0) for batch in micro_batches]
    fillers = schedule.micro_batch_count(step) - len(micro_batches)
    if fillers:
        filler = collate([rows[i] for i in (chunks[-1] if chunks else schedule.step_rows(step)[:1])])
        passes += [(filler, 0.0)] * fillers
    step_loss = torch.zeros((), device=accelerator.device, dtype=torch.float32)
    for index, (batch, weight) in enumerate(passes):
        with parallel.micro_step(last=index == len(passes) - 1), accelerator.autocast(), loss_mode():
            out = model(**model_inputs(batch, accelerator.device, include_labels=True),
                        num_items_in_batch=max(global_label_tokens, 1))
            # gradients are averaged over ranks (DDP, FSDP, ZeRO); scale up so the result is the global token mean
            parallel.backward(out.loss * (accelerator.num_processes * weight))
        step_loss += out.loss.detach().float() * weight
    grad_norm = parallel.finish_step(max_grad_norm)
    if accelerator.num_processes > 1:
        step_loss = accelerator.reduce(step_loss, reduction="sum")
    return float(step_loss), grad_norm, global_tokens, global_label_tokens


def _loss_mode(config: Config, peft_model, say):
    """A context for the training forward: the model's own loss, or ``chunked_cross_entropy``'s."""
    import contextlib

    if not config.chunked_cross_entropy:
        return contextlib.nullcontext
    from axlora.train.chunked_loss import ChunkedCrossEntropy

    chunked = ChunkedCrossEntropy(peft_model.get_base_model(), config.chunked_cross_entropy_num_chunks)
    say(f"loss: chunked cross-entropy ({config.chunked_cross_entropy_num_chunks} chunks, label tokens only)")
    return chunked.active


def evaluate(model, accelerator, rows, collate, micro_batch_size: int) -> float:
    """Mean token loss over all validation rows (sum of token losses / label tokens)."""
    import torch

    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    mine = list(range(accelerator.process_index, len(rows), accelerator.num_processes))
    chunks = [mine[start:start + micro_batch_size] for start in range(0, len(mine), micro_batch_size)]
    # every rank runs as many forwards as rank 0 (which holds the most rows): sharded weights are gathered
    # in each forward; the extra ones run on row 0 and are not counted
    passes = math.ceil(math.ceil(len(rows) / accelerator.num_processes) / micro_batch_size)
    with torch.no_grad():
        for index in range(passes):
            chunk = chunks[index] if index < len(chunks) else [0]
            batch = collate([rows[i] for i in chunk])
            with accelerator.autocast():
                out = model(**model_inputs(batch, accelerator.device, include_labels=True), num_items_in_batch=1)
            if index < len(chunks):
                total += out.loss.double()
                count += batch["num_label_tokens"]
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, reduction="sum")
        count = accelerator.reduce(count, reduction="sum")
    model.train()
    return float(total / count.clamp(min=1))


def _load_adapter_weights(model, checkpoint_dir: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint_dir / "adapter_model.safetensors"))
    # after a vocabulary resize peft also saves each trained embedding as `<module>.modules_to_save.weight`, a
    # copy of `<module>.weight` that its own loader does not read back; the canonical key carries the weights
    weights = {name: tensor for name, tensor in weights.items()
               if not (".modules_to_save." in name and name.replace(".modules_to_save.", ".") in weights)}
    result = set_peft_model_state_dict(model, weights)
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise UserError(f"resume_from_checkpoint: {checkpoint_dir} holds adapter weights this run's LoRA "
                        f"lacks ({unexpected[:3]}); was it written with other adapter settings?")


def _report_sharding(fsdp, figures: dict, world_size: int, say) -> None:
    share = figures["sharded_parameters_on_this_rank"] / max(figures["sharded_parameters"], 1)
    say(f"fsdp: {fsdp.describe()} over {world_size} process(es), {figures['layers_sharded']} layers: rank 0 holds "
        f"{figures['sharded_parameters_on_this_rank']:,} of {figures['sharded_parameters']:,} base weights "
        f"({100 * share:.1f}%); the adapter's {figures['whole_parameters']:,} stay whole on every rank")


def _count_parameters(model) -> tuple[int, int]:
    def numel(p) -> int:
        return getattr(p, "ds_numel", p.numel())  # a ZeRO-3 partitioned weight's full size

    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    return trainable, total


def _peak_memory() -> dict[str, int | None]:
    import resource

    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"cpu_rss_bytes": rss, "gpu_allocated_bytes": gpu}


def _versions() -> dict[str, str]:
    import accelerate
    import peft
    import torch
    import transformers

    return {"axlora": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "accelerate": accelerate.__version__}


def _save_adapter(model, directory: Path) -> None:
    """``save_pretrained``, after checking that no tensor is empty (a ZeRO-3 slice read without gathering)."""
    from peft import get_peft_model_state_dict

    check_complete(get_peft_model_state_dict(model), str(directory))
    model.save_pretrained(directory)


def _write_final(output_dir: Path, model, tokenizer, config: Config, summary: dict) -> None:
    from axlora.core.atomic import atomic_directory

    with atomic_directory(output_dir / "final") as tmp:
        _save_adapter(model, tmp)
        tokenizer.save_pretrained(tmp)
        ckpt.write_resolved_config(config, tmp / RESOLVED_CONFIG)
        (tmp / "train_summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _print_samples(samples: list[dict], say) -> None:
    for sample in samples:
        prompt = sample["prompt"].strip().splitlines()
        say(f"sample: {' / '.join(prompt[-4:])}")
        say(f"  before: {sample['before'].strip()!r}")
        say(f"  after:  {sample['after'].strip()!r}")

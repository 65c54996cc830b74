"""The training run as a recipe: ``setup`` -> ``train`` -> ``finish``, readable top to bottom.

A small loop on accelerate rather than transformers' Trainer, because the properties users depend on
need control of each step: the loss of an optimizer step is the sum of token losses over all its micro
batches (and processes) divided by the step's global label-token count, so micro batch size, gradient
accumulation, packing and process count do not change what is optimized; the data position is a pure
function of the step, so a resumed run is bitwise the uninterrupted one; every directory a later run
trusts is written atomically; a step that produces non-finite numbers stops the run before anything of it
is written (``divergence``); and SIGINT / SIGTERM end the run after the step in flight and a checkpoint of it
(``stop_requests``).
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from axlora.config.schema import Config
from axlora.core.interrupt import RunInterrupted, signal_name
from axlora.core.layout import RunLayout
from axlora.model.adapter_choice import AdapterChoice, resolve_adapter
from axlora.model.machine import require_machine_support
from axlora.train import checkpoint as ckpt
from axlora.train.block_diffusion import (
    BlockDiffusionObjective,
    block_diffusion_evaluate,
    block_diffusion_step,
    start_block_diffusion,
)
from axlora.train.causal_lm_eval import CausalLMEval, start_causal_lm_eval
from axlora.train.completions import generate_completions, sample_prompt_texts
from axlora.train.data_order import DataOrder
from axlora.train.data_setup import TrainingData, check_eval_settings, lay_out_rows, prepare_rows
from axlora.train.diffusion import start_diffusion
from axlora.train.divergence import check_step, weights_finite
from axlora.train.early_stopping import EarlyStopping
from axlora.train.eval_table import EvalTable, start_eval_table
from axlora.train.final import build_summary, print_completions, write_final
from axlora.train.intervals import evaluates_at, saves_at
from axlora.train.length_groups import build_data_order
from axlora.train.metrics import MetricsLog
from axlora.train.model_setup import choose_loss, config_as_trained, load_model, parameters_line
from axlora.train.neftune import start_neftune
from axlora.train.optim import build_lr_scheduler, build_optimizer
from axlora.train.parallel import DataParallel
from axlora.train.preference_setup import (
    attach_deferred_reference,
    build_objective,
    lay_out_preference_rows,
    loads_adapter_after_reference,
    preference_prompt_texts,
    prepare_preference_rows,
    reference_tensors,
)
from axlora.train.preference_step import (
    PreferenceObjective,
    no_loss_patch,
    preference_evaluate,
    preference_step,
)
from axlora.train.pretraining_rows import corpus_prompt_texts, stream_order
from axlora.train.progress import Progress
from axlora.train.relora import ReLoRA, cumulative_adapter, save_run_adapter, start_relora
from axlora.train.relora_schedule import with_jagged_restarts
from axlora.train.resume import Resume, decide_resume, load_checkpoint_adapter, restore_training_state
from axlora.train.router_aux import router_aux_coefficient
from axlora.train.runtime import Runtime, start_runtime
from axlora.train.step import StepResult, evaluate, train_step
from axlora.train.stop_requests import StopRequests


@dataclass
class RunResult:
    output_dir: Path
    summary: dict[str, Any] = field(default_factory=dict)


def run_training(config: Config, log=print) -> RunResult:
    """Train the LoRA the config describes and write ``output_dir`` (see the design's Outputs).

    SIGINT / SIGTERM during the steps end the current one, save a checkpoint and raise ``RunInterrupted``.
    """
    with StopRequests(log) as stop:
        run = TrainingRun(config, log, stop)
        run.setup()
        stop.say = run.say  # the main process speaks for all
        stop.armed = True  # from here a signal lets the step in flight finish and saves it
        run.train()
        return run.finish()


@dataclass
class Counters:
    """What the steps so far add up to: saved in every checkpoint, restored on resume, summed up at the end."""

    start_step: int = 0
    step: int = 0  # optimizer steps done
    totals: dict[str, Any] = field(default_factory=lambda: {"tokens": 0, "label_tokens": 0, "train_seconds": 0.0})
    last: dict[str, Any] = field(default_factory=dict)  # the latest step's metrics
    eval_loss: float | None = None

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> Counters:
        counters = cls(start_step=state["step"], step=state["step"], eval_loss=state.get("last_eval_loss"))
        counters.totals = state.get("totals", counters.totals)
        return counters

    def add(self, result: StepResult, seconds: float) -> None:
        self.totals["tokens"] += result.tokens
        self.totals["label_tokens"] += result.label_tokens
        self.totals["train_seconds"] += seconds
        self.step += 1


class TrainingRun:
    """One run's shared state: ``setup`` builds it in the order below, ``train`` advances it, ``finish`` saves."""

    runtime: Runtime
    adapter: AdapterChoice
    resume: Resume
    data: TrainingData
    model: Any  # the peft model; wrapped for DDP / ZeRO (or sharded under FSDP) once setup is done
    loss_mode: Callable[[], contextlib.AbstractContextManager]
    config_as_trained: Config
    order: DataOrder
    total_steps: int
    scheduler: Any
    parallel: DataParallel
    prompts: list[str]
    completions_before: list[str]
    metrics: MetricsLog
    progress: Progress
    objective: PreferenceObjective | None = None  # rl: the preference objective instead of the token loss
    causal_eval: CausalLMEval | None = None  # do_causal_lm_eval: completions of validation rows, scored
    eval_table: EvalTable | None = None  # eval_table_size: predictions for validation rows at each evaluation
    router_aux: float | None = None  # router_aux_loss_coef: the MoE router loss's weight in the training loss
    block_diffusion: BlockDiffusionObjective | None = None  # block_diffusion: DiffusionGemma's canvas objective
    relora: ReLoRA | None = None  # relora: merges of the LoRA into the base at each restart

    def __init__(self, config: Config, log=print, stop: StopRequests | None = None):
        self.config = config
        self.log = log
        self.stop = stop or StopRequests(log)
        self.started = time.perf_counter()
        self.layout = RunLayout(Path(config.output_dir))
        self.early = EarlyStopping.from_config(config)
        self.counters = Counters()

    @property
    def say(self) -> Callable[[str], None]:
        return self.runtime.say

    @property
    def unwrapped(self):
        """The peft model itself (for saving, generating and reading weights), whatever wraps it."""
        return self.runtime.accelerator.unwrap_model(self.model)

    # ---- setup --------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything before the first step; what can fail fast is checked before anything slow loads."""
        config = self.config
        # decided from the config and the disk alone, before torch loads: a bad lora_model_dir fails in a second
        check_eval_settings(config)
        self.adapter = resolve_adapter(config)
        require_machine_support(config)  # a missing GPU/bitsandbytes/flash-attn fails in a second
        self.runtime = start_runtime(config, self.log)
        checkpoint = ckpt.resolve_resume(config, self.say)
        prepare, lay_out = (prepare_preference_rows, lay_out_preference_rows) if config.rl else (prepare_rows, lay_out_rows)
        tokenizer, prepared = prepare(config, self.runtime)
        self.resume = decide_resume(config, self.runtime, checkpoint, prepared.fingerprint)
        self.data = lay_out(config, tokenizer, prepared, self.say)
        self.causal_eval = start_causal_lm_eval(config, tokenizer, self.data.val_rows, self.say)
        self.eval_table = start_eval_table(config, tokenizer, self.data.val_rows, self.say)
        self._setup_model()
        optimizer = self._setup_optimizer()
        if self.resume.resuming and not loads_adapter_after_reference(self.objective):
            load_checkpoint_adapter(self.resume, self.model)  # into the plain peft model, before wrapping
        self.model, self.parallel = self.runtime.wrap(self.model, optimizer)
        self.relora = start_relora(config, self.unwrapped, self.resume.checkpoint,
                                   (self.resume.state or {}).get("step", 0), self.say)
        if self.objective is not None:  # FSDP / ZeRO-3: the reference now that the weights are placed
            attach_deferred_reference(config, self.objective, self.unwrapped, self.data, self.runtime, self.resume)
        self.prompts = (preference_prompt_texts if config.rl else corpus_prompt_texts if config.pretraining_dataset
                        else sample_prompt_texts)(config, tokenizer)
        self.completions_before = self._complete_prompts()
        if self.resume.resuming:
            self._restore_training_state()
        self._start_logging()

    def _setup_model(self) -> None:
        self.model = load_model(self.config, self.runtime, self.data.tokenizer, self.adapter)
        start_neftune(self.model, self.config, self.say)
        if self.config.rl:  # before a checkpoint's weights load: the reference is the round's starting adapter
            self.objective = build_objective(self.config, self.model, self.adapter, self.data, self.runtime)
        self.loss_mode = no_loss_patch if self.config.rl else choose_loss(self.config, self.model, self.say)
        self.router_aux = router_aux_coefficient(self.config, self.model)
        self.block_diffusion = start_block_diffusion(self.config, self.model, self.data.tokenizer, self.say)
        start_diffusion(self.config, self.model, self.data, self.say)  # diffusion: its loss and noising collators
        self.config_as_trained = config_as_trained(self.config, self.model, self.adapter)
        self.say(parameters_line(self.model, self.runtime.precision))

    def _setup_optimizer(self):
        """The data order fixes the step count, which the learning-rate schedule needs."""
        config = self.config
        schedule = stream_order if config.pretraining_dataset else build_data_order
        self.order = schedule(config, self.data.train_rows, self.runtime.world_size)
        self.total_steps = self.order.total_steps(config.num_epochs, config.max_steps)
        optimizer_cls, optimizer_kwargs = self.runtime.optimizer_choice
        optimizer = build_optimizer(self.model, config, optimizer_cls, optimizer_kwargs, self.say)
        self.scheduler = with_jagged_restarts(build_lr_scheduler(optimizer, config, self.total_steps), optimizer, config)
        return optimizer

    def _restore_training_state(self) -> None:
        resume = self.resume
        assert resume.checkpoint is not None and resume.state is not None
        restore_training_state(resume, self.parallel, self.scheduler, self.early)
        self.data.resume_stream(resume.state)
        self.counters = Counters.from_checkpoint(resume.state)
        for note in ckpt.resume_notes(resume.checkpoint, self.config, resume.state, self.total_steps):
            self.say(f"warning: resume: {note}")
        self.say(f"resume: resumed from checkpoints/{resume.checkpoint.name} at step "
                 f"{self.counters.start_step}/{self.total_steps}")

    def _start_logging(self) -> None:
        runtime, config = self.runtime, self.config
        self.metrics = MetricsLog(self.layout.logs, resume_step=self.counters.start_step, enabled=runtime.is_main,
                                  say=self.say)
        runtime.integrations.watch(self.unwrapped)
        if self.eval_table is not None:
            self.eval_table.open(self.layout.logs, self.counters.start_step, runtime.is_main)
        self.say(
            f"train: {len(self.data.train_rows)} rows, {self.order.rows_per_step} rows/step "
            f"({config.micro_batch_size} micro x {config.gradient_accumulation_steps} accum x "
            f"{runtime.world_size} proc), {self.total_steps} steps, {self.order.steps_per_epoch} steps/epoch"
        )

    def _complete_prompts(self) -> list[str]:
        """Greedy completions of ``sample_prompts`` (on the main process, which reports them).

        Under ZeRO-3 and FSDP every rank holds a slice of the weights: all ranks generate, in step.
        """
        sharded = self.parallel.sharded_weights
        if not (self.runtime.is_main or sharded):
            return []
        return generate_completions(self.unwrapped, self.data.tokenizer, self.prompts,
                                    self.config.sample_max_new_tokens, synced_ranks=sharded)

    # ---- train --------------------------------------------------------------------------------------

    def train(self) -> None:
        """The step loop: a step, its log row, evaluation and early stopping, checkpoint saves."""
        config, total = self.config, self.total_steps
        steps_per_epoch = self.order.steps_per_epoch
        self.progress = Progress(total, self.counters.start_step, enabled=self.runtime.is_main)
        if config.eval_on_start and self.counters.start_step == 0:
            self._log({"step": 0, **self._evaluate(0)})
        for step in range(self.counters.start_step, total):
            row = self._step(step)
            done = self.counters.step
            if self.relora is not None:
                self.relora.after_step(done, total, self.parallel.optimizer)
            if self.data.val_rows and evaluates_at(config, done, total, steps_per_epoch):
                row = {**(row or {"step": done}), **self._evaluate(done)}
            if row is not None:
                self._log(row)
            if self.early.should_stop and done < total:
                self.say(self.early.stop_message(done))
                break
            saved = saves_at(config, done, total, steps_per_epoch)
            if saved:
                self._save_checkpoint()
            if done < total and self._stop_requested():
                self._stop_after(done, saved)
        self.progress.close()

    def _step(self, step: int) -> dict[str, Any] | None:
        """Train one step; returns its metrics row when this step logs (``logging_steps``, and the last)."""
        started = time.perf_counter()
        if self.objective is not None:
            result = preference_step(self.objective, self.model, self.parallel, self.order, step, self.data.train_rows,
                                     self.data.collate, self.config.max_grad_norm)
        elif self.block_diffusion is not None:
            result = block_diffusion_step(self.block_diffusion, self.model, self.parallel, self.order, step,
                                          self.data.train_rows, self.config.max_grad_norm)
        else:
            result = train_step(self.model, self.parallel, self.order, step, self.data.train_rows, self.data.collate,
                                self.config.max_grad_norm, self.loss_mode, self.router_aux)
        self._check_finite(step + 1, result)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        seconds = time.perf_counter() - started
        self.counters.add(result, seconds)
        done = self.counters.step
        last = {"step": done, "epoch": round(self.order.epoch_of(done), 4), "loss": result.loss, "lr": lr,
                "grad_norm": result.grad_norm, "tokens_per_second": result.tokens / max(seconds, 1e-9),
                **(result.figures or {})}
        self.counters.last = last
        self.progress.update(done, last)
        return dict(last) if (done % self.config.logging_steps == 0 or done == self.total_steps) else None

    def _check_finite(self, step: int, result: StepResult) -> None:
        """Stop at the step that diverged, before its log row or any save (see ``divergence``)."""
        (weights_bad,) = self.parallel.any_rank(not weights_finite(self.unwrapped))
        grad_norm = result.grad_norm if self.config.max_grad_norm > 0 else None
        check_step(result.loss, grad_norm, step, not weights_bad, self.runtime.precision.name,
                   self.config.learning_rate)

    def _stop_requested(self) -> bool:
        """Whether any process got SIGINT / SIGTERM (all processes agree, so all stop after the same step)."""
        interrupt, terminate = self.parallel.any_rank(self.stop.signum == signal.SIGINT,
                                                      self.stop.signum == signal.SIGTERM)
        if self.stop.signum is None and (interrupt or terminate):
            self.stop.signum = signal.SIGINT if interrupt else signal.SIGTERM  # delivered to another rank first
        return interrupt or terminate

    def _stop_after(self, done: int, saved: bool) -> None:
        """A checkpoint of the step just finished (unless its regular save wrote it), then stop."""
        assert self.stop.signum is not None
        if not saved:
            self._save_checkpoint()
        self.progress.close()
        raise RunInterrupted(self.stop.signum, f"stopped by {signal_name(self.stop.signum)} after step {done}/"
                             f"{self.total_steps}; saved {self.layout.checkpoint(done)}.")

    def _evaluate(self, step: int) -> dict[str, float]:
        """``eval_loss`` (and under rl: the eval rewards and log-probs) on the validation rows."""
        if self.objective is not None:
            row = preference_evaluate(self.objective, self.model, self.runtime.accelerator, self.data.val_rows,
                                      self.data.val_collate, self.config.micro_batch_size)
        elif self.block_diffusion is not None:
            row = {"eval_loss": block_diffusion_evaluate(self.block_diffusion, self.model, self.runtime.accelerator,
                                                         self.data.val_rows, self.config.micro_batch_size)}
        else:
            row = {"eval_loss": evaluate(self.model, self.runtime.accelerator, self.data.val_rows,
                                         self.data.val_collate, self.config.micro_batch_size),
                   **self._causal_lm_scores()}
            self._record_predictions(step)
        self.early.observe(step, row, self.unwrapped, self.parallel)
        self.counters.eval_loss = row["eval_loss"]
        return row

    def _causal_lm_scores(self) -> dict[str, float]:
        """do_causal_lm_eval's scores (none when off); under ZeRO-3 and FSDP every rank generates, in step."""
        if self.causal_eval is None:
            return {}
        sharded = self.parallel.sharded_weights
        return self.causal_eval.scores(self.model, self.unwrapped, self.data.tokenizer, self.runtime.accelerator,
                                       self.data.val_collate, self.config.micro_batch_size,
                                       generating=self.runtime.is_main or sharded, synced_ranks=sharded)

    def _record_predictions(self, step: int) -> None:
        """eval_table_size's predictions (none when off); under ZeRO-3 and FSDP every rank generates, in step."""
        if self.eval_table is not None:
            sharded = self.parallel.sharded_weights
            self.eval_table.record(step, self.unwrapped, self.data.tokenizer, self.config.micro_batch_size,
                                   generating=self.runtime.is_main or sharded, synced_ranks=sharded,
                                   send_table=self.runtime.integrations.log_table)

    def _log(self, row: dict[str, Any]) -> None:
        """One row to logs/metrics.jsonl, the trackers and the console."""
        self.metrics.write(row)
        self.runtime.integrations.log(row)
        self.progress.log_line(row["step"], row)

    def _save_checkpoint(self) -> None:
        counters = self.counters
        ckpt.save_checkpoint(
            self.layout.root, counters.step, parallel=self.parallel,
            save_adapter=lambda directory: save_run_adapter(self.unwrapped, directory, self.relora),
            scheduler=self.scheduler, config=self.config_as_trained, resume_key=self.resume.key,
            extra_state={**self.data.stream_state(counters.step * self.order.rows_per_step),
                         "totals": counters.totals, "total_steps": self.total_steps,
                         "last_eval_loss": counters.eval_loss, "early_stopping": self.early.state()},
            save_total_limit=self.config.save_total_limit,
            best_adapter=self.early.best_weights,
            reference_logps=(reference_tensors(self.data) if self.objective is not None
                             and self.objective.reference_checkpointed else None),
        )
        self.runtime.integrations.checkpoint_saved(self.layout.checkpoint(counters.step), counters.step)

    # ---- finish -------------------------------------------------------------------------------------

    def finish(self) -> RunResult:
        """The best adapter (early stopping), samples after training, ``final/``, the loss plot, the trackers."""
        runtime, early = self.runtime, self.early
        if early.enabled and early.best_step is not None:
            with self.parallel.gathered_adapter(modify=True):
                early.restore_best(self.unwrapped)
            self.say(early.best_line(self.counters.step))
        summary = build_summary(self, completions_after=self._complete_prompts())
        with self.parallel.gathered_adapter(), cumulative_adapter(self.relora, self.unwrapped):
            if runtime.is_main:
                write_final(self.layout.final, self.unwrapped, self.data.tokenizer, self.config_as_trained, summary)
        if runtime.is_main:
            self.metrics.plot_loss()
            self.metrics.close()
            print_completions(summary["samples"], self.say)
            self.say(f"saved: {self.layout.final}")
            runtime.integrations.finish(self.layout.final, summary)
        runtime.accelerator.wait_for_everyone()
        return RunResult(output_dir=self.layout.root, summary=summary)

"""The end of a run: ``final/`` (adapter, tokenizer, axlora.yml, train_summary.json) and the summary in it."""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from axlora import __version__
from axlora.config.schema import Config
from axlora.core.atomic import atomic_directory
from axlora.core.layout import TRAIN_SUMMARY
from axlora.core.names import RESOLVED_CONFIG
from axlora.train import checkpoint as ckpt

if TYPE_CHECKING:
    from axlora.train.recipe import TrainingRun


def build_summary(run: TrainingRun, completions_after: list[str]) -> dict[str, Any]:
    """``train_summary.json``: what was trained, on what, how fast, and the samples before and after."""
    runtime, counters, totals = run.runtime, run.counters, run.counters.totals
    steps = counters.step
    return {
        "axlora_version": __version__,
        "steps": steps,
        "planned_steps": run.total_steps,
        "resumed_from_step": counters.start_step or None,
        "epochs": round(run.order.epoch_of(steps), 4),
        "world_size": runtime.world_size,
        "deepspeed": ({"config": runtime.deepspeed.source, "zero_stage": runtime.zero_stage}
                      if runtime.deepspeed else None),
        "fsdp": {"sharding": runtime.fsdp.describe(), **run.parallel.figures} if runtime.fsdp else None,
        "adapter": {"case": run.adapter.case, "reason": run.adapter.reason,
                    "continued_from": str(run.adapter.adapter_dir) if run.adapter.adapter_dir else None},
        "train_rows": len(run.data.prepared.train),
        "val_rows": len(run.data.prepared.val),
        "tokens": totals["tokens"],
        "label_tokens": totals["label_tokens"],
        "tokens_per_second": totals["tokens"] / max(totals["train_seconds"], 1e-9),
        "final_train_loss": counters.last.get("loss"),
        "final_eval_loss": counters.eval_loss,
        "early_stopping": run.early.summary(steps, run.total_steps) if run.early.enabled else None,
        "peak_memory_bytes": _peak_memory(),
        "wall_seconds": time.perf_counter() - run.started,
        "precision": runtime.precision.name,
        "samples": [
            {"prompt": p, "before": b, "after": a}
            for p, b, a in zip(run.prompts, run.completions_before, completions_after, strict=True)
        ] if runtime.is_main else [],  # only the main process generates (under ZeRO-3 and FSDP all do, main reports)
        "versions": _versions(),
    }


def write_final(final_dir: Path, peft_model, tokenizer, config: Config, summary: dict) -> None:
    """Publish ``final/`` in one rename: a later run or merge-lora never sees half of it."""
    with atomic_directory(final_dir) as tmp:
        ckpt.save_adapter(peft_model, tmp)
        tokenizer.save_pretrained(tmp)
        ckpt.write_resolved_config(config, tmp / RESOLVED_CONFIG)
        (tmp / TRAIN_SUMMARY).write_text(json.dumps(summary, indent=2, default=_json_default))


def print_completions(completions: list[dict], say) -> None:
    """Each sample prompt (its last lines) with the completions before and after training."""
    for completion in completions:
        prompt = completion["prompt"].strip().splitlines()
        say(f"sample: {' / '.join(prompt[-4:])}")
        say(f"  before: {completion['before'].strip()!r}")
        say(f"  after:  {completion['after'].strip()!r}")


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


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

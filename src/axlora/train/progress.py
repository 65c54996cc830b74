"""Progress display: a bar with loss, tokens/s and ETA on a terminal; plain log lines otherwise."""

from __future__ import annotations

import sys
import time

from axlora.core.progress import format_seconds


class Progress:
    """Log lines go to stdout; the bar (only when stderr is a terminal) goes to stderr."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool = True):
        self.total = total_steps
        self.start_step = start_step
        self.enabled = enabled
        self.started = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def update(self, step: int, metrics: dict) -> None:
        """Called every step; ``metrics`` holds the latest loss and tokens/s."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(
                loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_second']:.0f}", refresh=False
            )

    def log_line(self, step: int, metrics: dict) -> None:
        """A plain line per logged step (also shown above the bar on a terminal)."""
        if not self.enabled:
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (self.total - step) if done else 0.0
        parts = [f"step {step}/{self.total}"]
        for key in ("loss", "eval_loss"):
            if key in metrics:
                parts.append(f"{key} {metrics[key]:.4f}")
        for key, label in (("rewards/margins", "margin"), ("rewards/accuracies", "acc"),
                           ("eval_rewards/margins", "eval_margin"), ("eval_rewards/accuracies", "eval_acc")):
            if key in metrics:  # preference tuning (rl:)
                parts.append(f"{label} {metrics[key]:.4f}")
        if "lr" in metrics:
            parts.append(f"lr {metrics['lr']:.2e}")
        if "tokens_per_second" in metrics:
            parts.append(f"{metrics['tokens_per_second']:.0f} tok/s")
        parts.append(f"elapsed {format_seconds(elapsed)} eta {format_seconds(eta)}")
        line = " | ".join(parts)
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

"""Training metrics: ``logs/metrics.jsonl``, tensorboard events, and a loss-curve PNG at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one JSON object per logged step; a resumed run drops rows after its checkpoint's step."""

    def __init__(self, logs_dir: Path, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.path = logs_dir / "metrics.jsonl"
        self.logs_dir = logs_dir
        self._writer = None
        if not enabled:
            return
        logs_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(logs_dir / "tensorboard"), purge_step=resume_step + 1 or None)
        except ImportError:  # tensorboard is optional at run time
            self._writer = None

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        if step == 0:
            self.path.unlink()
            return
        kept = [line for line in self.read() if line.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        if self._writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                    self._writer.add_scalar(f"{'eval' if key.startswith('eval') else 'train'}/{key}", value, row["step"])
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def plot_loss(self) -> Path | None:
        """``logs/loss.png``: train loss per step and eval loss where evaluated."""
        rows = self.read()
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        if not self.enabled or not (train or evals):
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train, strict=True), label="train loss")
        if evals:
            ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = self.logs_dir / "loss.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

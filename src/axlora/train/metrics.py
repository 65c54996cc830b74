"""Training metrics: ``logs/metrics.jsonl``, tensorboard events, and a loss-curve PNG at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from axlora.core.atomic import atomic_write_text, filesystem_error, make_directory
from axlora.core.layout import RunLayout


class MetricsLog:
    """Appends one JSON object per logged step to ``logs/metrics.jsonl``.

    A resumed run keeps the rows up to its checkpoint's step: when later rows (or a line torn by a kill) must
    go, the kept rows are written to a new file that replaces the old one by rename, so a kill at that moment
    leaves the old file or the new one, never an empty or half-written one. A fresh run starts an empty log
    (an earlier run's logs are set aside first, see ``set_aside_earlier_logs``).
    """

    def __init__(self, logs_dir: Path, resume_step: int = 0, enabled: bool = True, say=print):
        self.enabled = enabled
        self.path = logs_dir / "metrics.jsonl"
        self.logs_dir = logs_dir
        self.say = say
        self._writer = None
        if not enabled:
            return
        make_directory(logs_dir)
        self._cut_back_to(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(logs_dir / "tensorboard"), purge_step=resume_step + 1 or None)
        except ImportError:  # tensorboard is optional at run time
            self._writer = None

    def _cut_back_to(self, step: int) -> None:
        if not self.path.exists():
            return
        if step == 0:
            self.path.unlink()
            return
        rows, torn = self._read_rows()
        kept = [row for row in rows if row.get("step", 0) <= step]
        if torn:
            self.say(f"note: {self.path}: dropped {len(torn)} unreadable line(s) (line {', '.join(map(str, torn))}; "
                     "a write cut short by a kill)")
        if torn or len(kept) < len(rows):
            atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def _read_rows(self) -> tuple[list[dict[str, Any]], list[int]]:
        """The rows, and the numbers of lines that are not a JSON object (torn by a kill mid-write)."""
        rows, torn = [], []
        text = self.path.read_text(encoding="utf-8", errors="replace") if self.path.exists() else ""
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            else:
                torn.append(number)
        return rows, torn

    def read(self) -> list[dict[str, Any]]:
        return self._read_rows()[0]

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
        except OSError as exc:
            raise (filesystem_error(exc, self.path) or exc) from None
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


def set_aside_earlier_logs(layout: RunLayout, say=print) -> Path | None:
    """A fresh run moves an earlier run's ``logs/`` to ``logs-earlier-N/``: its metrics and events never mix
    with this run's, and they stay beside the earlier ``final/`` they describe should this run fail."""
    try:
        if not (layout.logs.is_dir() and any(layout.logs.iterdir())):
            return None
    except OSError:
        return None
    index = 1
    while layout.earlier_logs(index).exists():
        index += 1
    target = layout.earlier_logs(index)
    layout.logs.rename(target)
    say(f"logs: this run starts fresh; the earlier run's logs are moved to {target}")
    return target

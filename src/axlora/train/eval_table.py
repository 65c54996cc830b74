"""``eval_table_size``: at each evaluation, the model's predictions for a few validation rows beside their references.

Axolotl logs such a table to its tracker at each evaluation. Here the first ``eval_table_size`` validation rows that
have a prompt are split where their labels start (prompt before, reference answer after), the prompts are
completed greedily with ``eval_table_max_new_tokens`` new tokens (``model.generate``, as the sample completions),
and each evaluation's rows go to ``logs/eval_predictions.jsonl`` (one JSON object per row, with its step) and, when
W&B or MLflow is on, to a table there. A resumed run keeps the rows up to its checkpoint's step.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from axlora.config.schema import Config
from axlora.core.atomic import atomic_write_text, filesystem_error, make_directory
from axlora.train.causal_lm_eval import validation_prompts

EVAL_PREDICTIONS = "eval_predictions.jsonl"
TABLE_NAME = "eval_predictions"


@dataclass
class EvalTable:
    """The validation rows to complete at each evaluation, and where their predictions go."""

    row_ids: list[int]  # positions in the validation rows
    prompts: list[list[int]]
    prompt_texts: list[str]
    references: list[str]
    max_new_tokens: int
    path: Path | None = None  # set by ``open`` on the main process

    def open(self, logs_dir: Path, resume_step: int, is_main: bool) -> None:
        """Start the file: a fresh run begins it empty, a resumed one keeps the rows up to its checkpoint."""
        if not is_main:
            return
        make_directory(logs_dir)
        self.path = logs_dir / EVAL_PREDICTIONS
        kept = [row for row in read_predictions(self.path) if row.get("step", 0) <= resume_step] if resume_step else []
        self._write(kept)

    def record(self, step: int, model, tokenizer, batch_size: int, generating: bool, synced_ranks: bool,
               send_table: Callable[[str, list[dict[str, Any]], int], None]) -> None:
        """Complete the prompts and keep the predictions; every generating rank calls it, the main one writes."""
        if not generating:
            return
        from axlora.model.generate import Sampling, generate_texts

        predictions = generate_texts(model, tokenizer, self.prompts, Sampling(max_new_tokens=self.max_new_tokens),
                                     batch_size=batch_size, synced_ranks=synced_ranks)
        if self.path is None:  # a rank that only helps generating (sharded weights)
            return
        rows = [{"step": step, "row": row_id, "prompt": prompt, "reference": reference, "prediction": prediction}
                for row_id, prompt, reference, prediction in zip(self.row_ids, self.prompt_texts, self.references,
                                                                 predictions, strict=True)]
        self._write(read_predictions(self.path) + rows)
        send_table(TABLE_NAME, rows, step)

    def _write(self, rows: list[dict[str, Any]]) -> None:
        assert self.path is not None
        try:
            atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in rows))
        except OSError as exc:
            raise (filesystem_error(exc, self.path) or exc) from None


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """The rows of an ``eval_predictions.jsonl`` (none when it does not exist)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def start_eval_table(config: Config, tokenizer, val_rows, say: Callable[[str], None]) -> EvalTable | None:
    """The prepared table when ``eval_table_size`` asks for rows (None when it does not)."""
    if not config.eval_table_size:
        return None
    chosen = validation_prompts("eval_table_size", config, val_rows, tokenizer, limit=config.eval_table_size)
    say(f"eval_table: predictions for {len(chosen.indices)} validation row(s) at each evaluation, up to "
        f"{config.eval_table_tokens()} new tokens each, in logs/{EVAL_PREDICTIONS}")
    return EvalTable(chosen.indices, chosen.prompts,
                     tokenizer.batch_decode(chosen.prompts, skip_special_tokens=True), chosen.references,
                     config.eval_table_tokens())

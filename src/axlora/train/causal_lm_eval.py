"""``do_causal_lm_eval``: at each evaluation, complete validation rows and score the answers.

Each validation row splits where its labels start: the tokens before are the prompt, the labelled ones the
reference answer. The model completes the prompts greedily (``model.generate``, as the sample completions do) and
the answers are scored against the references with sacrebleu's BLEU, chrF and TER. ``perplexity`` is exp of the
token loss of the reference answers given their prompts on the same rows (with every validation row, exp of
``eval_loss``). Scores are logged as ``eval_<metric>`` beside ``eval_loss``.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.core.names import IGNORE_INDEX
from axlora.train.step import evaluate

SACREBLEU_METRICS = ("sacrebleu", "chrf", "ter")


@dataclass
class CausalLMEval:
    """The rows to complete, their references, and the metrics to compute."""

    rows: list[dict[str, Any]]
    prompts: list[list[int]]
    references: list[str]
    metrics: list[str]
    max_new_tokens: int

    def scores(self, model, unwrapped, tokenizer, accelerator, collate, micro_batch_size: int,
               generating: bool, synced_ranks: bool) -> dict[str, float]:
        """``eval_<metric>`` for each metric; every rank calls it (the perplexity pass is shared by all ranks).

        ``generating``: this rank completes the prompts (the main process; every rank when the weights are sharded).
        """
        row: dict[str, float] = {}
        if "perplexity" in self.metrics:
            loss = evaluate(model, accelerator, self.rows, collate, micro_batch_size)
            row["eval_perplexity"] = math.exp(min(loss, 700.0))
        text_metrics = [name for name in self.metrics if name in SACREBLEU_METRICS]
        if text_metrics and generating:
            from axlora.model.generate import Sampling, generate_texts

            answers = generate_texts(unwrapped, tokenizer, self.prompts, Sampling(max_new_tokens=self.max_new_tokens),
                                     batch_size=micro_batch_size, synced_ranks=synced_ranks)
            row.update(text_scores(answers, self.references, text_metrics))
        return row


def text_scores(predictions: list[str], references: list[str], metrics: list[str]) -> dict[str, float]:
    """sacrebleu's corpus scores of ``predictions`` against one reference each."""
    import sacrebleu

    score = {"sacrebleu": sacrebleu.corpus_bleu, "chrf": sacrebleu.corpus_chrf, "ter": sacrebleu.corpus_ter}
    return {f"eval_{name}": float(score[name](predictions, [references]).score) for name in metrics}


def start_causal_lm_eval(config: Config, tokenizer, val_rows, say: Callable[[str], None]) -> CausalLMEval | None:
    """The prepared evaluation when ``do_causal_lm_eval`` is on (None when off)."""
    if not config.do_causal_lm_eval:
        return None
    metrics = list(dict.fromkeys(config.eval_causal_lm_metrics))
    missing = [name for name in metrics if name in SACREBLEU_METRICS] if not _has_sacrebleu() else []
    if missing:
        say(f"note: do_causal_lm_eval: {', '.join(missing)} need the sacrebleu package, which is not installed "
            "(pip install sacrebleu); they are not computed")
        metrics = [name for name in metrics if name not in missing]
    chosen = validation_prompts("do_causal_lm_eval", config, val_rows[:config.eval_causal_lm_max_rows], tokenizer)
    say(f"causal_lm_eval: {', '.join(metrics) or 'nothing'} on {len(chosen.indices)} validation row(s), up to "
        f"{config.eval_max_new_tokens} new tokens each")
    rows = [val_rows[index] for index in chosen.indices]
    return CausalLMEval(rows, chosen.prompts, chosen.references, metrics, config.eval_max_new_tokens)


@dataclass(frozen=True)
class ValidationPrompts:
    """Validation rows that have a prompt to complete: their indices, prompt token ids and reference answers."""

    indices: list[int]
    prompts: list[list[int]]
    references: list[str]


def validation_prompts(key: str, config: Config, val_rows, tokenizer, limit: int | None = None) -> ValidationPrompts:
    """The first ``limit`` of ``val_rows`` with a prompt (masked tokens before the answer), for ``key``, which
    completes them at each evaluation (do_causal_lm_eval, eval_table_size)."""
    if config.rl:
        raise UserError(f"{key} / rl: completes supervised validation rows; rl: {config.rl} evaluates rewards "
                        f"instead. Remove {key}.")
    if not val_rows:
        raise UserError(f"{key}: needs validation rows to complete; set val_set_size (e.g. 0.05).")
    starts = [(index, _first_label(row)) for index, row in enumerate(val_rows)]
    chosen = [(index, start) for index, start in starts if start is not None][:limit]
    if not chosen:
        raise UserError(f"{key}: no validation row has a prompt to complete (every token of them is trained, as in "
                        "completion data); it needs prompt/answer rows such as alpaca or chat formats.")
    rows = [val_rows[index] for index, _ in chosen]
    return ValidationPrompts(
        indices=[index for index, _ in chosen],
        prompts=[list(row["input_ids"][:start]) for row, (_, start) in zip(rows, chosen, strict=True)],
        references=[tokenizer.decode([token for token, label in zip(row["input_ids"], row["labels"], strict=True)
                                      if label != IGNORE_INDEX], skip_special_tokens=True) for row in rows],
    )


def _first_label(row: dict[str, Any]) -> int | None:
    """Where the reference answer starts; None for a row without a prompt or without labels."""
    for index, label in enumerate(row["labels"]):
        if label != IGNORE_INDEX:
            return index or None
    return None


def _has_sacrebleu() -> bool:
    return importlib.util.find_spec("sacrebleu") is not None

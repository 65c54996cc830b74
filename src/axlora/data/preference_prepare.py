"""Preference datasets prepared for ``rl:``: rows read as for supervised data, shuffled with ``seed``, the
validation split cut before tokenizing, each example tokenized once, and a short report.

Rows come from ``data.sources`` (the same files, Hub datasets, ``split`` slices, ``sample`` and shards) and
are read by ``data.preference_rows``; rows a format cannot use are all named, in file order, with file and
line. Preference sets are small next to supervised corpora (one row per judged pair), so they are kept in
memory as token lists rather than in the prepared-data cache.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from axlora.config.chat_templates import FALLBACK_PREFIX
from axlora.config.preference_keys import PreferenceDatasetConfig
from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.data.preference_rows import PreferenceExample, kto_reader, pair_reader
from axlora.data.preference_tokens import (
    LengthRule,
    PromptRenderer,
    attach_mismatched_completions,
    tokenize_example,
)
from axlora.data.report import length_summary
from axlora.data.row_readers import problem_list
from axlora.data.segments import RowFormatError
from axlora.data.sources import load_source
from axlora.data.template_choice import TemplateChoiceError, choose_template


@dataclass
class PreferenceData:
    """Tokenized preference rows (see ``preference_tokens.tokenize_example``) and what preparing them found."""

    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    report: dict[str, Any] = field(default_factory=dict)


def renderer_for(config: Config, dataset: PreferenceDatasetConfig, tokenizer, index: int) -> PromptRenderer:
    """The dataset's chat template: fixed by chatml.* / llama3.*, else its own or the run's ``chat_template``."""
    if dataset.type == "user_defined.default":
        return PromptRenderer(tokenizer, None)
    setting = dataset.template_setting() or config.chat_template
    if setting is None and not getattr(tokenizer, "chat_template", None):
        setting = FALLBACK_PREFIX + "chatml"  # Axolotl's default for a tokenizer without a template
    try:
        chosen = choose_template(setting, config.chat_template_jinja, getattr(tokenizer, "chat_template", None))
    except TemplateChoiceError as exc:
        raise UserError(f"datasets[{index}] ({dataset.label}): {exc}.") from None
    return PromptRenderer(tokenizer, chosen.text)


def _examples(config: Config, index: int) -> list[tuple[PreferenceExample, str]]:
    """Every row of one dataset as an example with where it came from; bad rows all named, in file order."""
    dataset = config.datasets[index]
    assert isinstance(dataset, PreferenceDatasetConfig)
    source = load_source(dataset, config.seed)
    read: Callable[[Any], PreferenceExample] = kto_reader(dataset) if config.rl == "kto" else pair_reader(dataset)
    examples, problems = [], []
    for position, row in zip(source.positions, source.rows, strict=True):
        try:
            examples.append((read(row), source.where(int(position))))
        except RowFormatError as exc:
            problems.append(f"{source.where(int(position))}: {exc} (type {dataset.type}).")
    if problems:
        raise UserError(problem_list(problems, "rows"))
    if not examples:
        raise UserError(f"datasets[{index}] ({dataset.label}): no rows to train on.")
    return examples


def prepare_preferences(config: Config, tokenizer, log: Callable[[str], None] = print) -> PreferenceData:
    """The run's preference rows, split into train and validation before tokenization."""
    entries: list[tuple[PreferenceExample, str, int]] = []
    for index in range(len(config.datasets)):
        entries += [(example, where, index) for example, where in _examples(config, index)]
    random.Random(config.seed).shuffle(entries)
    val_count = config.val_row_count(len(entries))
    renderers = [renderer_for(config, dataset, tokenizer, i) for i, dataset in enumerate(config.datasets)]
    rules = [LengthRule(config.sequence_len, _length_strategy(config))] * len(config.datasets)
    splits: list[list[dict[str, Any]]] = [[], []]
    dropped = 0
    for number, (example, where, index) in enumerate(entries):
        try:
            row = tokenize_example(example, renderers[index], rules[index], where)
        except RowFormatError as exc:
            raise UserError(f"{where}: {exc} (type {config.datasets[index].type}).") from None
        if row is None:
            dropped += 1
        else:
            splits[number < val_count].append(row)
    train, val = splits
    if not train:
        raise UserError(f"datasets: no preference row fits sequence_len {config.sequence_len} ({dropped} dropped); "
                        "raise sequence_len or set excess_length_strategy: truncate.")
    if config.rl == "kto":
        for rows in (train, val):
            attach_mismatched_completions(rows, config.sequence_len)
    report = _report(train, val, dropped)
    log(f"data: prepared {len(train):,} train / {len(val):,} val preference rows ({config.rl}); {dropped} over "
        f"sequence_len {config.sequence_len} dropped; prompt tokens mean {report['prompt_lengths']['mean']}, "
        f"answer tokens mean {report['answer_lengths']['mean']}{_label_counts(report)}")
    return PreferenceData(train, val, report)


def _length_strategy(config: Config) -> str:
    strategy = config.excess_length_strategy or "drop"
    if strategy == "split":
        raise UserError("excess_length_strategy: split cuts a sample into pieces, which a preference pair has no "
                        "use for; use drop, truncate or raise.")
    return strategy


def _report(train: list[dict[str, Any]], val: list[dict[str, Any]], dropped: int) -> dict[str, Any]:
    rows = train + val
    answers = [len(row[key]) for row in rows for key in ("chosen_ids", "rejected_ids") if key in row]
    labels = [row["label"] for row in rows if "label" in row]
    return {
        **({"desirable_rows": sum(labels), "undesirable_rows": len(labels) - sum(labels)} if labels else {}),
        "train_rows": len(train),
        "val_rows": len(val),
        "dropped_over_sequence_len": dropped,
        "prompt_lengths": length_summary(np.asarray([len(row["prompt_ids"]) for row in rows])),
        "answer_lengths": length_summary(np.asarray(answers)),
    }


def _label_counts(report: dict[str, Any]) -> str:
    """KTO: how many completions of each kind (TRL advises weights that even out weight x count)."""
    if "desirable_rows" not in report:
        return ""
    return f"; {report['desirable_rows']:,} desirable / {report['undesirable_rows']:,} undesirable completions"

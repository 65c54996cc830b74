"""The data keys: each ``datasets:`` entry (``DatasetConfig``) with its per-type rules, and the keys of the
data as a whole (validation rows, sequence length, packing, caching).

A dataset key that only some ``type``s read is refused on the other types, never silently ignored.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, ValidationInfo, field_validator

from axlora.config.base import StrictModel, known_chat_template
from axlora.core.suggest import did_you_mean

DatasetType = Literal["alpaca", "chat_template", "sharegpt", "completion", "input_output"]
DATASET_TYPES: tuple[str, ...] = get_args(DatasetType)


_CHAT_KEYS = (
    "chat_template", "chat_template_jinja", "field_messages", "message_property_mappings", "roles", "roles_to_train",
    "train_on_eos", "message_field_training",
)
_KEYS_OF_TYPE = {"chat_template": _CHAT_KEYS, "sharegpt": _CHAT_KEYS, "completion": ("field",)}
"""Dataset keys that only some types read: set on another type, they are an error (never silently ignored)."""


class DatasetConfig(StrictModel):
    """One entry of ``datasets:``: where rows come from and how to turn them into tokens and labels.

    Keys follow Axolotl's. Keys that only mean something for some ``type``s are refused on the others, so a
    misplaced key is an error rather than silently ignored.
    """

    path: str = Field(
        description="Local JSON/JSONL/Parquet/CSV/Arrow file or directory, or a Hugging Face dataset name."
    )
    type: DatasetType | None = Field(
        default=None,
        description="Row format: alpaca, chat_template, sharegpt, completion, input_output; empty: pre-tokenized "
        "rows (input_ids, optional labels and attention_mask).",
    )
    split: str = Field(
        default="train", description='Split to read; slicing takes part of it: "train[:20%]", "train[:500]".'
    )
    data_files: str | list[str] | None = Field(
        default=None, description="Files to read: inside a local `path` directory, or of a Hub dataset."
    )
    name: str | None = Field(default=None, description="Dataset configuration name (Hugging Face datasets).")
    revision: str | None = Field(default=None, description="Hub dataset revision (commit, tag or branch) to read.")
    ds_type: Literal["json", "parquet", "csv", "arrow", "text"] | None = Field(
        default=None, description="File format of local files whose suffix does not say it (default: from suffix)."
    )
    sample: float | None = Field(
        default=None,
        gt=0,
        description="axlora: take part of this dataset at random (by `seed`), after `split`: a fraction (<1) or a "
        "row count (>=1). For mixing some old data into a continued run.",
    )
    field: str | None = Field(default=None, description="completion: the column holding the text (default: text).")
    chat_template: str | None = Field(
        default=None,
        description="chat_template/sharegpt: template for this dataset (overrides the top-level chat_template): "
        "tokenizer_default, a built-in name (chatml, llama3, ...), jinja, or a Jinja template string.",
    )
    chat_template_jinja: str | None = Field(
        default=None, description="chat_template/sharegpt: a Jinja chat template for this dataset."
    )
    field_messages: str | None = Field(
        default=None,
        description="chat_template/sharegpt: the column holding the message list (default: messages; sharegpt: "
        "conversations).",
    )
    message_property_mappings: dict[str, str] | None = Field(
        default=None,
        description="chat_template/sharegpt: message keys to read each property from, e.g. {role: from, "
        "content: value} (default: role/content; sharegpt: from/value).",
    )
    roles: dict[str, list[str]] | None = Field(
        default=None,
        description="chat_template/sharegpt: role names in the data for each template role, e.g. {user: [human], "
        "assistant: [gpt]} (default: human->user, gpt->assistant).",
    )
    roles_to_train: list[str] = Field(
        default_factory=lambda: ["assistant"],
        description="chat_template/sharegpt: roles whose message content is trained on.",
    )
    train_on_eos: Literal["turn", "all", "last", "none"] = Field(
        default="turn",
        description="chat_template/sharegpt: which end-of-turn tokens are trained: after each trained turn (turn), "
        "after every turn (all), after the last turn only (last), or none.",
    )
    message_field_training: str | None = Field(
        default=None,
        description="chat_template/sharegpt: a message key holding true/false that overrides roles_to_train for "
        "that message.",
    )

    @field_validator("type", mode="before")
    @classmethod
    def _known_type(cls, value):
        if value == "":
            return None  # Axolotl: an empty `type:` means pre-tokenized rows
        if isinstance(value, str) and value not in DATASET_TYPES:
            raise ValueError(f"unknown type '{value}'{did_you_mean(value, DATASET_TYPES)}")
        return value

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value):
        return known_chat_template(value)

    @field_validator("sample")
    @classmethod
    def _whole_count(cls, value):
        if value is not None and value >= 1 and value != int(value):
            raise ValueError("a row count must be a whole number (or a fraction below 1)")
        return value

    @field_validator(*_CHAT_KEYS, "field")
    @classmethod
    def _used_by_the_type(cls, value, info: ValidationInfo):
        if "type" not in info.data:  # the type itself is wrong: that error is enough
            return value
        kind = info.data["type"]
        default = cls.model_fields[info.field_name].get_default(call_default_factory=True)
        if value != default and info.field_name not in _KEYS_OF_TYPE.get(kind, ()):
            raise ValueError(f"not used by type {kind or '(empty: pre-tokenized rows)'}; remove it or change `type`")
        return value


class DataSettings(StrictModel):
    datasets: list[DatasetConfig] = Field(min_length=1, description="Training datasets, mixed together.")
    val_set_size: float = Field(
        default=0.0, ge=0, description="Validation rows held out: a fraction (<1) or a row count (>=1)."
    )
    dataset_prepared_path: str | None = Field(
        default=None, description="Where tokenized datasets are cached (default: output_dir/prepared)."
    )
    sequence_len: int = Field(default=2048, gt=1, description="Maximum tokens per sequence.")
    train_on_inputs: bool = Field(default=False, description="Also train on prompt tokens (default: mask them).")
    sample_packing: bool = Field(
        default=False, description="Pack several samples into each sequence_len row (no cross-attention)."
    )
    excess_length_strategy: Literal["drop", "truncate", "raise"] = Field(
        default="drop",
        description="Samples longer than sequence_len: drop them, truncate them to sequence_len, or raise an error.",
    )
    dataset_processes: int | None = Field(
        default=None, gt=0, description="Processes that prepare large datasets (default: the CPUs available)."
    )

    def val_row_count(self, total: int) -> int:
        """Validation rows of ``total``: ``val_set_size`` as a fraction (<1) or a count (>=1), always leaving a
        training row."""
        if self.val_set_size <= 0:
            return 0
        if self.val_set_size < 1:
            return min(max(1, int(round(self.val_set_size * total))), max(total - 1, 0))
        return min(int(self.val_set_size), max(total - 1, 0))

"""The data keys: each ``datasets:`` entry (``DatasetConfig``) with its per-type rules, and the keys of the
data as a whole (validation rows, sequence length, packing, caching).

A dataset key that only some ``type``s read is refused on the other types, never silently ignored.
"""

from __future__ import annotations

import glob
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, ValidationInfo, field_validator, model_validator

from axlora.config.axolotl import DATASET_REFUSED, asks_for_nothing
from axlora.config.base import StrictModel, known_chat_template
from axlora.core.errors import UserError
from axlora.core.suggest import did_you_mean

DatasetType = Literal["alpaca", "chat_template", "sharegpt", "completion", "input_output"]
DATASET_TYPES: tuple[str, ...] = get_args(DatasetType)

SUFFIX_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow", ".txt": "text"}
"""Data file suffix -> the file format it says (``ds_type`` names the format of other files)."""


LEGACY_TYPES: tuple[str, ...] = (
    "alpaca:chat", "alpaca_chat", "alpaca_chat.load_qa", "alpaca_chat.load_concise", "alpaca_chat.load_camel_ai",
    "alpaca:phi", "alpaca_w_system", "alpaca_w_system.load_open_orca", "sharegpt:chat", "sharegpt_jokes",
    "sharegpt.load_role", "sharegpt.load_guanaco", "sharegpt.load_ultrachat", "oasst", "gpteacher", "pygmalion",
    "metharme", "explainchoice", "explainchoice:chat", "concisechoice", "concisechoice:chat", "context_qa",
    "context_qa.load_v2", "context_qa.load_404", "summarizetldr", "summarizetldr:chat", "jeopardy", "reflection",
    "creative_acr", "orcamini", "user_defined", "stepwise_supervised", "bradley_terry", "llama2_chat", "orpo.chat_template",
)
"""Axolotl's older prompt strategies: refused by name (their prompts are fixed strings of Axolotl's own)."""

CONVERSATIONS: dict[str, str] = {
    "chatml": "chatml", "llama3": "llama3", "llama-3": "llama3", "gemma": "gemma", "phi3": "phi_3", "phi_3": "phi_3",
}
"""Axolotl's sharegpt ``conversation:`` names (FastChat's) that axlora has a template for, and that template."""

_CHAT_KEYS = (
    "chat_template", "chat_template_jinja", "field_messages", "message_property_mappings", "roles", "roles_to_train",
    "train_on_eos", "message_field_training", "message_field_role", "message_field_content", "field_system",
    "field_tools", "field_thinking", "template_thinking_key", "split_thinking", "drop_system_message", "train_on_eot",
    "conversation",
)
_KEYS_OF_TYPE = {"chat_template": _CHAT_KEYS, "sharegpt": _CHAT_KEYS, "completion": ("field",)}
"""Dataset keys that only some types read: set on another type, they are an error (never silently ignored)."""


class DatasetSource(StrictModel):
    """Where the rows of a ``datasets:`` entry come from: ``path`` (with ``data_files`` inside it), or, as in
    Axolotl's ``ds_type: json`` + ``data_files`` entries, only ``data_files``: local files read in that order."""

    path: str | None = Field(
        default=None, description="Local JSON/JSONL/Parquet/CSV/Arrow file or directory, or a Hugging Face dataset "
        "name; may be left out when data_files names local files.",
    )
    data_files: str | list[str] | None = Field(
        default=None, description="Files to read: inside a local `path` directory, or of a Hub dataset; without "
        "`path`, local files (or glob patterns), read in the format ds_type names (default: from the suffix).",
    )

    @model_validator(mode="after")
    def _path_or_data_files(self):
        if self.path is None and not self.data_files:
            raise ValueError("path: required key is missing (or give data_files: the local files to read)")
        return self

    def file_names(self) -> list[str]:
        """``data_files`` as a list (empty when unset)."""
        if self.data_files is None:
            return []
        return [self.data_files] if isinstance(self.data_files, str) else list(self.data_files)

    @property
    def label(self) -> str:
        """How plans, reports and messages name this dataset: its path, else its data files."""
        return self.path if self.path is not None else ", ".join(self.file_names())

    def with_local_paths(self, resolve: Callable[[str], str]):
        """This entry with its local paths made absolute by ``resolve`` (Hub names kept): ``path``, or without
        one, each data file (for a glob pattern, the directories before its first wildcard)."""
        if self.path is not None:
            return self.model_copy(update={"path": resolve(self.path)})
        files = [_resolve_pattern(name, resolve) for name in self.file_names()]
        return self.model_copy(update={"data_files": files[0] if isinstance(self.data_files, str) else files})


def data_files_location(dataset: DatasetSource) -> str:
    """``axlora validate``'s word on an entry without ``path``. Its data files are local: a missing one that can only be
    a local path is an error now; a name that may be a Hub dataset's is refused when the data is read."""
    missing = [name for name in dataset.file_names() if not glob.glob(str(Path(name).expanduser()))]
    for name in missing:
        if Path(name).is_absolute() or name.startswith((".", "~")) or Path(name).suffix in SUFFIX_TYPES:
            raise UserError(f"data_files: '{name}' not found.")
    return "local data_files" + (f" (not found here: {', '.join(missing)})" if missing else "")


def _resolve_pattern(name: str, resolve: Callable[[str], str]) -> str:
    if not glob.has_magic(name):
        return resolve(name)
    parts = Path(name).parts
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    if fixed == 0:
        return name
    return str(Path(resolve(str(Path(*parts[:fixed]))), *parts[fixed:]))


class DatasetConfig(DatasetSource):
    """One entry of ``datasets:``: where rows come from and how to turn them into tokens and labels.

    Keys follow Axolotl's. Keys that only mean something for some ``type``s are refused on the others, so a
    misplaced key is an error rather than silently ignored.
    """

    type: DatasetType | None = Field(
        default=None,
        description="Row format: alpaca, chat_template, sharegpt, completion, input_output; empty: pre-tokenized "
        "rows (input_ids, optional labels and attention_mask).",
    )
    split: str = Field(
        default="train", description='Split to read; slicing takes part of it: "train[:20%]", "train[:500]".'
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
    message_field_role: str | None = Field(
        default=None, description="chat_template/sharegpt: the message key holding the role (Axolotl's older "
        "spelling of message_property_mappings.role).",
    )
    message_field_content: str | None = Field(
        default=None, description="chat_template/sharegpt: the message key holding the content (Axolotl's older "
        "spelling of message_property_mappings.content).",
    )
    field_system: str = Field(
        default="system", description="chat_template/sharegpt: a column whose text becomes the system message when "
        "the conversation does not start with one.",
    )
    field_tools: str = Field(
        default="tools", description="chat_template/sharegpt: the column holding tool definitions (a list, or JSON "
        "text), passed to the template as `tools`.",
    )
    field_thinking: str = Field(
        default="reasoning_content", description="chat_template/sharegpt: the message key holding reasoning text.",
    )
    template_thinking_key: str = Field(
        default="reasoning_content", description="chat_template/sharegpt: the message key the chat template reads "
        "reasoning from.",
    )
    split_thinking: bool = Field(
        default=False, description="chat_template/sharegpt: split <think>...</think> (or <reasoning>, "
        "<|begin_of_thought|>) out of assistant content into the reasoning key.",
    )
    drop_system_message: bool = Field(
        default=False, description="chat_template/sharegpt: leave out a conversation's leading system message.",
    )
    train_on_eot: Literal["turn", "all", "last", "none"] | None = Field(
        default=None, description="chat_template/sharegpt: like train_on_eos, for the end-of-turn markers that are "
        "not the EOS token (eot_tokens); default: as train_on_eos.",
    )
    conversation: str | None = Field(
        default=None, description="chat_template/sharegpt: Axolotl's sharegpt template name (chatml, llama3, gemma, "
        "phi3); the same as chat_template.",
    )
    shards: int | None = Field(default=None, gt=0, description="Split the dataset into this many shards, keep one.")
    shards_idx: int | None = Field(default=None, ge=0, description="Which shard `shards` keeps (default 0).")
    input_transform: Any = Field(default=None, description="Axolotl key, refused: " + DATASET_REFUSED["input_transform"])
    preprocess_shards: Any = Field(
        default=None, description="Axolotl key, refused: " + DATASET_REFUSED["preprocess_shards"]
    )
    input_format: Any = Field(default=None, description="Axolotl key, refused: " + DATASET_REFUSED["input_format"])
    field_human: Any = Field(default=None, description="Axolotl key, refused: " + DATASET_REFUSED["field_human"])
    field_model: Any = Field(default=None, description="Axolotl key, refused: " + DATASET_REFUSED["field_model"])
    message_field_training_detail: Any = Field(
        default=None, description="Axolotl key, refused: " + DATASET_REFUSED["message_field_training_detail"]
    )
    logprobs_field: Any = Field(default=None, description="Axolotl key, refused: " + DATASET_REFUSED["logprobs_field"])
    temperature: Any = Field(default=None, description="Axolotl key, refused: " + DATASET_REFUSED["temperature"])
    trust_remote_code: Any = Field(
        default=None, description="Axolotl key, refused: " + DATASET_REFUSED["trust_remote_code"]
    )

    @field_validator(*DATASET_REFUSED)
    @classmethod
    def _refused(cls, value, info: ValidationInfo):
        if not asks_for_nothing(value):
            raise ValueError(f"{DATASET_REFUSED[info.field_name]} (Axolotl key); remove it")
        return None

    @field_validator("type", mode="before")
    @classmethod
    def _known_type(cls, value):
        if value == "":
            return None  # Axolotl: an empty `type:` means pre-tokenized rows
        if isinstance(value, dict):
            raise ValueError(
                "a mapping (Axolotl's user-defined prompt format) is not supported; write the prompt into the data "
                "and use type: input_output (segments with labels), or alpaca"
            )
        if isinstance(value, str) and (value in LEGACY_TYPES or ":" in value or "." in value):
            raise ValueError(
                f"type '{value}' is one of Axolotl's older prompt strategies, which axlora does not have; use type: "
                "alpaca (instruction/input/output), completion, input_output, or chat_template with a chat_template"
            )
        if isinstance(value, str) and value not in DATASET_TYPES:
            raise ValueError(f"unknown type '{value}'{did_you_mean(value, DATASET_TYPES)}")
        return value

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value):
        return known_chat_template(value)

    @field_validator("conversation")
    @classmethod
    def _known_conversation(cls, value):
        if value is not None and value not in CONVERSATIONS:
            raise ValueError(
                f"conversation '{value}' has no axlora template (known: {', '.join(CONVERSATIONS)}); set chat_template "
                "to a built-in name or give chat_template_jinja"
            )
        return value

    @model_validator(mode="after")
    def _one_template_and_shard(self) -> DatasetConfig:
        if self.conversation is not None and self.chat_template is not None:
            raise ValueError("conversation and chat_template both name a template; set only chat_template")
        if self.shards_idx is not None and (self.shards is None or self.shards_idx >= self.shards):
            raise ValueError("shards_idx must be below shards (and shards must be set)")
        return self

    def template_setting(self) -> str | None:
        """This dataset's own ``chat_template`` (``conversation:`` is Axolotl's sharegpt spelling of it)."""
        return CONVERSATIONS[self.conversation] if self.conversation else self.chat_template

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


class PretrainingDatasetConfig(StrictModel):
    """One entry of ``pretraining_dataset:`` (Axolotl's keys): a text corpus streamed while training.

    Documents are read in order, tokenized as they come and packed into ``sequence_len`` rows; nothing of
    the corpus is prepared to the cache, so it may be larger than the disk.
    """

    path: str = Field(
        description="A Hugging Face dataset name (streamed), or local JSONL/JSON/Parquet/CSV/text files: a file, "
        "a directory or a glob; Axolotl's `path: json` (or parquet, csv, text) with `data_files` also reads local "
        "files."
    )
    name: str | None = Field(default=None, description="Dataset configuration name (Hugging Face datasets).")
    split: str = Field(default="train", description="Split to stream; slicing is not available on a stream.")
    text_column: str = Field(default="text", description="The column holding each document's text.")
    type: Literal["pretrain"] = Field(
        default="pretrain", description="Axolotl's type of a pretraining entry: pretrain (raw text, every token "
        "trained)."
    )
    data_files: str | list[str] | None = Field(
        default=None, description="Files to read: inside a local `path` directory, of a Hub dataset, or with "
        "`path: json` / parquet / csv / text."
    )
    skip: int = Field(default=0, ge=0, description="Documents to skip at the start of this entry.")
    trust_remote_code: bool = Field(
        default=False, description="Axolotl key; only false: dataset loading scripts are not run."
    )

    @property
    def label(self) -> str:
        """How plans, reports and messages name this corpus (as for ``datasets:`` entries)."""
        return self.path

    @field_validator("type", mode="before")
    @classmethod
    def _pretrain_only(cls, value):
        if value in (None, ""):
            return "pretrain"
        if value != "pretrain":
            raise ValueError(f"type '{value}': a pretraining_dataset entry is raw text (type: pretrain); formatted "
                             "rows (alpaca, chat_template, ...) go under datasets:")
        return value

    @field_validator("split")
    @classmethod
    def _whole_split(cls, value: str):
        if "[" in value:
            raise ValueError(f"split '{value}': a stream cannot be sliced; use skip (documents to leave out) and "
                             "max_steps (how much to train)")
        return value

    @field_validator("trust_remote_code")
    @classmethod
    def _no_scripts(cls, value: bool):
        if value:
            raise ValueError(DATASET_REFUSED["trust_remote_code"] + " (Axolotl key); remove it")
        return value


class PretrainingSettings(StrictModel):
    """``pretraining_dataset``: LoRA continued pretraining on a streamed corpus (instead of ``datasets``)."""

    pretraining_dataset: list[PretrainingDatasetConfig] | None = Field(
        default=None,
        description="Continued pretraining on text corpora streamed while training (Axolotl's key): a list of "
        "entries (or a Hub dataset name), read one after another, tokenized and packed on the fly, never "
        "prepared to the cache. Needs max_steps; replaces datasets.",
    )

    @field_validator("pretraining_dataset", mode="before")
    @classmethod
    def _entries(cls, value):
        """Axolotl also takes a bare Hub name or a single mapping."""
        if isinstance(value, str):
            return [{"path": value}]
        return [value] if isinstance(value, dict) else value


_NOT_ON_A_STREAM = {
    "datasets": "the run trains on the streamed corpus; move these rows into a separate run, or remove "
    "pretraining_dataset",
    "val_set_size": "a stream has no validation split; set val_set_size: 0",
    "group_by_length": "sorting by length would read the whole stream first",
    "dataset_exact_deduplication": "deduplication would hold every document seen",
    "rl": "preference tuning needs chosen and rejected answers, not raw text",
    "eval_on_start": "a stream has no validation rows to evaluate",
    "early_stopping_patience": "a stream has no validation rows to evaluate",
}
"""Keys that contradict a streamed corpus, and why (checked on the whole config)."""


class DataSettings(PretrainingSettings):
    datasets: list[DatasetConfig] = Field(
        default_factory=list, description="Training datasets, mixed together (at least one, unless pretraining_dataset)."
    )
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
    excess_length_strategy: Literal["drop", "truncate", "raise", "split"] | None = Field(
        default=None,
        description="Samples longer than sequence_len: drop them, truncate them to sequence_len, split them into "
        "sequence_len pieces, or raise an error. Default: split for type completion, drop for the others.",
    )
    eot_tokens: list[str] | None = Field(
        default=None,
        description="Chat datasets: the texts that end a turn, trained after trained turns as train_on_eot says "
        "(default: the template's end-of-turn marker, the EOS token and end-like special tokens).",
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None, description="Chat datasets: extra variables for the chat template, e.g. {enable_thinking: false}."
    )
    dataset_processes: int | None = Field(
        default=None, gt=0, description="Processes that prepare large datasets (default: the CPUs available)."
    )
    dataset_exact_deduplication: bool = Field(
        default=False,
        description="Drop rows that repeat another row of the same format exactly (before the validation split, "
        "so no validation row is also trained on).",
    )

    def length_strategy(self, dataset: DatasetConfig) -> str:
        """What happens to ``dataset``'s samples over ``sequence_len``: the setting, else its type's default."""
        if self.excess_length_strategy is not None:
            return self.excess_length_strategy
        return "split" if dataset.type == "completion" else "drop"

    def val_row_count(self, total: int) -> int:
        """Validation rows of ``total``: ``val_set_size`` as a fraction (<1) or a count (>=1), always leaving a
        training row."""
        if self.val_set_size <= 0:
            return 0
        if self.val_set_size < 1:
            return min(max(1, int(round(self.val_set_size * total))), max(total - 1, 0))
        return min(int(self.val_set_size), max(total - 1, 0))

    @model_validator(mode="after")
    def _data_to_train_on(self):
        """Validated as part of ``Config``, which holds the other sections' keys read here by name."""
        problems = self.pretraining_problems()
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def pretraining_problems(self) -> list[str]:
        """No data at all, or keys a streamed corpus cannot honour (other sections' keys read by name)."""
        if not self.pretraining_dataset:
            if not self.datasets:
                return ["datasets: give at least one dataset (or pretraining_dataset for continued pretraining)."]
            return []
        problems = []
        if "max_steps" in type(self).model_fields and getattr(self, "max_steps", None) is None:
            problems.append("max_steps: pretraining_dataset streams a corpus of unknown length; set max_steps (how "
                            "many optimizer steps to train), as Axolotl requires.")
        for key, why in _NOT_ON_A_STREAM.items():
            if getattr(self, key, None):
                problems.append(f"{key}: not with pretraining_dataset: {why}.")
        if any(not isinstance(prompt, str) for prompt in getattr(self, "sample_prompts", None) or []):
            problems.append("sample_prompts: with pretraining_dataset a prompt is the start of a text to continue "
                            "(a string), not the fields of a row format.")
        return problems

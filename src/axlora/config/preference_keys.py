"""The preference-tuning keys: ``rl`` (DPO, IPO, SimPO, ORPO, KTO), their settings, and preference datasets.

Names and meanings are Axolotl's (which hands them to TRL): ``rl_beta`` is TRL's ``beta``, ``orpo_alpha`` is
ORPO's lambda, ``cpo_alpha`` weighs the chosen answers' NLL in SimPO (TRL's CPO trainer), and so on. Online
methods (GRPO and the like generate answers during training) are refused by name.

A ``datasets:`` entry whose ``type`` is one of Axolotl's preference types (``chat_template.default``,
``chatml.intel``, ``llama3.ultra``, ``user_defined.default``, ...) is a ``PreferenceDatasetConfig``; any other
entry stays a supervised ``DatasetConfig``. ``Config`` then checks that the two kinds match ``rl``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from axlora.config.base import StrictModel, known_chat_template
from axlora.config.datasets import DatasetConfig, DatasetSource, DataSettings
from axlora.core.suggest import did_you_mean

RlMethod = Literal["dpo", "ipo", "simpo", "orpo", "kto"]
RL_METHODS: tuple[str, ...] = get_args(RlMethod)
ONLINE_METHODS: tuple[str, ...] = ("grpo", "gspo", "gkd", "online_dpo", "ppo", "rloo", "xpo", "nash_md", "ebft")
"""Axolotl / TRL methods that generate answers while training: out of axlora's scope, refused by name."""

DpoLossType = Literal["sigmoid", "hinge", "ipo", "robust"]
DPO_LOSS_TYPES: tuple[str, ...] = get_args(DpoLossType)
"""TRL's DPO loss variants that axlora computes (``dpo_loss_type``)."""

PAIR_TYPES: tuple[str, ...] = (
    "chat_template.default", "chatml.intel", "chatml.argilla", "chatml.ultra", "chatml.prompt_pairs",
    "llama3.intel", "llama3.argilla", "llama3.ultra", "llama3.prompt_pairs", "user_defined.default",
    "chatml.argilla_chat", "llama3.argilla_chat", "chat_template.argilla_chat",
)
"""Axolotl's preference types for chosen / rejected pairs (DPO, IPO, SimPO, ORPO)."""

ORPO_TYPES: tuple[str, ...] = ("chat_template.argilla",)
"""Pair types Axolotl has for ORPO only (its ``orpo`` strategies): whole chosen / rejected conversations."""

KTO_TYPES: tuple[str, ...] = (
    "chatml.argilla", "chatml.argilla_chat", "chatml.intel", "chatml.prompt_pairs", "chatml.ultra",
    "llama3.argilla", "llama3.argilla_chat", "llama3.intel", "llama3.prompt_pairs", "llama3.ultra",
    "user_defined.default",
)
"""Axolotl's KTO types: a prompt, one completion and a desirable / undesirable label."""

PREFERENCE_TYPES: tuple[str, ...] = tuple(dict.fromkeys(PAIR_TYPES + ORPO_TYPES + KTO_TYPES))
_PREFERENCE_PREFIXES = ("chat_template.", "chatml.", "llama3.", "user_defined.")


class PreferenceDatasetConfig(DatasetSource):
    """One ``datasets:`` entry of preference rows: a prompt with a chosen and a rejected answer (KTO: one
    completion and a label). Where rows come from is read as for supervised datasets."""

    type: str = Field(description="Preference row format: " + ", ".join(PREFERENCE_TYPES) + ".")
    split: str = Field(default="train", description='Split to read; slicing takes part of it: "train[:20%]".')
    name: str | None = Field(default=None, description="Dataset configuration name (Hugging Face datasets).")
    revision: str | None = Field(default=None, description="Hub dataset revision to read.")
    ds_type: Literal["json", "parquet", "csv", "arrow", "text"] | None = Field(
        default=None, description="File format of local files whose suffix does not say it."
    )
    sample: float | None = Field(default=None, gt=0, description="Take part of this dataset at random (by `seed`).")
    shards: int | None = Field(default=None, gt=0, description="Split the dataset into this many shards, keep one.")
    shards_idx: int | None = Field(default=None, ge=0, description="Which shard `shards` keeps (default 0).")
    chat_template: str | None = Field(
        default=None, description="chat_template.*: the template to render with (default: the run's)."
    )
    field_messages: str = Field(default="messages", description="chat_template.default: the prompt's message list.")
    field_chosen: str = Field(default="chosen", description="The chosen answer: text, a message or a message list.")
    field_rejected: str = Field(default="rejected", description="The rejected answer: text, a message or a list.")
    field_prompt: str = Field(default="prompt", description="user_defined.default: the prompt column.")
    field_system: str = Field(default="system", description="user_defined.default: the system-message column.")
    field_completion: str = Field(default="completion", description="KTO user_defined.default: the completion.")
    field_label: str = Field(default="label", description="KTO user_defined.default: true for a desirable completion.")
    message_property_mappings: dict[str, str] | None = Field(
        default=None, description="chat_template.default: message keys to read role and content from."
    )
    roles: dict[str, list[str]] | None = Field(
        default=None, description="chat_template.default: role names in the data for each template role."
    )

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in PREFERENCE_TYPES:
            raise ValueError(f"unknown preference type '{value}'{did_you_mean(value, PREFERENCE_TYPES)}")
        return value

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value):
        return known_chat_template(value)

    @model_validator(mode="after")
    def _template_only_for_chat_template(self) -> PreferenceDatasetConfig:
        if self.chat_template is not None and not self.type.startswith("chat_template."):
            raise ValueError(f"chat_template: type {self.type} names its template; remove chat_template")
        if self.shards_idx is not None and (self.shards is None or self.shards_idx >= self.shards):
            raise ValueError("shards_idx must be below shards (and shards must be set)")
        return self

    def template_setting(self) -> str | None:
        """The template the type fixes (chatml.*, llama3.*), else the dataset's own ``chat_template``."""
        prefix = self.type.split(".", 1)[0]
        return prefix if prefix in {"chatml", "llama3"} else self.chat_template


def is_preference_entry(entry: Any) -> bool:
    """Whether a raw or validated ``datasets:`` entry names one of Axolotl's preference types."""
    kind = entry.get("type") if isinstance(entry, dict) else getattr(entry, "type", None)
    return isinstance(kind, str) and kind.startswith(_PREFERENCE_PREFIXES) and kind != "chat_template"


# The tags start with "union-": the config loader leaves such parts out of the key path it reports.
DatasetEntry = Annotated[
    Annotated[DatasetConfig, Tag("union-supervised")] | Annotated[PreferenceDatasetConfig, Tag("union-preference")],
    Discriminator(lambda entry: "union-preference" if is_preference_entry(entry) else "union-supervised"),
]


class PreferenceSettings(StrictModel):
    """Preference tuning on the LoRA: the objective, its weights, and where the reference log-probs come from."""

    datasets: list[DatasetEntry] = Field(  # type: ignore[assignment]
        default_factory=list,
        description=(DataSettings.model_fields["datasets"].description or "")
        + " Under rl: preference types (" + ", ".join(PREFERENCE_TYPES) + ").",
    )
    rl: RlMethod | None = Field(
        default=None,
        description="Preference tuning instead of supervised: dpo, ipo, simpo or orpo on chosen / rejected pairs, "
        "kto on completions labelled desirable or not (Axolotl's names); online methods such as grpo are refused.",
    )
    rl_beta: float | None = Field(
        default=None, gt=0, description="TRL's beta: for DPO, IPO and KTO how strongly the policy is held to the "
        "reference; SimPO's reward scale (default 0.1; SimPO 2.0).",
    )
    dpo_loss_type: DpoLossType | None = Field(
        default=None, description="rl: dpo loss variant as TRL names it: sigmoid (default), hinge, ipo, robust."
    )
    dpo_label_smoothing: float = Field(
        default=0.0, ge=0, lt=0.5, description="rl: dpo/simpo: the probability that a pair's labels are flipped "
        "(conservative DPO, robust DPO)."
    )
    dpo_use_weighting: bool = Field(
        default=False, description="rl: dpo: weigh each pair by its likelihood under the policy (WPO)."
    )
    simpo_gamma: float = Field(default=0.5, ge=0, description="rl: simpo: the target reward margin gamma.")
    cpo_alpha: float = Field(
        default=1.0, ge=0, description="rl: simpo: weight of the chosen answers' NLL added to the loss (TRL's "
        "cpo_alpha; 0 is pure SimPO).",
    )
    orpo_alpha: float = Field(
        default=0.1, gt=0, description="rl: orpo: weight lambda of the odds-ratio term added to the chosen NLL."
    )
    kto_desirable_weight: float = Field(
        default=1.0, gt=0, description="rl: kto: weight of the desirable completions' losses (TRL's desirable_weight; "
        "raise the rarer kind's weight so weight x count is about even).",
    )
    kto_undesirable_weight: float = Field(
        default=1.0, gt=0, description="rl: kto: weight of the undesirable completions' losses (TRL's "
        "undesirable_weight).",
    )
    precompute_ref_log_probs: bool = Field(
        default=False, description="Compute the reference log-probs in one pass before training instead of at each "
        "step (always so when continuing an adapter, whose starting weights are the reference).",
    )

    @field_validator("rl", mode="before")
    @classmethod
    def _offline_methods_only(cls, value):
        if isinstance(value, bool) and value:
            raise ValueError("name the method: dpo, ipo, simpo, orpo or kto")
        if value is False or value == "":
            return None
        if isinstance(value, str) and value.lower() in ONLINE_METHODS:
            raise ValueError(f"{value} generates answers during training (online RL), which axlora does not do; "
                             "use an offline method: " + ", ".join(RL_METHODS))
        if isinstance(value, str) and value not in RL_METHODS:
            raise ValueError(f"unknown method '{value}'{did_you_mean(value, RL_METHODS)}; known: "
                             + ", ".join(RL_METHODS))
        return value

    @field_validator("dpo_loss_type", mode="before")
    @classmethod
    def _one_loss_type(cls, value):
        """Axolotl writes a list (TRL can mix losses); axlora computes one."""
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("axlora computes one DPO loss; give one of " + ", ".join(DPO_LOSS_TYPES))
            return value[0]
        return value

    def beta(self) -> float:
        """``rl_beta``, else the default of the method (TRL's 0.1; SimPO's paper 2.0)."""
        if self.rl_beta is not None:
            return self.rl_beta
        return 2.0 if self.rl == "simpo" else 0.1

    def dpo_variant(self) -> str:
        """The DPO-family loss computed for rl: dpo / ipo (TRL's ``loss_type``)."""
        return "ipo" if self.rl == "ipo" else self.dpo_loss_type or "sigmoid"

    def uses_reference(self) -> bool:
        """SimPO and ORPO need no reference model; DPO, IPO and KTO do."""
        return self.rl in {"dpo", "ipo", "kto"}

    def preference_problems(self) -> list[str]:
        """Cross-field rules of the preference keys against the datasets (``Config`` reports them)."""
        problems = []
        if self.rl is None:
            for index, entry in enumerate(self.datasets):
                if isinstance(entry, PreferenceDatasetConfig):
                    problems.append(f"datasets: datasets[{index}] type {entry.type} holds preference rows; set rl "
                                    "(dpo, ipo, simpo, orpo, kto) or use a supervised type.")
            return problems
        allowed = KTO_TYPES if self.rl == "kto" else PAIR_TYPES + (ORPO_TYPES if self.rl == "orpo" else ())
        for index, entry in enumerate(self.datasets):
            if isinstance(entry, DatasetConfig):
                problems.append(f"datasets: rl: {self.rl} trains on preference rows, datasets[{index}] (type "
                                f"{entry.type or 'pre-tokenized'}) is supervised: it has no "
                                f"{'completion label' if self.rl == 'kto' else 'chosen and rejected answers'}; "
                                f"use one of {', '.join(allowed)}.")
            elif entry.type not in allowed:
                problems.append(f"datasets: datasets[{index}] type {entry.type} is not a {self.rl} format; use one of "
                                f"{', '.join(allowed)}.")
        if self.dpo_loss_type is not None and self.rl != "dpo":
            problems.append(f"dpo_loss_type: applies to rl: dpo only (rl is {self.rl}).")
        return problems

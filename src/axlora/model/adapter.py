"""Which LoRA to train: continue an existing adapter, or start a fresh one.

``plan_adapter`` decides from the config and the disk alone (no torch import, so ``validate`` can print
it); ``attach_adapter`` then builds the peft model. The decision and its reason are always printed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from axlora.config.schema import Config
from axlora.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MERGE_MARKER = "axlora_merge.json"

# YAML key -> adapter_config.json key, for the settings an existing adapter decides by itself.
_ADAPTER_OWNED_KEYS = {
    "lora_r": "r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "lora_target_modules": "target_modules",
    "peft_use_rslora": "use_rslora",
}


@dataclass
class AdapterPlan:
    """What the loader will do and why (printed before training)."""

    case: Literal["continue", "fresh"]
    reason: str
    adapter_dir: Path | None = None
    adapter_config: dict = field(default_factory=dict)

    def describe(self) -> str:
        return f"adapter: {self.case} — {self.reason}"


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() and any((path / name).is_file() for name in ADAPTER_WEIGHTS)


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first (temporary dirs are skipped)."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if child.name.startswith("step-") and child.name[5:].isdigit() and (child / "trainer_state.json").is_file():
            found.append((int(child.name[5:]), child))
    return [path for _, path in sorted(found)]


def find_adapter(path: Path) -> tuple[Path, str]:
    """The adapter directory inside ``path`` and how it was found; ``UserError`` when there is none."""
    if not path.exists():
        raise UserError(f"lora_model_dir: '{path}' does not exist; expected a PEFT adapter directory.")
    if not path.is_dir():
        raise UserError(f"lora_model_dir: '{path}' is not a directory; expected a PEFT adapter directory.")
    if is_adapter_dir(path):
        return path, f"continuing the adapter in {path}"
    if is_adapter_dir(path / "final"):
        return path / "final", f"{path} is an earlier axlora run; continuing its final/ adapter"
    checkpoints = [c for c in complete_checkpoints(path) if is_adapter_dir(c)]
    if checkpoints:
        newest = checkpoints[-1]
        return newest, f"{path} is an earlier axlora run without final/; continuing its newest checkpoint {newest.name}"
    raise UserError(
        f"lora_model_dir: no adapter in '{path}': expected {ADAPTER_CONFIG} and adapter_model.safetensors "
        "(a PEFT adapter), or an axlora output_dir holding final/ or checkpoints/step-N/."
    )


def plan_adapter(config: Config) -> AdapterPlan:
    """Resolve the adapter case from the config and the disk (see the design's "Continuing a LoRA")."""
    if config.lora_model_dir:
        adapter_dir, reason = find_adapter(Path(config.lora_model_dir))
        try:
            adapter_config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"lora_model_dir: cannot read {adapter_dir / ADAPTER_CONFIG}: {exc}") from None
        return AdapterPlan("continue", reason, adapter_dir, adapter_config)
    base = Path(config.base_model)
    if (base / MERGE_MARKER).is_file():
        return AdapterPlan("fresh", f"base_model {base} is a merged model; training a fresh LoRA on it")
    return AdapterPlan("fresh", f"new LoRA r={config.lora_r} alpha={config.lora_alpha:g} on {_targets(config)}")


def _targets(config: Config) -> str:
    if config.lora_target_linear:
        return "all linear layers"
    return ", ".join(config.lora_target_modules or [])


def adapter_setting_conflicts(config: Config, adapter_config: dict) -> list[str]:
    """YAML adapter settings (set explicitly) that differ from the loaded adapter's own config."""
    conflicts = []
    for yaml_key, peft_key in _ADAPTER_OWNED_KEYS.items():
        if yaml_key not in config.model_fields_set or peft_key not in adapter_config:
            continue
        ours, theirs = getattr(config, yaml_key), adapter_config[peft_key]
        if isinstance(ours, list) and isinstance(theirs, list | tuple):
            differs = sorted(ours) != sorted(theirs)
        else:
            differs = ours != theirs
        if differs:
            conflicts.append(f"{yaml_key}: YAML says {ours!r}, the adapter has {theirs!r}")
    return conflicts


def fresh_lora_config(config: Config):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules="all-linear" if config.lora_target_linear else list(config.lora_target_modules or []),
        use_rslora=config.peft_use_rslora,
    )


def attach_adapter(model, config: Config, plan: AdapterPlan, log=print):
    """Wrap ``model`` with the planned LoRA; a continued adapter is loaded trainable."""
    from peft import PeftModel, get_peft_model

    log(plan.describe())
    if plan.case == "fresh":
        try:
            return get_peft_model(model, fresh_lora_config(config))
        except ValueError as exc:
            raise UserError(f"lora_target_modules: {exc}") from None
    conflicts = adapter_setting_conflicts(config, plan.adapter_config)
    if conflicts and config.strict:
        raise UserError(
            "strict: the YAML contradicts the adapter being continued:\n  "
            + "\n  ".join(conflicts)
            + "\nRemove these keys from the YAML (the adapter's own settings are used) or set strict: false."
        )
    for conflict in conflicts:
        log(f"warning: {conflict}; the adapter's value is used")
    try:
        return PeftModel.from_pretrained(model, str(plan.adapter_dir), is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UserError(
            f"lora_model_dir: the adapter in {plan.adapter_dir} does not fit base_model "
            f"'{config.base_model}' (adapter was trained on "
            f"'{plan.adapter_config.get('base_model_name_or_path')}'): {str(exc).splitlines()[0]}"
        ) from None

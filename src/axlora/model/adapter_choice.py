"""Which LoRA to train: continue an existing adapter, or start a fresh one.

``resolve_adapter`` decides from the config and the disk alone, without importing torch, so ``axlora
validate`` can print the decision and refuse a bad ``lora_model_dir`` or a ``strict`` contradiction in a
second. A continued adapter keeps its own rank, alpha, dropout and target modules (its weights only make
sense with them); where the YAML says otherwise, each key is named with both values. The adapter's
directory is only ever read, except that an earlier run's ``final/`` which a replacement killed half way left
hidden is put back first (``core.atomic.recover_directory``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from axlora.config.schema import Config
from axlora.core.adapter_config import read_adapter_config
from axlora.core.atomic import recover_directory
from axlora.core.errors import UserError
from axlora.core.layout import RunLayout, is_adapter_dir
from axlora.core.names import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MERGE_MARKER
from axlora.model.adapter_fit import adapter_module_shapes, base_facts_on_disk, check_base_model

# YAML key -> adapter_config.json key, for the scalar settings an existing adapter decides by itself.
# Target modules are compared module by module against the loaded base model (``target_conflicts``).
_ADAPTER_OWNED_KEYS = {
    "lora_r": "r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "peft_use_rslora": "use_rslora",
    "peft_use_dora": "use_dora",
    "lora_fan_in_fan_out": "fan_in_fan_out",
}


@dataclass
class AdapterChoice:
    """What the loader will do and why (printed before training)."""

    case: Literal["continue", "fresh"]
    reason: str
    adapter_dir: Path | None = None
    adapter_config: dict = field(default_factory=dict)
    conflicts: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return f"adapter: {self.case} — {self.reason}"


def find_adapter(path: Path) -> tuple[Path, str]:
    """The adapter directory inside ``path`` and how it was found; ``UserError`` when there is none.

    ``path`` may be a PEFT adapter itself, or an earlier axlora ``output_dir``: then its ``final/``, else its
    newest complete checkpoint, so "continue that run" needs no knowledge of its layout.
    """
    expected = (f"expected a PEFT adapter directory ({ADAPTER_CONFIG} + adapter_model.safetensors) "
                "or an earlier axlora output_dir")
    if not path.exists():
        raise UserError(f"lora_model_dir: '{path}' does not exist; {expected}.")
    if not path.is_dir():
        raise UserError(f"lora_model_dir: '{path}' is not a directory; {expected}.")
    if is_adapter_dir(path):
        return path, f"continuing the adapter in {path}"
    recover_directory(RunLayout(path).final)  # a replacement of final/ killed half way left it hidden
    if is_adapter_dir(RunLayout(path).final):
        return RunLayout(path).final, f"{path} is an earlier axlora run; continuing its final/ adapter"
    checkpoints = [c for c in RunLayout(path).complete_checkpoints() if is_adapter_dir(c)]
    if checkpoints:
        newest = checkpoints[-1]
        return newest, (f"{path} is an earlier axlora run without final/; continuing its newest complete "
                        f"checkpoint checkpoints/{newest.name}")
    raise UserError(
        f"lora_model_dir: no adapter in '{path}': expected {ADAPTER_CONFIG} and adapter_model.safetensors "
        "(a PEFT adapter), or an axlora output_dir holding final/ or checkpoints/step-N/."
    )


def read_lora_config(adapter_dir: Path) -> dict[str, Any]:
    """``adapter_config.json`` of the adapter to continue; ``UserError`` naming the file when it is not a LoRA's."""
    try:
        data = read_adapter_config(adapter_dir)
    except UserError as exc:
        raise UserError(f"lora_model_dir: {exc}.") from None
    kind = str(data.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        path = adapter_dir / ADAPTER_CONFIG
        raise UserError(f"lora_model_dir: {path} describes a {kind} adapter; axlora continues LoRA adapters only.")
    return data


def resolve_adapter(config: Config) -> AdapterChoice:
    """Resolve the adapter case from the config and the disk (see the design's "Continuing a LoRA")."""
    if config.lora_model_dir:
        adapter_dir, reason = find_adapter(Path(config.lora_model_dir))
        adapter_config = read_lora_config(adapter_dir)
        _refuse_writing_over(adapter_dir, Path(config.output_dir))
        conflicts = adapter_setting_conflicts(config, adapter_config)
        refuse_if_strict(config, conflicts)
        base = base_facts_on_disk(config.base_model)
        if base is not None and (adapter_dir / ADAPTER_WEIGHTS).is_file():
            check_base_model(config, adapter_dir, adapter_config, adapter_module_shapes(adapter_dir), base)
        return AdapterChoice("continue", reason, adapter_dir, adapter_config, conflicts)
    base_dir = Path(config.base_model)
    if (base_dir / MERGE_MARKER).is_file():
        return AdapterChoice("fresh", f"base_model {base_dir} is a merged model; training a fresh LoRA on it")
    return AdapterChoice("fresh", f"new LoRA r={config.lora_r} alpha={config.lora_alpha:g} on {_targets(config)}")


def _refuse_writing_over(adapter_dir: Path, output_dir: Path) -> None:
    """The adapter being continued must stay as it is: this run replaces final/ and checkpoints/."""
    adapter, output = adapter_dir.resolve(), output_dir.resolve()
    if adapter == output or output in adapter.parents:
        raise UserError(
            f"lora_model_dir: {adapter_dir} lies inside output_dir {output_dir}, which this run overwrites "
            "(final/, checkpoints/); set a new output_dir so the adapter being continued stays as it is."
        )


def refuse_if_strict(config: Config, conflicts: list[str]) -> None:
    """With ``strict: true`` a YAML setting the continued adapter overrides is an error, not a warning."""
    if conflicts and config.strict:
        raise UserError(
            "strict: the YAML contradicts the adapter being continued:\n  "
            + "\n  ".join(conflicts)
            + "\nRemove these keys from the YAML (the adapter's own settings are used) or set strict: false."
        )


def _targets(config: Config) -> str:
    if config.lora_target_linear:
        modules = "all linear layers"
    elif isinstance(config.lora_target_modules, str):
        modules = config.lora_target_modules
    else:
        modules = ", ".join(config.lora_target_modules or [])
    parameters = ", ".join(config.lora_target_parameters or [])
    return " and parameters ".join(part for part in (modules, parameters) if part)


def adapter_setting_conflicts(config: Config, adapter_config: dict) -> list[str]:
    """Scalar YAML adapter settings (set explicitly) that differ from the loaded adapter's own config."""
    conflicts = []
    for yaml_key, peft_key in _ADAPTER_OWNED_KEYS.items():
        if yaml_key not in config.model_fields_set or peft_key not in adapter_config:
            continue
        ours, theirs = getattr(config, yaml_key), adapter_config[peft_key]
        if ours != theirs:
            conflicts.append(f"{yaml_key}: YAML says {_show(ours)}, the adapter has {_show(theirs)}")
    return conflicts


def _show(value: Any) -> str:
    """A value as the user wrote it: alpha 16, not 16.0."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)

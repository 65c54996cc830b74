"""The ``deepspeed`` key: a shipped ZeRO preset or a user's JSON, completed from the YAML.

The YAML is the single source of truth for batch shape, gradient clipping and precision: the presets say
``"auto"`` for those, and a user's JSON that states a different value is refused rather than silently
training with another batch than the one the config (and a later resume) describes. Optimizer and
scheduler come from the YAML keys too, so a JSON ``optimizer``/``scheduler`` section is refused.
Everything here runs before any worker starts and without importing torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from axlora.config.deepspeed_presets import AXOLOTL_FILES, PRESETS
from axlora.config.schema import Config
from axlora.core.errors import UserError


@dataclass(frozen=True)
class DeepSpeedSetup:
    """A DeepSpeed config with every ``"auto"`` the YAML decides filled in."""

    source: str
    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def stage(self) -> int:
        return int(self.config.get("zero_optimization", {}).get("stage", 0))

    @property
    def offloads_optimizer(self) -> bool:
        offload = self.config.get("zero_optimization", {}).get("offload_optimizer") or {}
        return offload.get("device", "none") not in ("none", None)


def load_deepspeed_setup(config: Config, world_size: int, precision: str) -> DeepSpeedSetup:
    """The run's DeepSpeed config; ``precision`` is "bf16", "fp16" or "fp32"."""
    assert config.deepspeed is not None
    raw, source, notes = _read(config.deepspeed)
    for section, yaml_keys in _BUILT_FROM_YAML.items():
        if section in raw:
            raise UserError(f"deepspeed: {source} has a '{section}' section; axlora builds the {section} from the "
                            f"YAML keys ({yaml_keys}), so remove the section.")
    decided = {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "train_batch_size": config.micro_batch_size * config.gradient_accumulation_steps * world_size,
        "gradient_clipping": config.max_grad_norm,
    }
    filled = dict(raw)
    for key, value in decided.items():
        filled[key] = _agree(source, key, raw.get(key, "auto"), value)
    for name in ("bf16", "fp16"):
        section = dict(raw.get(name) or {})
        section["enabled"] = _agree(source, f"{name}.enabled", section.get("enabled", "auto"), precision == name)
        filled[name] = section
    _check_zero(source, filled, config)
    return DeepSpeedSetup(source=source, config=filled, notes=notes)


def _read(value: str) -> tuple[dict[str, Any], str, list[str]]:
    if value in PRESETS:
        text = resources.files("axlora").joinpath("deepspeed_configs", f"{value}.json").read_text()
        return json.loads(text), f"preset {value}", []
    path = Path(value)
    notes = []
    if not path.is_file():
        preset = AXOLOTL_FILES.get(path.name)
        if preset is None:
            raise UserError(f"deepspeed: '{value}' not found; give the path of a DeepSpeed JSON config or "
                            f"a shipped preset ({', '.join(PRESETS)}).")
        notes.append(f"deepspeed: '{value}' does not exist here; using the shipped preset '{preset}', which has "
                     f"the settings of Axolotl's {path.name}")
        raw, source, _ = _read(preset)
        return raw, source, notes
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"deepspeed: {path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    except OSError as exc:
        raise UserError(f"deepspeed: cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise UserError(f"deepspeed: {path}: expected a JSON object of DeepSpeed settings.")
    return raw, str(path), notes


def _agree(source: str, key: str, stated: Any, decided: Any) -> Any:
    """The YAML's value where the JSON says "auto" (or the same value); a contradiction is an error."""
    if stated in ("auto", decided):
        return decided
    yaml_key = _YAML_KEYS.get(key, key)
    raise UserError(f"deepspeed: {source} sets {key} to {stated!r}, but the config's {yaml_key} gives {decided!r}; "
                    f"set it to \"auto\" (axlora fills it from the YAML) or change {yaml_key}.")


_BUILT_FROM_YAML = {"optimizer": "optimizer, learning_rate, weight_decay", "scheduler": "lr_scheduler, warmup_steps"}
_YAML_KEYS = {
    "train_micro_batch_size_per_gpu": "micro_batch_size",
    "train_batch_size": "micro_batch_size x gradient_accumulation_steps x processes",
    "gradient_clipping": "max_grad_norm",
    "bf16.enabled": "bf16 (with the GPU present)",
    "fp16.enabled": "fp16",
}


def _check_zero(source: str, ds: dict[str, Any], config: Config) -> None:
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    if stage not in (0, 1, 2, 3):
        raise UserError(f"deepspeed: {source}: zero_optimization.stage must be 0, 1, 2 or 3, not {stage}.")
    # a 4-bit base partitions like the rest: its packed weights are stored in the compute dtype (model.load)
    if stage == 3 and config.quantization_bits() == 8:
        raise UserError(
            f"deepspeed: ZeRO-3 ({source}) partitions the base weights, which cannot be done with an 8-bit base "
            "(load_in_8bit); use load_in_4bit (QLoRA partitions under ZeRO-3), zero2 / zero1, or drop the "
            "quantization."
        )


def require_deepspeed() -> None:
    """DeepSpeed is an optional extra: say how to get it before any worker starts."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise UserError("deepspeed: DeepSpeed is not installed; install it with pip install 'axlora[deepspeed]' "
                        "(or remove the deepspeed key to train with plain data parallelism).")

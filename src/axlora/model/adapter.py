"""Putting the chosen LoRA on the loaded base model: a fresh one from the YAML, or a continued one, checked.

The choice itself (``resolve_adapter``, ``AdapterChoice``) is made without torch in ``adapter_choice``; here
the decision and its reason are always printed.
"""

from __future__ import annotations

from typing import Any

from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.model.adapter_choice import AdapterChoice, refuse_if_strict
from axlora.model.adapter_fit import (
    BaseModelFacts,
    adapter_module_shapes,
    check_adapter_values,
    check_base_model,
    check_targets_exist,
    loaded_weight_shapes,
    lora_target_module_names,
    short_module_names,
    target_conflicts,
)
from axlora.model.multimodal import lora_exclusions
from axlora.model.unfrozen import unfrozen_modules


def fresh_lora_config(config: Config):
    """peft's ``LoraConfig`` for a new LoRA, from the YAML's adapter keys."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=_target_modules(config),
        use_rslora=config.peft_use_rslora,
        **_language_model_only(config),
        **config.peft_kwargs(),
    )


def _language_model_only(config: Config) -> dict[str, str]:
    """A multimodal class trained on text: no LoRA inside its image-only parts."""
    excluded = lora_exclusions(config.model_type)
    return {"exclude_modules": excluded} if excluded else {}


def _target_modules(config: Config) -> str | list[str]:
    """peft's target_modules: all-linear, one regular expression, or a list of names."""
    if config.lora_target_linear:
        return "all-linear"
    if isinstance(config.lora_target_modules, str):
        return config.lora_target_modules
    return list(config.lora_target_modules or [])


def attach_adapter(model, config: Config, choice: AdapterChoice, log=print):
    """Wrap ``model`` with the chosen LoRA; a continued adapter is checked against the base, loaded trainable."""
    if config.llama4_linearized_experts and choice.case == "continue" and choice.adapter_config.get("target_parameters"):
        raise UserError(f"lora_model_dir / llama4_linearized_experts: the adapter in {choice.adapter_dir} holds LoRA on "
                        "fused expert parameters (target_parameters), which linearizing replaces; continue it without "
                        "llama4_linearized_experts, with lora_target_parameters on the fused experts.")
    peft_model = _attach(model, config, choice, log)
    if config.loftq() is not None or choice.case == "continue":
        from axlora.model.loftq import use_loftq_base

        use_loftq_base(peft_model, config, choice.adapter_dir if choice.case == "continue" else None, log)
    if config.quantize_moe_experts:
        from axlora.model.expert_quant import keep_packed_experts_local

        keep_packed_experts_local(peft_model)
    if config.llama4_linearized_experts:
        from axlora.model.llama4_adapter_layout import use_fused_adapter_layout

        use_fused_adapter_layout(peft_model, log)
    return peft_model


def _attach(model, config: Config, choice: AdapterChoice, log):
    from peft import get_peft_model

    log(choice.describe())
    check_targets_exist(model, config)
    if choice.case == "fresh":
        lora = fresh_lora_config(config)
        if config.unfrozen_parameters:
            unfrozen = unfrozen_modules(model, config, lora_target_module_names(model, config))
            lora.modules_to_save = sorted(set(lora.modules_to_save or []) | set(unfrozen))
            log(f"adapter: trained in full beside the LoRA (unfrozen_parameters): {', '.join(unfrozen)}")
        try:
            return get_peft_model(model, lora)
        except ValueError as exc:
            raise UserError(f"lora_target_modules: {exc}") from None
    return _continue_adapter(model, config, choice, log)


def _continue_adapter(model, config: Config, choice: AdapterChoice, log):
    """Check the adapter against the loaded model (names, shapes, targets), then load it trainable."""
    from peft import PeftModel

    assert choice.adapter_dir is not None
    check_adapter_values(choice.adapter_dir)
    shapes = adapter_module_shapes(choice.adapter_dir)
    base = BaseModelFacts(names=[config.base_model, getattr(model, "name_or_path", "") or ""],
                          weight_shapes=loaded_weight_shapes(model), complete=True)
    for warning in check_base_model(config, choice.adapter_dir, choice.adapter_config, shapes, base):
        log(f"warning: {warning}")
    conflicts = choice.conflicts + target_conflicts(model, config, shapes)
    if config.unfrozen_parameters:
        conflicts.append("unfrozen_parameters: YAML names modules to train in full, the adapter being continued "
                         "trains its own (its modules_to_save)")
    refuse_if_strict(config, conflicts)
    for conflict in conflicts:
        log(f"warning: {conflict}; the adapter's value is used")
    try:
        peft_model = PeftModel.from_pretrained(model, str(choice.adapter_dir), is_trainable=True)
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise UserError(
            f"lora_model_dir: cannot load the adapter in {choice.adapter_dir} onto base_model "
            f"'{config.base_model}': {str(exc).splitlines()[0]}"
        ) from None
    settings = effective_adapter_settings(peft_model)
    log(f"adapter: continuing r={settings['lora_r']} alpha={settings['lora_alpha']:g} "
        f"dropout={settings['lora_dropout']:g} on {', '.join(settings['lora_target_modules'])} "
        "(the adapter's own settings), trainable")
    return peft_model


def effective_adapter_settings(peft_model) -> dict[str, Any]:
    """The YAML adapter keys with the values the run actually trains with (written to final/axlora.yml)."""
    from peft.tuners.lora import LoraLayer

    lora = peft_model.peft_config[peft_model.active_adapter]
    adapted = {name for name, module in peft_model.base_model.model.named_modules() if isinstance(module, LoraLayer)}
    return {
        "lora_r": lora.r,
        "lora_alpha": lora.lora_alpha,
        "lora_dropout": lora.lora_dropout,
        "peft_use_rslora": lora.use_rslora,
        "lora_target_modules": short_module_names(adapted),
        "lora_target_linear": False,
    }

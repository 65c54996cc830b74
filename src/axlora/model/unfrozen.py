"""``unfrozen_parameters``: base parameters, named by regular expressions as in Axolotl, trained in full beside the
LoRA. They are trained as peft's ``modules_to_save`` copies of the modules that hold them, so the adapter saves
them, plain peft loads them and ``merge-lora`` writes them into the merged model. A pattern must therefore cover
whole modules (every parameter of each module it touches); one that would train part of a module, or a 4-bit
weight, is refused by name.
"""

from __future__ import annotations

import re

from axlora.config.schema import Config
from axlora.core.errors import UserError


def unfrozen_modules(model, config: Config, adapted: set[str]) -> list[str]:
    """The modules whose parameters ``unfrozen_parameters`` names, outermost first; raises on partial matches and
    on modules the LoRA adapts (``adapted``): a module is either trained in full or given a LoRA."""
    patterns = [_compile(pattern) for pattern in config.unfrozen_parameters or []]
    matched = {name for name, _ in model.named_parameters() if any(p.search(name) for p in patterns)}
    for pattern in patterns:
        if not any(pattern.search(name) for name in matched):
            raise UserError(f"unfrozen_parameters: '{pattern.pattern}' matches no parameter of base_model "
                            f"'{config.base_model}' (parameter names look like model.layers.0.mlp.down_proj.weight)")
    chosen: list[str] = []
    for module_name, module in model.named_modules():
        names = [f"{module_name}.{n}" if module_name else n for n, _ in module.named_parameters()]
        inside = any(module_name.startswith(f"{outer}.") for outer in chosen)
        if names and not inside and all(name in matched for name in names):
            _refuse_quantized(module_name, module)
            chosen.append(module_name)
    both = sorted(name for name in chosen if name in adapted or any(a.startswith(f"{name}.") for a in adapted))
    if both:
        raise UserError(f"unfrozen_parameters: {both[0]} is also adapted by the LoRA (lora_target_modules / "
                        "lora_target_linear); train a module in full or give it a LoRA, not both.")
    covered = {name for name in matched if any(name.startswith(f"{module}.") for module in chosen)}
    if covered != matched:
        alone = sorted(matched - covered)[0]
        raise UserError(f"unfrozen_parameters: {alone} would be trained without the rest of its module; name whole "
                        f"modules (e.g. '{alone.rsplit('.', 1)[0]}\\..*'), which are trained and saved as a whole.")
    return chosen


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UserError(f"unfrozen_parameters: '{pattern}' is not a valid regular expression: {exc}") from None


def _refuse_quantized(module_name: str, module) -> None:
    if any(type(p).__name__ in ("Params4bit", "Int8Params") for p in module.parameters()):
        raise UserError(f"unfrozen_parameters: {module_name} is quantized (load_in_4bit / load_in_8bit); a quantized "
                        "weight cannot be trained in full. Unfreeze modules that stay in full precision.")

"""Does an adapter belong to this base model? Its module shapes and base name against the base's.

A mismatched base is refused by name and shape, before peft fails half way through loading with a bare
size error. The checks run twice: from the files on disk (``resolve_adapter``, so ``axlora validate``
refuses it without importing torch), and against the loaded model (``attach_adapter``), which knows
what a Hub or quantized base's files could not tell.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.core.names import ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN, PEFT_PREFIX, is_builtin_model
from axlora.core.safetensors_header import tensor_shapes
from axlora.core.suggest import did_you_mean

_SHOWN_PROBLEMS = 5
# weight-name part -> (factor, on an embedding): lora_A [r, in], lora_B [out, r];
# lora_embedding_A [r, num_embeddings], lora_embedding_B [dim, r]
_LORA_FACTORS = (("lora_A", "A", False), ("lora_B", "B", False),
                 ("lora_embedding_A", "A", True), ("lora_embedding_B", "B", True))


# ---- what the adapter holds, read from its weights file ------------------------------------------------

def adapter_module_shapes(adapter_dir: Path) -> dict[str, dict[str, Any]]:
    """``{module path in the base model: {"A": shape, "B": shape, "embedding": bool}}`` from the weights.

    Reads only the safetensors header (or a ``.bin`` state dict), so a mismatched base is refused by
    name and shape before peft fails half way through loading with a bare size error.
    """
    modules: dict[str, dict[str, Any]] = {}
    for key, shape in _adapter_weight_shapes(adapter_dir).items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for part, factor, embedding in _LORA_FACTORS:
            if f".{part}" in name:
                entry = modules.setdefault(name.split(f".{part}")[0], {"embedding": embedding})
                entry[factor] = shape
    return modules


def _adapter_weight_shapes(adapter_dir: Path) -> dict[str, tuple[int, ...]]:
    safetensors_file = adapter_dir / ADAPTER_WEIGHTS
    if safetensors_file.is_file():
        try:
            return tensor_shapes(safetensors_file)
        except UserError as exc:  # names the file and what is wrong with it
            raise UserError(f"lora_model_dir: {exc}") from None
    return {key: tuple(value.shape) for key, value in _load_bin_weights(adapter_dir).items()}


def _load_bin_weights(adapter_dir: Path) -> dict[str, Any]:
    """An older adapter's ``adapter_model.bin`` state dict; any unreadable file is reported naming it."""
    import torch

    path = adapter_dir / ADAPTER_WEIGHTS_BIN
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a damaged pickle: report it, never a traceback
        raise UserError(f"lora_model_dir: {path}: cannot read the adapter weights ({exc})") from None
    if not isinstance(state, dict):
        raise UserError(f"lora_model_dir: {path}: not a state dict of adapter weights")
    return state


def check_adapter_values(adapter_dir: Path) -> None:
    """Every adapter tensor readable and finite: continuing NaN/inf weights (a run that diverged) only spreads them."""
    import torch

    safetensors_file = adapter_dir / ADAPTER_WEIGHTS
    if safetensors_file.is_file():
        from safetensors import SafetensorError, safe_open

        _adapter_weight_shapes(adapter_dir)  # the header, checked: names what is wrong with a damaged file
        try:
            with safe_open(str(safetensors_file), framework="pt") as handle:
                tensors = ((key, handle.get_tensor(key)) for key in handle.keys())
                bad = next((key for key, value in tensors if value.is_floating_point()
                            and not bool(torch.isfinite(value).all())), None)
        except (SafetensorError, OSError) as exc:
            raise UserError(f"lora_model_dir: {safetensors_file}: cannot read the adapter weights ({exc})") from None
        where = safetensors_file
    else:
        where = adapter_dir / ADAPTER_WEIGHTS_BIN
        bad = next((key for key, value in _load_bin_weights(adapter_dir).items() if torch.is_tensor(value)
                    and value.is_floating_point() and not bool(torch.isfinite(value).all())), None)
    if bad is not None:
        raise UserError(f"lora_model_dir: {where}: tensor {bad} holds NaN/inf; this adapter cannot be continued (its "
                        "run diverged?): continue an earlier checkpoint of it instead")


# ---- does the adapter belong to this base model? -------------------------------------------------------

@dataclass
class BaseModelFacts:
    """What the base model is called and its 2-D weight shapes (``name.weight`` -> [out, in]).

    ``complete`` says whether a weight missing from ``weight_shapes`` means the module does not exist (a
    loaded model) or only that the checkpoint header could not tell (read from disk before loading).
    """

    names: list[str]
    weight_shapes: dict[str, tuple[int, ...]]
    complete: bool


def check_base_model(config: Config, adapter_dir: Path, adapter_config: dict, shapes: dict,
                     base: BaseModelFacts) -> list[str]:
    """Refuse an adapter trained on another base: always when shapes differ, by name unless allowed.

    Returns the warning to print when ``allow_base_mismatch`` lets a differently named base through.
    """
    theirs = adapter_config.get("base_model_name_or_path")
    ours = config.base_model
    problems = shape_problems(shapes, base)
    if problems:
        shown = problems[:_SHOWN_PROBLEMS]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise UserError(
            f"lora_model_dir: the adapter in {adapter_dir} was trained on base model '{theirs}' and does "
            f"not fit base_model '{ours}':\n  " + "\n  ".join(shown) + more
            + f"\nSet base_model: {theirs} (the model the adapter was trained on), or train a fresh LoRA."
        )
    if not theirs or same_base_model(theirs, base.names):
        return []
    if not config.allow_base_mismatch:
        raise UserError(
            f"lora_model_dir: the adapter in {adapter_dir} was trained on base model '{theirs}', but "
            f"base_model is '{ours}'. Set base_model: {theirs}; or, if '{ours}' is the same model under "
            "another name (a copy, a local snapshot), set allow_base_mismatch: true (its module shapes fit)."
        )
    return [f"allow_base_mismatch: the adapter was trained on '{theirs}', base_model is '{ours}'; "
            "module shapes fit, continuing"]


def shape_problems(shapes: dict[str, dict[str, Any]], base: BaseModelFacts) -> list[str]:
    """One line per adapter module the base model lacks, or whose weight has another shape."""
    problems = []
    for module_name, parts in sorted(shapes.items()):
        have = base.weight_shapes.get(f"{module_name}.weight")
        if have is None:
            if base.complete:
                problems.append(f"{module_name}: the adapter adapts it; base_model has no such layer")
            continue
        if "A" not in parts or "B" not in parts:
            continue
        if parts["embedding"]:  # an embedding weight is [num_embeddings, dim]
            needed = (parts["A"][1], parts["B"][0])
        else:  # a linear weight is [out_features, in_features]
            needed = (parts["B"][0], parts["A"][1])
        if tuple(have) != needed:
            problems.append(f"{module_name}: the adapter needs a {list(needed)} weight, base_model has {list(have)}")
    return problems


def loaded_weight_shapes(model) -> dict[str, tuple[int, ...]]:
    """Logical [out, in] weight shapes of the loaded model's layers (quantized weights are stored packed)."""
    shapes = {}
    for name, module in model.named_modules():
        if hasattr(module, "in_features") and hasattr(module, "out_features"):
            shapes[f"{name}.weight"] = (module.out_features, module.in_features)
        elif hasattr(module, "num_embeddings") and hasattr(module, "embedding_dim"):
            shapes[f"{name}.weight"] = (module.num_embeddings, module.embedding_dim)
    return shapes


def base_facts_on_disk(base_model: str) -> BaseModelFacts | None:
    """Name and weight shapes of a local, unquantized base model from its safetensors headers, else None.

    Lets ``resolve_adapter`` (and so ``axlora validate``) refuse a foreign adapter before any model loads;
    anything it cannot read from disk is checked again against the loaded model.
    """
    root = Path(base_model)
    if is_builtin_model(base_model) or not (root / "config.json").is_file():
        return None
    try:
        if "quantization_config" in json.loads((root / "config.json").read_text()):
            return BaseModelFacts(names=[base_model], weight_shapes={}, complete=False)
        index = root / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else ["model.safetensors"] if (root / "model.safetensors").is_file() else []
        shapes: dict[str, tuple[int, ...]] = {}
        for name in files:
            shapes.update(tensor_shapes(root / name))
    except (OSError, ValueError, KeyError, UserError):
        shapes = {}
    return BaseModelFacts(names=[base_model], weight_shapes=shapes, complete=False)


def same_base_model(theirs: str, ours: list[str]) -> bool:
    """Whether the adapter's ``base_model_name_or_path`` names one of ``ours``.

    Equal names, the same directory, or a Hub id and a local snapshot of it (a path ending in
    ``org/name``, or the Hub cache's ``models--org--name``) count as the same model.
    """
    return any(_same_name(theirs, name) or _same_name(name, theirs) for name in ours if name)


def _same_name(a: str, b: str) -> bool:
    if a.rstrip("/") == b.rstrip("/"):
        return True
    path_a, path_b = Path(a).expanduser(), Path(b).expanduser()
    if path_a.exists() and path_b.exists():
        return path_a.resolve() == path_b.resolve()
    hub_id = a.strip("/").split("/")
    if path_a.exists() or path_a.is_absolute() or len(hub_id) != 2:
        return False  # ``a`` is not a Hub id (org/name)
    parts = path_b.parts
    return tuple(parts[-2:]) == tuple(hub_id) or f"models--{hub_id[0]}--{hub_id[1]}" in parts


# ---- which modules: the YAML's targets against the adapter's ------------------------------------------

def target_conflicts(model, config: Config, shapes: dict) -> list[str]:
    """``lora_target_modules`` / ``lora_target_linear`` (set explicitly) that adapt other modules than the adapter."""
    adapted = set(shapes)
    if config.lora_target_linear and "lora_target_linear" in config.model_fields_set:
        key, wanted, said = "lora_target_linear", linear_module_names(model), "True (all linear layers"
    elif config.lora_target_modules and "lora_target_modules" in config.model_fields_set:
        key, wanted = "lora_target_modules", _matching_modules(model, config.lora_target_modules)
        targets = config.lora_target_modules
        said = repr(targets if isinstance(targets, str) else sorted(targets))
    else:
        return []
    if wanted == adapted:
        return []
    if key == "lora_target_linear":
        said += f": {', '.join(short_module_names(wanted))})"
    return [f"{key}: YAML says {said}, the adapter adapts {short_module_names(adapted)!r}"]


def linear_module_names(model) -> set[str]:
    """Every linear layer except the output head: what ``lora_target_linear`` (peft's all-linear) adapts."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head}


def lora_target_module_names(model, config: Config) -> set[str]:
    """The modules a fresh LoRA adapts: every linear layer (lora_target_linear) or those lora_target_modules names."""
    if config.lora_target_linear:
        return linear_module_names(model)
    return _matching_modules(model, config.lora_target_modules or [])


def _matching_modules(model, targets: list[str] | str) -> set[str]:
    if isinstance(targets, str):  # peft: one string is a regular expression the whole module path must match
        return {name for name, _ in model.named_modules() if re.fullmatch(targets, name)}
    return {name for name, _ in model.named_modules() if any(_targets(name, t) for t in targets)}


def _targets(module_name: str, target: str) -> bool:
    """peft's rule for a list of target names: the module path equals the name or ends with ".name"."""
    return module_name == target or module_name.endswith(f".{target}")


def check_targets_exist(model, config: Config) -> None:
    """Every ``lora_target_modules`` entry (or its regular expression) must name some module of the base, and every
    ``lora_target_parameters`` entry some parameter: peft drops the others silently."""
    _check_target_parameters(model, config)
    targets = config.lora_target_modules or []
    if isinstance(targets, str):
        _check_target_pattern(model, config, targets)
        return
    names = [name for name, _ in model.named_modules()]
    missing = [target for target in targets if not any(_targets(name, target) for name in names)]
    if not missing:
        return
    known = short_module_names(set(names) - {""})
    named = ", ".join(f"'{t}'{did_you_mean(t, known, '')}" for t in missing)
    raise UserError(
        f"lora_target_modules: {named} name{'s' if len(missing) == 1 else ''} no module of base_model "
        f"'{config.base_model}'; its linear layers are {', '.join(short_module_names(linear_module_names(model)))}"
    )


def short_module_names(modules: set[str]) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name in modules})


def _check_target_pattern(model, config: Config, pattern: str) -> None:
    try:
        matched = _matching_modules(model, pattern)
    except re.error as exc:
        raise UserError(f"lora_target_modules: '{pattern}' is not a valid regular expression: {exc}") from None
    if not matched:
        raise UserError(
            f"lora_target_modules: the regular expression '{pattern}' matches no module path of base_model "
            f"'{config.base_model}' (the whole path must match, e.g. model.layers.0.self_attn.q_proj)"
        )


def _check_target_parameters(model, config: Config) -> None:
    names = [name for name, _ in model.named_parameters()]
    missing = [t for t in config.lora_target_parameters or [] if not any(_targets(name, t) for name in names)]
    if missing:
        raise UserError(
            f"lora_target_parameters: {', '.join(repr(t) for t in missing)} name no parameter of base_model "
            f"'{config.base_model}' (expert weights are named like mlp.experts.gate_up_proj)"
        )

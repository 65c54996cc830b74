"""Which LoRA to train: continue an existing adapter, or start a fresh one.

``resolve_adapter`` decides from the config and the disk alone (no torch import, so ``validate`` can print
it and refuse a bad ``lora_model_dir`` or a ``strict`` contradiction in a second); ``attach_adapter``
then checks the adapter against the loaded base model and builds the peft model. The decision and its
reason are always printed.

A continued adapter is loaded as peft saved it: its own rank, alpha, dropout and target modules win over
the YAML (the weights only make sense with them). Where the YAML says something else, each key is named
with both values. The adapter's directory is only ever read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.core.layout import RunLayout, is_adapter_dir
from axlora.core.names import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ADAPTER_WEIGHTS_BIN,
    MERGE_MARKER,
    PEFT_PREFIX,
    is_builtin_model,
)
from axlora.core.safetensors_header import tensor_shapes

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
_SHOWN_PROBLEMS = 5
# weight-name part -> (factor, on an embedding): lora_A [r, in], lora_B [out, r];
# lora_embedding_A [r, num_embeddings], lora_embedding_B [dim, r]
_LORA_FACTORS = (("lora_A", "A", False), ("lora_B", "B", False),
                 ("lora_embedding_A", "A", True), ("lora_embedding_B", "B", True))


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


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """``adapter_config.json`` of a LoRA adapter; ``UserError`` naming the file when it is not one."""
    path = adapter_dir / ADAPTER_CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"lora_model_dir: cannot read {path}: {exc}; expected a PEFT adapter_config.json.") from None
    if not isinstance(data, dict):
        raise UserError(f"lora_model_dir: {path} is not a PEFT adapter config (expected a JSON object).")
    kind = str(data.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise UserError(f"lora_model_dir: {path} describes a {kind} adapter; axlora continues LoRA adapters only.")
    return data


def resolve_adapter(config: Config) -> AdapterChoice:
    """Resolve the adapter case from the config and the disk (see the design's "Continuing a LoRA")."""
    if config.lora_model_dir:
        adapter_dir, reason = find_adapter(Path(config.lora_model_dir))
        adapter_config = read_adapter_config(adapter_dir)
        _refuse_writing_over(adapter_dir, Path(config.output_dir))
        conflicts = adapter_setting_conflicts(config, adapter_config)
        _refuse_if_strict(config, conflicts)
        plan = AdapterChoice("continue", reason, adapter_dir, adapter_config, conflicts)
        base = base_facts_on_disk(config.base_model)
        if base is not None and (adapter_dir / ADAPTER_WEIGHTS).is_file():
            check_base_model(config, plan, adapter_module_shapes(adapter_dir), base)
        return plan
    base = Path(config.base_model)
    if (base / MERGE_MARKER).is_file():
        return AdapterChoice("fresh", f"base_model {base} is a merged model; training a fresh LoRA on it")
    return AdapterChoice("fresh", f"new LoRA r={config.lora_r} alpha={config.lora_alpha:g} on {_targets(config)}")


def _refuse_writing_over(adapter_dir: Path, output_dir: Path) -> None:
    """The adapter being continued must stay as it is: this run replaces final/ and checkpoints/."""
    adapter, output = adapter_dir.resolve(), output_dir.resolve()
    if adapter == output or output in adapter.parents:
        raise UserError(
            f"lora_model_dir: {adapter_dir} lies inside output_dir {output_dir}, which this run overwrites "
            "(final/, checkpoints/); set a new output_dir so the adapter being continued stays as it is."
        )


def _refuse_if_strict(config: Config, conflicts: list[str]) -> None:
    if conflicts and config.strict:
        raise UserError(
            "strict: the YAML contradicts the adapter being continued:\n  "
            + "\n  ".join(conflicts)
            + "\nRemove these keys from the YAML (the adapter's own settings are used) or set strict: false."
        )


def _targets(config: Config) -> str:
    if config.lora_target_linear:
        return "all linear layers"
    return ", ".join(config.lora_target_modules or [])


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


def fresh_lora_config(config: Config):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules="all-linear" if config.lora_target_linear else list(config.lora_target_modules or []),
        use_rslora=config.peft_use_rslora,
        **config.peft_kwargs(),
    )


def attach_adapter(model, config: Config, plan: AdapterChoice, log=print):
    """Wrap ``model`` with the planned LoRA; a continued adapter is checked against the base, loaded trainable."""
    from peft import get_peft_model

    log(plan.describe())
    if plan.case == "fresh":
        try:
            return get_peft_model(model, fresh_lora_config(config))
        except ValueError as exc:
            raise UserError(f"lora_target_modules: {exc}") from None
    return _continue_adapter(model, config, plan, log)


def _continue_adapter(model, config: Config, plan: AdapterChoice, log):
    from peft import PeftModel

    assert plan.adapter_dir is not None
    shapes = adapter_module_shapes(plan.adapter_dir)
    base = BaseModelFacts(names=[config.base_model, getattr(model, "name_or_path", "") or ""],
                          weight_shapes=loaded_weight_shapes(model), complete=True)
    for warning in check_base_model(config, plan, shapes, base):
        log(f"warning: {warning}")
    conflicts = plan.conflicts + target_conflicts(model, config, shapes)
    _refuse_if_strict(config, conflicts)
    for conflict in conflicts:
        log(f"warning: {conflict}; the adapter's value is used")
    try:
        peft_model = PeftModel.from_pretrained(model, str(plan.adapter_dir), is_trainable=True)
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise UserError(
            f"lora_model_dir: cannot load the adapter in {plan.adapter_dir} onto base_model "
            f"'{config.base_model}': {str(exc).splitlines()[0]}"
        ) from None
    settings = effective_adapter_settings(peft_model)
    log(f"adapter: continuing r={settings['lora_r']} alpha={settings['lora_alpha']:g} "
        f"dropout={settings['lora_dropout']:g} on {', '.join(settings['lora_target_modules'])} "
        "(the adapter's own settings), trainable")
    return peft_model


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
    try:
        if safetensors_file.is_file():
            return tensor_shapes(safetensors_file)
        import torch

        state = torch.load(adapter_dir / ADAPTER_WEIGHTS_BIN, map_location="cpu", weights_only=True)
        return {key: tuple(value.shape) for key, value in state.items()}
    except Exception as exc:  # any unreadable weights file: report it, never a traceback
        raise UserError(f"lora_model_dir: cannot read the adapter weights in {adapter_dir}: {exc}") from None


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


def check_base_model(config: Config, plan: AdapterChoice, shapes: dict, base: BaseModelFacts) -> list[str]:
    """Refuse an adapter trained on another base: always when shapes differ, by name unless allowed.

    Returns the warning to print when ``allow_base_mismatch`` lets a differently named base through.
    """
    theirs = plan.adapter_config.get("base_model_name_or_path")
    ours = config.base_model
    problems = shape_problems(shapes, base)
    if problems:
        shown = problems[:_SHOWN_PROBLEMS]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise UserError(
            f"lora_model_dir: the adapter in {plan.adapter_dir} was trained on base model '{theirs}' and does "
            f"not fit base_model '{ours}':\n  " + "\n  ".join(shown) + more
            + f"\nSet base_model: {theirs} (the model the adapter was trained on), or train a fresh LoRA."
        )
    if not theirs or same_base_model(theirs, base.names):
        return []
    if not config.allow_base_mismatch:
        raise UserError(
            f"lora_model_dir: the adapter in {plan.adapter_dir} was trained on base model '{theirs}', but "
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
        said = f"{sorted(config.lora_target_modules)!r}"
    else:
        return []
    if wanted == adapted:
        return []
    if key == "lora_target_linear":
        said += f": {', '.join(_short_names(wanted))})"
    return [f"{key}: YAML says {said}, the adapter adapts {_short_names(adapted)!r}"]


def linear_module_names(model) -> set[str]:
    """Every linear layer except the output head: what ``lora_target_linear`` (peft's all-linear) adapts."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head}


def _matching_modules(model, targets: list[str]) -> set[str]:
    # peft's rule for a list of names: the module path equals the name or ends with ".name"
    return {name for name, _ in model.named_modules()
            if any(name == t or name.endswith(f".{t}") for t in targets)}


def _short_names(modules: set[str]) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name in modules})


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
        "lora_target_modules": _short_names(adapted),
        "lora_target_linear": False,
    }

"""The parsed adapter file: a peft LoRA adapter as ``PeftModel.save_pretrained`` saves it (peft 0.21 key layout).

peft strips the adapter name when saving, so a LoRA on ``model.layers.0.self_attn.q_proj`` is stored as
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` / ``...lora_B.weight``. Other keys it writes:

- ``<module>.lora_embedding_A`` / ``lora_embedding_B``: LoRA on an ``nn.Embedding`` (delta is transposed);
- ``<module>.lora_magnitude_vector``: DoRA magnitude;
- ``<module>.lora_B.bias``: ``lora_bias=True``;
- ``<module>.weight`` / ``<module>.bias`` (no ``lora_``): full tensors of ``modules_to_save`` (or trained biases),
  which replace the base tensor; ``<module>.base_layer.weight``: a targeted embedding saved whole
  (``save_embedding_layers``), replacing the base weight before the LoRA delta is added.
- ``<module>.lora_A.weight`` / ``lora_B.weight`` where ``<module>`` holds parameters named by ``target_parameters``
  (fused MoE experts): one LoRA per targeted parameter, the wrappers nested, so every one but the outermost is saved
  as ``<module>.base_layer[.base_layer...].lora_A.weight``; ``param_lora.py`` works out which parameter each adapts;
- with ``save_embedding_layers`` (automatic after a vocabulary resize) a ``modules_to_save`` module is also saved
  as ``<module>.modules_to_save.weight`` (a copy of ``<module>.weight``) and ``<module>.original_module.weight``
  (the untrained weight peft keeps to disable the adapter, not part of the trained model: ignored).

Only the keys actually present are followed, so ``target_modules`` as a list, regex or "all-linear" need no
interpretation here; ``rank_pattern``/``alpha_pattern`` are matched exactly like peft's ``get_pattern_key``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from axlora.core.adapter_config import read_adapter_config
from axlora.core.errors import UserError
from axlora.core.names import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX
from axlora.core.safetensors_header import TensorInfo, read_header
from axlora.merge.safetensors_io import same_bytes

# Features whose merge is not "W + scale * B @ A" (or needs state the adapter file lacks): refuse, never guess.
_UNSUPPORTED_FIELDS = {
    "trainable_token_indices": "trainable token indices",
    "layer_replication": "layer replication",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "BD-LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA), which cannot be merged by design",
    "arrow_config": "Arrow routing",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
    "megatron_config": "Megatron-parallel LoRA layers",
}
WRAPPER = ".base_layer"  # peft's name for the module a LoRA layer wraps
# Initialisations that rewrite the base weights, so the adapter only fits that rewritten base.
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "lora_ga", "loftq")


@dataclass
class LoraModule:
    """The LoRA factors peft saved for one module, plus the scale peft would use for it."""

    module: str
    a: TensorInfo | None = None
    b: TensorInfo | None = None
    embedding: bool = False  # lora_embedding_A/B: the delta lands transposed in the embedding matrix
    magnitude: TensorInfo | None = None  # DoRA
    bias: TensorInfo | None = None  # lora_bias=True
    rank: int = 0
    scale: float = 0.0
    # LoRA on a parameter (peft's target_parameters): rank and scale depend on the expert count, which only the
    # base knows; ``param_lora.py`` resolves it
    parameter: bool = False

    @property
    def weight_name(self) -> str:
        return f"{self.module}.weight"

    @property
    def bias_name(self) -> str:
        return f"{self.module}.bias"


@dataclass
class Adapter:
    """A parsed adapter: LoRA modules by module name and whole-tensor replacements by base tensor name."""

    directory: Path
    weights: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule] = field(default_factory=dict)
    replacements: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))


def load_adapter(directory: Path) -> Adapter:
    """Parse and validate an adapter directory; every refusal happens here, before any output is written."""
    directory = Path(directory)
    config = _read_adapter_config(directory)
    _refuse_unsupported(directory, config)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        hint = " (found adapter_model.bin: re-save it with safe_serialization=True)" if (
            directory / "adapter_model.bin").exists() else ""
        raise UserError(f"{weights}: missing; expected the adapter weights saved by PeftModel.save_pretrained{hint}")
    adapter = Adapter(directory, weights, config)
    infos, _ = read_header(weights)
    copies: list[TensorInfo] = []
    for info in infos:
        _add_key(adapter, info, copies)
    for copy in copies:
        _add_copy(adapter, copy)
    for lora in adapter.modules.values():
        _finish_module(adapter, lora)
    if not adapter.modules and not adapter.replacements:
        raise UserError(f"{weights}: holds no LoRA weights")
    return adapter


def _read_adapter_config(directory: Path) -> dict[str, Any]:
    """The adapter's config (shared reader), after a clearer message for a directory that is not there."""
    if not directory.is_dir():
        raise UserError(f"{directory}: adapter directory not found (expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    return read_adapter_config(directory)


def _refuse_unsupported(directory: Path, config: dict[str, Any]) -> None:
    """Stop on adapter kinds whose merged weights this code would get wrong."""
    path = directory / ADAPTER_CONFIG
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise UserError(f"{path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters (peft_type LORA) can be merged")
    for key, what in _UNSUPPORTED_FIELDS.items():
        if config.get(key):
            raise UserError(f"{path}: {key} is set; merging adapters that use {what} is not supported")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise UserError(
            f"{path}: init_lora_weights={init!r} rewrites the base weights at initialisation, so this adapter only "
            "fits that rewritten base. Save it with peft's path_initial_model_for_weight_conversion to turn it into "
            "a plain LoRA adapter, then merge that.")


def _module_of(adapter: Adapter, module: str) -> LoraModule:
    return adapter.modules.setdefault(module, LoraModule(module))


def _add_key(adapter: Adapter, info: TensorInfo, copies: list[TensorInfo]) -> None:
    """Sort one saved key into LoRA factors or a whole-tensor replacement (``modules_to_save`` copies aside)."""
    key = info.name
    if not key.startswith(PEFT_PREFIX):
        raise UserError(f"{adapter.weights}: key {key!r} does not start with {PEFT_PREFIX!r}; "
                        "expected an adapter saved by PeftModel.save_pretrained")
    name = key[len(PEFT_PREFIX):]
    suffixes = {
        ".lora_A.weight": "a", ".lora_B.weight": "b", ".lora_embedding_A": "ea", ".lora_embedding_B": "eb",
        ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude", ".lora_B.bias": "bias",
    }
    for suffix, role in suffixes.items():
        if name.endswith(suffix):
            lora = _module_of(adapter, name[: -len(suffix)])
            if role in ("ea", "eb"):
                lora.embedding = True
                role = role[1]
            setattr(lora, role, info)
            return
    if ".lora_" in name or ".token_adapter." in name:
        raise UserError(f"{adapter.weights}: key {key!r} is a peft weight this merge does not know how to apply")
    if ".original_module." in name:
        return
    if ".modules_to_save." in name:
        copies.append(info)
        return
    _add_replacement(adapter, name.replace(".base_layer.", "."), info)


def _add_replacement(adapter: Adapter, target: str, info: TensorInfo) -> None:
    if target in adapter.replacements:
        raise UserError(f"{adapter.weights}: two keys replace the same tensor {target!r} "
                        f"({adapter.replacements[target].name!r} and {info.name!r})")
    adapter.replacements[target] = info


def _add_copy(adapter: Adapter, copy: TensorInfo) -> None:
    """``<m>.modules_to_save.weight`` stands for ``<m>.weight``; when both were saved they must be identical."""
    target = copy.name[len(PEFT_PREFIX):].replace(".modules_to_save.", ".")
    saved = adapter.replacements.get(target)
    if saved is None or saved.name != PEFT_PREFIX + target:
        _add_replacement(adapter, target, copy)
        return
    if saved.dtype != copy.dtype or saved.shape != copy.shape or not same_bytes(saved, copy):
        raise UserError(f"{adapter.weights}: {saved.name!r} and {copy.name!r} are two saves of the same trained "
                        "module but hold different values; the adapter file is inconsistent")


def _finish_module(adapter: Adapter, lora: LoraModule) -> None:
    """Check the factors fit together and compute the scale peft uses for this module."""
    where = f"{adapter.weights}: module {lora.module!r}"
    if lora.a is None or lora.b is None:
        raise UserError(f"{where} lacks its {'lora_A' if lora.a is None else 'lora_B'} weight; the adapter is incomplete")
    if len(lora.a.shape) != 2 or len(lora.b.shape) != 2:
        raise UserError(f"{where}: lora_A {list(lora.a.shape)} / lora_B {list(lora.b.shape)} are not matrices; "
                        "only LoRA on linear and embedding layers can be merged (not convolutions)")
    rank = lora.a.shape[0]
    if lora.b.shape[1] != rank:
        raise UserError(f"{where}: lora_A has {rank} rows but lora_B has {lora.b.shape[1]} columns")
    if lora.magnitude is not None and lora.embedding:
        raise UserError(f"{where}: DoRA on embedding layers is not supported yet")
    if hosts_target_parameter(adapter.config, lora.module):
        lora.parameter = True
        return
    lora.rank = rank
    lora.scale = lora_scale(adapter, lora.module, rank)


def strip_wrappers(module: str) -> str:
    """The module a (possibly nested) parameter LoRA wraps: peft nests one ``base_layer`` per extra parameter."""
    while module.endswith(WRAPPER):
        module = module[: -len(WRAPPER)]
    return module


def target_parameter_names(config: dict[str, Any], host: str) -> list[str]:
    """The parameters of module ``host`` that ``target_parameters`` names, matched as peft matches them."""
    names = []
    for target in config.get("target_parameters") or []:
        owner, _, param = str(target).rpartition(".")
        if not owner or host == owner or host.endswith(f".{owner}"):
            names.append(param)
    return list(dict.fromkeys(names))


def hosts_target_parameter(config: dict[str, Any], module: str) -> bool:
    return bool(target_parameter_names(config, strip_wrappers(module)))


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's ``get_pattern_key``: the first pattern that matches the end of the module name wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scale(adapter: Adapter, module: str, saved_rank: int) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA, with r and alpha taken from the patterns when they match."""
    cfg = adapter.config
    rank = int(_pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8)))
    alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8)))
    if rank != saved_rank:
        raise UserError(f"{adapter.directory / ADAPTER_CONFIG}: gives rank {rank} for {module!r} but the saved "
                        f"lora_A has rank {saved_rank}; config and weights do not belong together")
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank

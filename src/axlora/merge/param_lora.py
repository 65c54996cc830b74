"""LoRA on parameters (peft's ``target_parameters``, fused MoE experts): which parameter each LoRA adapts and
which part of its delta lands in which stored tensor.

peft 0.21's ``lora.ParamWrapper`` on a parameter ``W`` of shape (experts, d1, d2) (or (d1, d2): one expert)
keeps lora_A (r*experts x in) and lora_B (out x r*experts). Expert e's factors are lora_A's rows e*r ..
(e+1)*r - 1 and lora_B's columns e, e + experts, e + 2*experts, ... (peft reshapes B as out x r x experts);
its delta ``scale * B_e @ A_e`` (out x in) is added to ``W[e]`` as it is when the module stores (experts, out, in),
and transposed when the experts module is marked ``is_transposed`` and stores (experts, in, out) (gpt-oss). A
2-D parameter is one expert, never transposed. peft refuses fan_in_fan_out, dropout, DoRA and lora_bias here.

The adapter file does not name the parameter a LoRA adapts: peft nests one wrapper per targeted parameter of a
module and saves the inner ones under ``base_layer``. The shapes tell: each LoRA fits exactly one targeted
parameter of its module, or the merge refuses to guess.
"""

from __future__ import annotations

from dataclasses import dataclass

from axlora.core.errors import UserError
from axlora.merge.base import BaseModel
from axlora.merge.expert_layout import StoredParameter, locate_parameter
from axlora.merge.lora_weights import Adapter, LoraModule, lora_scale, strip_wrappers, target_parameter_names
from axlora.merge.safetensors_io import FLOAT_CODES

# Model types whose fused experts transformers marks ``is_transposed`` (stored experts x in x out), which peft
# follows; only needed when a parameter is square, since otherwise the LoRA's shapes tell the orientation.
TRANSPOSED_EXPERT_MODELS = frozenset({"gpt_oss", "aria", "aria_text", "openai_privacy_filter"})


@dataclass(frozen=True)
class ExpertDelta:
    """The part of a parameter LoRA's delta one stored tensor receives.

    ``expert`` None: the tensor is the whole (experts, ...) parameter; otherwise it is rows ``rows`` of that
    expert's (out x in) matrix (a per-expert checkpoint tensor, or a 2-D parameter).
    """

    lora: LoraModule
    num_experts: int
    expert: int | None
    rows: tuple[int, int]
    transposed: bool = False


@dataclass(frozen=True)
class _Fit:
    num_experts: int
    out_features: int
    transposed: bool


def parameter_deltas(base: BaseModel, adapter: Adapter) -> dict[str, ExpertDelta]:
    """The ``ExpertDelta`` of every stored tensor of every adapted parameter, by base tensor name (headers only)."""
    deltas: dict[str, ExpertDelta] = {}
    hosts: dict[str, list[LoraModule]] = {}
    for lora in adapter.modules.values():
        if lora.parameter and not _settled_as_ordinary(base, adapter, lora):
            hosts.setdefault(strip_wrappers(lora.module), []).append(lora)
    for host, loras in hosts.items():
        stored = {name: locate_parameter(base, f"{host}.{name}") for name in target_parameter_names(adapter.config, host)}
        claimed: dict[str, str] = {}
        for lora in loras:
            name, fit = _parameter_of(base, adapter, host, lora, stored)
            if name in claimed:
                raise UserError(f"{adapter.weights}: LoRAs {claimed[name]!r} and {lora.module!r} both fit "
                                f"parameter {host}.{name}; cannot tell which adapts it")
            claimed[name] = lora.module
            _set_scale(adapter, lora, f"{host}.{name}", fit)
            for tensor, delta in _deltas(lora, stored[name], fit):
                _check_float(base, adapter, tensor, delta)
                deltas[tensor] = delta
    return deltas


def _settled_as_ordinary(base: BaseModel, adapter: Adapter, lora: LoraModule) -> bool:
    """A target_parameters name without a module path ("gate_up_proj") names that parameter in any module: a LoRA
    (not nested) on a module with none of the named parameters is an ordinary ``target_modules`` LoRA after all."""
    assert lora.a is not None
    if lora.module != strip_wrappers(lora.module) or any(
            locate_parameter(base, f"{lora.module}.{name}") for name in target_parameter_names(adapter.config, lora.module)):
        return False
    lora.parameter = False
    lora.rank = lora.a.shape[0]
    lora.scale = lora_scale(adapter, lora.module, lora.rank)
    return True


def _parameter_of(base: BaseModel, adapter: Adapter, host: str, lora: LoraModule,
                  stored: dict[str, StoredParameter | None]) -> tuple[str, _Fit]:
    """The one targeted parameter of ``host`` whose shape this LoRA fits."""
    assert lora.a is not None and lora.b is not None
    fits = {name: fit for name, param in stored.items() if param is not None and (fit := _fit(base, lora, param))}
    if len(fits) == 1:
        return next(iter(fits.items()))
    factors = f"lora_A {list(lora.a.shape)}, lora_B {list(lora.b.shape)}"
    if fits:
        raise UserError(f"{adapter.weights}: LoRA {lora.module!r} ({factors}) fits parameters "
                        f"{', '.join(f'{host}.{n}' for n in fits)} alike; cannot tell which one it adapts")
    found = "; ".join(f"{host}.{n}: {list(p.shape)}" if p else f"{host}.{n}: not in the base"
                      for n, p in stored.items()) or "none"
    raise UserError(f"{adapter.weights}: LoRA {lora.module!r} ({factors}) fits no parameter that target_parameters "
                    f"names in module {host!r} ({found}); the adapter does not fit this base model")


def _fit(base: BaseModel, lora: LoraModule, param: StoredParameter) -> _Fit | None:
    """How the LoRA's factors fit ``param`` as peft shapes them, or None if they cannot."""
    assert lora.a is not None and lora.b is not None
    shape = param.shape
    if len(shape) == 2:
        experts, layouts = 1, [(shape[0], shape[1], False)]
    elif len(shape) == 3:
        experts, layouts = shape[0], [(shape[1], shape[2], False)]
        if param.whole is not None:  # a per-expert checkpoint is always (out x in) per expert
            layouts.append((shape[2], shape[1], True))
    else:
        return None
    rows, in_features = lora.a.shape
    out_features = lora.b.shape[0]
    if rows % experts or lora.b.shape[1] != rows:
        return None
    matching = [transposed for out, inp, transposed in layouts if (out, inp) == (out_features, in_features)]
    if not matching:
        return None
    transposed = matching[0] if len(matching) == 1 else _transposed_experts(base)
    return _Fit(experts, out_features, transposed)


def _transposed_experts(base: BaseModel) -> bool:
    text = base.config.get("text_config")
    types = {base.config.get("model_type"), text.get("model_type") if isinstance(text, dict) else None}
    return bool(types & TRANSPOSED_EXPERT_MODELS)


def _set_scale(adapter: Adapter, lora: LoraModule, parameter: str, fit: _Fit) -> None:
    """The rank is lora_A's rows per expert; peft matches rank and alpha patterns against the parameter's name."""
    assert lora.a is not None
    lora.rank = lora.a.shape[0] // fit.num_experts
    lora.scale = lora_scale(adapter, parameter, lora.rank)


def _deltas(lora: LoraModule, param: StoredParameter | None, fit: _Fit) -> list[tuple[str, ExpertDelta]]:
    assert param is not None  # only located parameters fit
    if param.whole is not None:
        expert = None if len(param.whole.shape) == 3 else 0
        return [(param.whole.name, ExpertDelta(lora, fit.num_experts, expert, (0, fit.out_features), fit.transposed))]
    return [(piece.info.name, ExpertDelta(lora, fit.num_experts, piece.expert, piece.rows)) for piece in param.pieces]


def _check_float(base: BaseModel, adapter: Adapter, tensor: str, delta: ExpertDelta) -> None:
    dtype = base.tensors[tensor].dtype
    if dtype not in FLOAT_CODES:
        raise UserError(f"{adapter.weights}: LoRA {delta.lora.module!r} adapts {tensor!r}, which {base.directory} "
                        f"stores as {dtype}, not floating point (a quantized base?)")

"""The LoRA of linearized Llama 4 experts (``llama4_linearized_experts``) read and written in the fused layout.

Training adapts each expert's ``gate_projs.e``, ``up_projs.e`` and ``down_projs.e`` linear layer with its own rank-r
LoRA. The same update is a LoRA on the fused parameters of transformers' standard model, which is what peft's
``target_parameters`` stores (one factor pair per expert):

* ``down_proj[e]`` (intermediate x hidden) is ``down_projs.e.weight`` transposed, so its delta is ``A.T @ B.T`` of
  the expert's down LoRA: the same rank r, with the factors transposed and swapped;
* ``gate_up_proj[e]`` (hidden x 2*intermediate) is ``[gate.T | up.T]``, so its delta is
  ``[A_gate.T | A_up.T] @ blockdiag(B_gate.T, B_up.T)``: rank r per adapted projection (2r with both), and a
  correspondingly larger alpha so alpha/r (or alpha/sqrt(r)) stays the scale.

Both directions are exact. The run's adapter (``final/`` and every checkpoint) is written in the fused layout with an
``adapter_config.json`` naming ``target_parameters`` as for the standard model, so a plain
``PeftModel.from_pretrained`` on the standard transformers Llama 4 computes what the trained model computed; a hook
on each linearized experts module takes the fused factors back when a checkpoint is restored (``resume``). In memory
(``state_dict``, the best adapter of early stopping) the LoRA keeps its per-expert layout.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from axlora.core.errors import UserError
from axlora.core.names import ADAPTER_WEIGHTS
from axlora.model.llama4_experts import PROJECTIONS, LinearizedLlama4Experts

GATE_UP, DOWN = "gate_up_proj", "down_proj"
FUSED_PARENT = "feed_forward.experts"
_LORA_KEY = re.compile(r"^(?P<proj>gate_projs|up_projs|down_projs)\.(?P<expert>\d+)\.lora_(?P<ab>[AB])"
                       r"(?:\.(?P<adapter>[^.]+))?\.weight$")


@dataclass(frozen=True)
class FusedLayout:
    """Which fused parameters carry the experts' LoRA, and the blocks of ``gate_up_proj``'s factors."""

    gate_up_blocks: tuple[str, ...]  # "gate_projs" and/or "up_projs", in that order
    down: bool
    rank: int

    def fused_names(self) -> list[str]:
        """The fused parameters in the order peft nests their wrappers (definition order: gate_up_proj first)."""
        return [name for name, on in ((GATE_UP, bool(self.gate_up_blocks)), (DOWN, self.down)) if on]

    def wrapper_path(self, fused: str) -> str:
        """Where peft keeps this parameter's LoRA below the experts module: the first one wrapped is innermost."""
        names = self.fused_names()
        return "base_layer." * (len(names) - 1 - names.index(fused))


def use_fused_adapter_layout(peft_model, log: Callable[[str], None]) -> FusedLayout | None:
    """Save the experts' LoRA of ``peft_model`` in the standard model's fused layout (and restore it from there)."""
    experts = _linearized_modules(peft_model)
    adapted = {match["proj"] for module in experts.values() for name, _ in module.named_parameters()
               if (match := _LORA_KEY.match(name))}
    if not adapted:
        return None
    lora = peft_model.peft_config[peft_model.active_adapter]
    if lora.use_dora or lora.lora_bias or lora.fan_in_fan_out:
        raise UserError("llama4_linearized_experts: LoRA on the linearized experts is saved as peft's "
                        "target_parameters, which takes plain LoRA only: turn off peft_use_dora / "
                        "lora_fan_in_fan_out, or do not adapt the experts.")
    layout = FusedLayout(tuple(p for p in PROJECTIONS[:2] if p in adapted), "down_projs" in adapted, lora.r)
    for module in experts.values():
        module._register_load_state_dict_pre_hook(_loading_hook(layout), with_module=True)
    # the one way into the adapter files: the training recipe saves final/ and checkpoints with save_pretrained
    peft_model.save_pretrained = lambda directory, **_options: save_fused_adapter(peft_model, layout, directory)
    log(f"adapter: LoRA on the linearized experts ({', '.join(sorted(adapted))}) is saved on the fused "
        f"{' and '.join(layout.fused_names())} of the standard Llama 4 model (peft's target_parameters)")
    return layout


def _linearized_modules(peft_model) -> dict[str, LinearizedLlama4Experts]:
    """The linearized experts by their path in the peft model's state dict (``base_model.model.model.layers...``)."""
    return {name: module for name, module in peft_model.named_modules() if isinstance(module, LinearizedLlama4Experts)}


def save_fused_adapter(peft_model, layout: FusedLayout, directory) -> None:
    """``adapter_model.safetensors`` and ``adapter_config.json`` as peft writes them for the standard model."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = dict(get_peft_model_state_dict(peft_model))
    for path, module in _linearized_modules(peft_model).items():
        factors = _pop_expert_factors(state, f"{path}.").get(None)
        if not factors:
            continue
        for fused, (lora_a, lora_b) in fused_factors(module, layout, factors).items():
            state[f"{path}.{layout.wrapper_path(fused)}lora_A.weight"] = lora_a
            state[f"{path}.{layout.wrapper_path(fused)}lora_B.weight"] = lora_b
    Path(directory).mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in state.items()}, str(Path(directory) / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    standard_config(peft_model, layout).save_pretrained(str(directory))


def standard_config(peft_model, layout: FusedLayout):
    """The adapter config as for the standard model: the other adapted modules by path, the experts' LoRA as
    target_parameters with the rank and alpha of the fused factors, and no dropout, which target_parameters cannot
    take (and which changes nothing once trained)."""
    from peft.tuners.lora import LoraLayer

    lora = copy.deepcopy(peft_model.peft_config[peft_model.active_adapter])
    inner = peft_model.base_model.model
    linearized = [name for name, module in inner.named_modules() if isinstance(module, LinearizedLlama4Experts)]
    lora.target_modules = sorted(
        name for name, module in inner.named_modules()
        if isinstance(module, LoraLayer) and not any(name.startswith(prefix + ".") for prefix in linearized)
    )
    lora.target_parameters = [f"{FUSED_PARENT}.{name}" for name in layout.fused_names()]
    if len(layout.gate_up_blocks) > 1:
        grow = len(layout.gate_up_blocks)
        key = f"{FUSED_PARENT}.{GATE_UP}"
        lora.rank_pattern = {**(lora.rank_pattern or {}), key: lora.r * grow}
        scale = math.sqrt(grow) if lora.use_rslora else grow
        lora.alpha_pattern = {**(lora.alpha_pattern or {}), key: lora.lora_alpha * scale}
    lora.lora_dropout = 0.0
    return lora


def _pop_expert_factors(state_dict, prefix: str) -> dict[str | None, dict[tuple[str, int, str], torch.Tensor]]:
    """Remove the per-expert LoRA tensors under ``prefix``: adapter (None: no adapter name in the keys) ->
    (projection, expert, A|B) -> weight."""
    found: dict[str | None, dict[tuple[str, int, str], torch.Tensor]] = {}
    for key in [k for k in state_dict if k.startswith(prefix)]:
        match = _LORA_KEY.match(key[len(prefix):])
        if match:
            found.setdefault(match["adapter"], {})[(match["proj"], int(match["expert"]), match["ab"])] = \
                state_dict.pop(key)
    return found


def fused_factors(module: LinearizedLlama4Experts, layout: FusedLayout, factors) -> dict[str, tuple]:
    """peft's (lora_A, lora_B) of each fused parameter from the per-expert factors (zeros where none was adapted).

    peft stores a stack's factors as lora_A (rank*experts, in) and lora_B (out, rank*experts), expert e's being rows
    e*rank... of A and columns rank_index*experts + e of B; for these parameters "in" is the last dimension.
    """
    experts, rank = module.num_experts, layout.rank
    reference = next(iter(factors.values()))
    zeros = {"dtype": reference.dtype, "device": reference.device}
    hidden, size = module.hidden_size, module.intermediate_size
    fused = {}
    if layout.gate_up_blocks:
        blocks = len(layout.gate_up_blocks)
        lora_a = torch.zeros(experts, blocks * rank, 2 * size, **zeros)
        lora_b = torch.zeros(hidden, blocks * rank, experts, **zeros)
        for block, projection in enumerate(layout.gate_up_blocks):
            columns = slice(0, size) if projection == "gate_projs" else slice(size, 2 * size)
            rows = slice(block * rank, (block + 1) * rank)
            for e in range(experts):
                if (projection, e, "A") in factors:
                    lora_a[e, rows, columns] = factors[(projection, e, "B")].t()
                    lora_b[:, rows, e] = factors[(projection, e, "A")].t()
        fused[GATE_UP] = (lora_a.reshape(experts * blocks * rank, 2 * size), lora_b.reshape(hidden, -1))
    if layout.down:
        lora_a = torch.zeros(experts, rank, hidden, **zeros)
        lora_b = torch.zeros(size, rank, experts, **zeros)
        for e in range(experts):
            if ("down_projs", e, "A") in factors:
                lora_a[e] = factors[("down_projs", e, "B")].t()
                lora_b[:, :, e] = factors[("down_projs", e, "A")].t()
        fused[DOWN] = (lora_a.reshape(experts * rank, hidden), lora_b.reshape(size, -1))
    return fused


def _loading_hook(layout: FusedLayout):
    """Fused-layout factors in a state dict being loaded become the per-expert ones. peft inserts the adapter name
    only into keys of its own layers, so the fused keys arrive without one: they are the experts' only adapter's."""

    def hook(module, state_dict, prefix, *_args):
        adapters = {match["adapter"] for name, _ in module.named_parameters() if (match := _LORA_KEY.match(name))}
        for fused in layout.fused_names():
            path = prefix + layout.wrapper_path(fused)
            if f"{path}lora_A.weight" not in state_dict or len(adapters) != 1:
                continue
            lora_a, lora_b = state_dict.pop(f"{path}lora_A.weight"), state_dict.pop(f"{path}lora_B.weight")
            adapter = next(iter(adapters))
            for (projection, e, ab), value in split_factors(module, layout, fused, lora_a, lora_b).items():
                state_dict[f"{prefix}{projection}.{e}.lora_{ab}.{adapter}.weight"] = value

    return hook


def split_factors(module: LinearizedLlama4Experts, layout: FusedLayout, fused: str, lora_a, lora_b) -> dict:
    """The inverse of ``fused_factors`` for one fused parameter: (projection, expert, A|B) -> weight."""
    experts, rank, size = module.num_experts, layout.rank, module.intermediate_size
    out = {}
    if fused == GATE_UP:
        lora_a = lora_a.reshape(experts, -1, 2 * size)
        lora_b = lora_b.reshape(lora_b.shape[0], -1, experts)
        for block, projection in enumerate(layout.gate_up_blocks):
            columns = slice(0, size) if projection == "gate_projs" else slice(size, 2 * size)
            rows = slice(block * rank, (block + 1) * rank)
            for e in range(experts):
                out[(projection, e, "B")] = lora_a[e, rows, columns].t().contiguous()
                out[(projection, e, "A")] = lora_b[:, rows, e].t().contiguous()
    else:
        lora_a = lora_a.reshape(experts, rank, -1)
        lora_b = lora_b.reshape(lora_b.shape[0], rank, experts)
        for e in range(experts):
            out[("down_projs", e, "B")] = lora_a[e].t().contiguous()
            out[("down_projs", e, "A")] = lora_b[:, :, e].t().contiguous()
    return out

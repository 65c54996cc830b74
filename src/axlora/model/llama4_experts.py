"""``llama4_linearized_experts``: Llama 4's routed experts as one linear layer per expert and projection.

transformers stores a Llama 4 MoE layer's experts as two fused 3-D parameters (``gate_up_proj``: experts x hidden x
2*intermediate, ``down_proj``: experts x intermediate x hidden), which neither ``lora_target_modules`` nor
bitsandbytes' layer swap can reach. As in Axolotl, the experts module is replaced by ``gate_projs``, ``up_projs`` and
``down_projs``: a ``ModuleList`` of ``nn.Linear`` each (``feed_forward.experts.gate_projs.3`` is expert 3's gate), so
ordinary target names (``experts.gate_projs.[0-9]+$``) adapt them and a 4-bit or 8-bit base quantizes them like every
other linear layer. The replacement computes exactly what the fused experts compute.

A standard checkpoint is loaded as it is and its fused weights are split after loading; a checkpoint saved in the
linearized layout (Axolotl's Llama 4 copies, some pre-quantized) is loaded into a model built linearized from the start
(``model.llama4_checkpoint``). The LoRA of the linearized experts is saved in
the fused layout (``model.llama4_adapter_layout``), so the adapter loads with plain peft on the standard model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from axlora.core.errors import UserError

PROJECTIONS = ("gate_projs", "up_projs", "down_projs")
"""The per-expert linear layers of a linearized experts module, in the order Axolotl names them."""


class LinearizedLlama4Experts(nn.Module):
    """Llama 4's routed experts with one ``nn.Linear`` (or bitsandbytes layer) per expert and projection."""

    def __init__(self, gate_projs: nn.ModuleList, up_projs: nn.ModuleList, down_projs: nn.ModuleList, act_fn,
                 hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_projs, self.up_projs, self.down_projs = gate_projs, up_projs, down_projs
        self.act_fn = act_fn
        self.num_experts = len(gate_projs)
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size

    @classmethod
    def from_config(cls, config) -> LinearizedLlama4Experts:
        """The experts of one MoE layer of a ``Llama4TextConfig``, built in the linearized layout (weights to load)."""
        from transformers.activations import ACT2FN

        hidden, size, count = config.hidden_size, config.intermediate_size, config.num_local_experts
        return cls(nn.ModuleList(nn.Linear(hidden, size, bias=False) for _ in range(count)),
                   nn.ModuleList(nn.Linear(hidden, size, bias=False) for _ in range(count)),
                   nn.ModuleList(nn.Linear(size, hidden, bias=False) for _ in range(count)),
                   ACT2FN[config.hidden_act], hidden, size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Same contract as transformers' ``Llama4TextExperts``: the rows arrive grouped by expert, equally many each."""
        grouped = hidden_states.view(self.num_experts, -1, self.hidden_size)
        outputs = [
            self.down_projs[index](self.up_projs[index](rows) * self.act_fn(self.gate_projs[index](rows)))
            for index, rows in enumerate(grouped)
        ]
        return torch.stack(outputs).view(-1, self.hidden_size)


def linearize_llama4_experts(model, log: Callable[[str], None]) -> int:
    """Replace every fused Llama 4 experts module of ``model`` in place; returns how many layers are linearized
    (those loaded linearized from the checkpoint included)."""
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    make_linear = _linear_factory(model)
    fused = [(name, module) for name, module in model.named_modules() if isinstance(module, Llama4TextExperts)]
    loaded = [module for module in model.modules() if isinstance(module, LinearizedLlama4Experts)]
    if not fused and not loaded:
        raise UserError("llama4_linearized_experts: base_model has no Llama 4 fused experts (transformers' "
                        "Llama4TextExperts) to linearize; the key is for Llama 4 MoE models: remove it.")
    for name, experts in fused:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, _linearized(experts, make_linear))
    kind = getattr(make_linear, "kind", "full precision")
    experts = fused[0][1].num_experts if fused else loaded[0].num_experts
    how = "linearized" if fused else "loaded linearized as the checkpoint stores them"
    log(f"model: Llama 4 experts {how} ({len(fused) + len(loaded)} layers x {experts} experts x 3 "
        f"linear layers, {kind}; llama4_linearized_experts)")
    return len(fused) + len(loaded)


def _linearized(experts, make_linear) -> LinearizedLlama4Experts:
    """The per-expert layers of one fused module: gate_up_proj[e] is [gate | up] as (hidden, 2*intermediate)."""
    size = experts.expert_dim
    with torch.no_grad():
        gate_up, down = experts.gate_up_proj, experts.down_proj
        gate_projs = nn.ModuleList(make_linear(gate_up[e, :, :size].t()) for e in range(experts.num_experts))
        up_projs = nn.ModuleList(make_linear(gate_up[e, :, size:].t()) for e in range(experts.num_experts))
        down_projs = nn.ModuleList(make_linear(down[e].t()) for e in range(experts.num_experts))
    return LinearizedLlama4Experts(gate_projs, up_projs, down_projs, experts.act_fn, experts.hidden_size, size)


def _linear_factory(model) -> Callable[[torch.Tensor], nn.Module]:
    """A function making a frozen linear layer from an (out, in) weight: quantized as the base model's other linear
    layers when it was loaded with bitsandbytes, else a plain ``nn.Linear``."""
    quantizer = getattr(model, "hf_quantizer", None)
    settings = getattr(quantizer, "quantization_config", None)
    if getattr(settings, "load_in_4bit", False):
        return _four_bit_factory(settings)
    if getattr(settings, "load_in_8bit", False):
        return _eight_bit_factory()

    def plain(weight: torch.Tensor) -> nn.Module:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        layer.weight = nn.Parameter(weight.contiguous())
        return layer

    return plain


def _four_bit_factory(settings) -> Callable[[torch.Tensor], nn.Module]:
    import bitsandbytes as bnb

    def four_bit(weight: torch.Tensor) -> nn.Module:
        layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False,
                                  compute_dtype=settings.bnb_4bit_compute_dtype,
                                  compress_statistics=settings.bnb_4bit_use_double_quant,
                                  quant_type=settings.bnb_4bit_quant_type,
                                  quant_storage=settings.bnb_4bit_quant_storage, device="meta")
        packed = bnb.nn.Params4bit(weight.contiguous(), requires_grad=False,
                                   compress_statistics=settings.bnb_4bit_use_double_quant,
                                   quant_type=settings.bnb_4bit_quant_type,
                                   quant_storage=settings.bnb_4bit_quant_storage)
        layer.weight = packed.to(weight.device)  # bitsandbytes quantizes on the move to a device
        return layer

    four_bit.kind = f"4-bit {settings.bnb_4bit_quant_type.upper()}"
    return four_bit


def _eight_bit_factory() -> Callable[[torch.Tensor], nn.Module]:
    import bitsandbytes as bnb

    def eight_bit(weight: torch.Tensor) -> nn.Module:
        layer = bnb.nn.Linear8bitLt(weight.shape[1], weight.shape[0], bias=False, has_fp16_weights=False,
                                    device="meta")
        layer.weight = bnb.nn.Int8Params(weight.contiguous(), requires_grad=False,
                                         has_fp16_weights=False).to(weight.device)
        return layer

    eight_bit.kind = "8-bit"
    return eight_bit

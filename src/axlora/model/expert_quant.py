"""``quantize_moe_experts``: fused MoE expert weights (3-D parameters, which bitsandbytes' layer swap leaves in full
precision) stored in 4-bit NF4, as the rest of a QLoRA base.

Each expert tensor is packed with bitsandbytes and put back behind a parametrization that dequantizes it when the
experts read it, so the model code runs unchanged and only the frozen storage shrinks (about 4x against bf16).
Imported only when the key is set: it needs torch and bitsandbytes.
"""

from __future__ import annotations

from collections.abc import Callable

import bitsandbytes.functional as bnb
import torch
from torch.nn.utils import parametrize

from axlora.core.errors import UserError


class Nf4Dequantize(torch.nn.Module):
    """The parametrization: a packed expert tensor read back in its original shape and dtype."""

    def __init__(self, state, shape: tuple[int, ...], dtype: torch.dtype):
        super().__init__()
        self.state, self.shape, self.dtype = state, shape, dtype

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        return bnb.dequantize_4bit(packed, self.state).reshape(self.shape).to(self.dtype)


def quantize_moe_experts(model, log: Callable[[str], None]) -> None:
    """Pack every 3-D parameter of the model's ``experts`` modules in NF4 (double-quantized absmax, as QLoRA)."""
    before = after = 0
    for module_name, module in list(model.named_modules()):
        if not module_name.endswith("experts"):
            continue
        for name, weight in list(module.named_parameters(recurse=False)):
            if weight.dim() != 3:
                continue
            flat = weight.detach().reshape(-1, weight.shape[-1]).contiguous()
            packed, state = bnb.quantize_4bit(flat, quant_type="nf4", compress_statistics=True)
            delattr(module, name)
            module.register_parameter(name, torch.nn.Parameter(packed, requires_grad=False))
            parametrize.register_parametrization(module, name, Nf4Dequantize(state, tuple(weight.shape), weight.dtype),
                                                 unsafe=True)
            before += weight.numel() * weight.element_size()
            after += packed.numel() * packed.element_size()
    if not before:
        raise UserError("quantize_moe_experts: this model has no fused expert weights (3-D parameters of an "
                        "'experts' module) to quantize; remove the key.")
    log(f"quantization: MoE expert weights in 4-bit NF4 ({before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB)")

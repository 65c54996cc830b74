"""One ReLoRA merge, layer by layer: base weight += scale * B @ A, then a fresh LoRA (A random, B zero).

A 4-bit (NF4/FP4) base is dequantized, added to and quantized again with its own settings; an 8-bit base is
dequantized from its int8 rows and row scales and quantized again the way bitsandbytes quantizes it when it
loads. The same function merges during training and replays the recorded merges when a run resumes: the same
operations on the same numbers on the same device give the same weights, so a resumed run is the run it resumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from axlora.core.errors import UserError

MERGEABLE_LAYERS = ("Linear", "Linear4bit", "Linear8bitLt")
"""peft's LoRA layers over linear base layers (plain, bitsandbytes 4-bit, bitsandbytes 8-bit)."""


@dataclass
class Factors:
    """One layer's LoRA at a merge: ``delta = scale * B @ A`` (transposed when the base stores fan-in first)."""

    lora_a: Any  # torch.Tensor (r, in)
    lora_b: Any  # torch.Tensor (out, r)
    scale: float
    fan_in_fan_out: bool = False

    def delta(self, device):
        import torch

        a = self.lora_a.to(device=device, dtype=torch.float32)
        b = self.lora_b.to(device=device, dtype=torch.float32)
        update = (b @ a) * self.scale
        return update.T if self.fan_in_fan_out else update


def lora_layers(peft_model) -> dict[str, Any]:
    """The model's LoRA layers by module name; a LoRA that a restart cannot merge is refused, naming its layer."""
    from peft.tuners.lora import LoraLayer

    layers = {name: module for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)}
    for name, layer in layers.items():
        kind = type(layer).__name__
        if kind not in MERGEABLE_LAYERS or getattr(layer, "lora_embedding_A", None):
            raise UserError(f"relora: the LoRA on {name} ({kind}) does not merge into a linear base weight; ReLoRA "
                            "merges LoRA on linear layers only: remove that module from lora_target_modules.")
    if not layers:
        raise UserError("relora: the model has no LoRA layers to merge.")
    return layers


def current_factors(layer, adapter: str) -> Factors:
    """A copy of the layer's LoRA in CPU memory (what a restart merges and records)."""
    return Factors(
        lora_a=layer.lora_A[adapter].weight.detach().to("cpu", copy=True),
        lora_b=layer.lora_B[adapter].weight.detach().to("cpu", copy=True),
        scale=float(layer.scaling[adapter]),
        fan_in_fan_out=bool(getattr(layer, "fan_in_fan_out", False)),
    )


def merge_into_base(layer, factors: Factors, cpu_offload: bool = False) -> None:
    """Add the LoRA's update to the layer's base weight, in place (quantized again where the base is)."""
    import torch

    weight = layer.get_base_layer().weight
    device = weight.device
    work = torch.device("cpu") if cpu_offload else device
    with torch.no_grad():
        kind = type(weight).__name__
        if kind == "Params4bit":
            _merge_4bit(layer.get_base_layer(), factors.delta(work), work)
        elif kind == "Int8Params":
            _merge_8bit(layer.get_base_layer(), factors.delta(work), work)
        else:
            merged = weight.detach().to(work, torch.float32) + factors.delta(work)
            weight.data.copy_(merged.to(device=device, dtype=weight.dtype))


def _merge_4bit(base, delta, work) -> None:
    import bitsandbytes.functional as bnb_f

    weight = base.weight
    full = bnb_f.dequantize_4bit(weight.data, weight.quant_state)
    merged = (full.to(work).float() + delta).to(dtype=full.dtype, device=weight.device)
    packed, state = bnb_f.quantize_4bit(merged, blocksize=weight.blocksize, compress_statistics=weight.compress_statistics,
                                        quant_type=weight.quant_type, quant_storage=weight.quant_storage)
    weight.data = packed
    weight.quant_state = state
    if getattr(base, "quant_state", None) is not None:
        base.quant_state = state


def _merge_8bit(base, delta, work) -> None:
    """int8 rows with one scale per row (``SCB``): weight = CB * SCB / 127; quantized again the same way."""
    import bitsandbytes.functional as bnb_f
    import torch

    weight, state = base.weight, base.state
    scales = weight.SCB if weight.SCB is not None else state.SCB  # the first forward moves them to the layer state
    full = weight.data.to(work).float() * (scales.to(work).float().unsqueeze(1) / 127.0)
    merged = (full + delta).to(device=weight.device, dtype=torch.float16)
    rows, row_scales, _ = bnb_f.int8_vectorwise_quant(merged)
    weight.data = rows
    weight.CB, weight.SCB = rows, row_scales
    state.CB, state.SCB = None, None  # the next forward takes the new rows and scales into the layer state


def reinitialise(layer, adapter: str, generator) -> None:
    """A fresh LoRA as peft makes one: A Kaiming-uniform (a = sqrt(5)), B zero, so the layer's output is unchanged.

    A seeded generator (not the global RNG) draws A: every process draws the same, and a resume the same again.
    """
    import torch

    lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    fresh = torch.empty(lora_a.shape, dtype=torch.float32)
    torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
    with torch.no_grad():
        lora_a.copy_(fresh.to(device=lora_a.device, dtype=lora_a.dtype))
        lora_b.zero_()

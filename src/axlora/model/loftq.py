"""LoftQ initialisation of a fresh LoRA (Axolotl's ``peft: {loftq_config: {loftq_bits: 4}}``), and keeping its base.

LoftQ replaces each adapted weight W by its quantized-dequantized Q(W) and starts the LoRA from the best rank-r
approximation of W - Q(W), alternating ``loftq_iter`` times, exactly as peft's ``init_lora_weights="loftq"``.
peft runs that on a CUDA or XPU device only; on a CPU the same steps run here with the same bitsandbytes
quantizers (NF4 in blocks of 64 without double quantization, or row-wise int8) and the same SVD.

The trained model is Q(W) + LoRA, not W + LoRA: the base weights changed. So every adapter a LoftQ run saves
(checkpoints and ``final/``) also holds Q(W) of each adapted layer as ``<layer>.base_layer.weight``. Plain
``PeftModel.from_pretrained`` loads those into the base, and merge-lora takes them as the weights the LoRA is
added to, so both rebuild the trained model. Continuing such an adapter keeps them and saves them again.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from axlora.config.adapter_keys import LoftQSettings
from axlora.config.schema import Config
from axlora.core.atomic import temp_sibling
from axlora.core.errors import UserError
from axlora.core.names import ADAPTER_WEIGHTS
from axlora.core.safetensors_header import tensor_shapes

BASE_SUFFIX = ".base_layer.weight"


def require_loftq_support(config: Config) -> None:
    """LoftQ quantizes with bitsandbytes (its CPU backend from 0.48 on); say so before any work."""
    if config.loftq() is None:
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("peft.loftq_config: LoftQ quantizes the base weights with bitsandbytes, which is not "
                        "installed (pip install bitsandbytes).")


def use_loftq_base(peft_model, config: Config, continued_adapter: Path | None, log: Callable[[str], None]) -> None:
    """A fresh LoRA: LoftQ-initialise it when asked. A continued one: keep the LoftQ base it was saved with."""
    settings = config.loftq()
    if continued_adapter is None:
        if settings is not None:
            initialize_loftq(peft_model, settings, log)
            keep_loftq_base(peft_model)
        return
    if settings is not None:
        log("note: peft.loftq_config initialises a fresh LoRA only; the continued adapter keeps its own weights")
    if holds_base_weights(continued_adapter):
        log(f"adapter: {continued_adapter} holds LoftQ base weights (Q(W)); training continues on them and they are "
            "saved with the adapter again")
        keep_loftq_base(peft_model)


def initialize_loftq(peft_model, settings: LoftQSettings, log: Callable[[str], None] = print) -> None:
    """Replace each adapted linear weight by Q(W) and set its LoRA factors from the residual, as peft does."""
    import torch

    adapter = peft_model.active_adapter
    layers = _adapted_linear_layers(peft_model, adapter)
    before = after = 0.0
    for layer in layers:
        base = layer.get_base_layer()
        weight = base.weight.data
        quantized, lora_a, lora_b = loftq_factors(weight, settings.loftq_bits, layer.r[adapter], settings.loftq_iter)
        a_weight, b_weight = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        a_weight.data = lora_a.to(device=a_weight.device, dtype=a_weight.dtype)
        b_weight.data = lora_b.to(device=b_weight.device, dtype=b_weight.dtype)
        delta = layer.scaling[adapter] * (b_weight.data.float() @ a_weight.data.float()).to(weight.device)
        before += torch.linalg.norm(weight.float() - quantized.float()).item() ** 2
        after += torch.linalg.norm(weight.float() - quantized.float() - delta).item() ** 2
        base.weight.data = quantized.to(device=weight.device, dtype=weight.dtype)
    log(f"adapter: LoftQ ({settings.loftq_bits}-bit, {settings.loftq_iter} iteration(s)) on {len(layers)} layers: "
        f"||W - Q(W)|| {before ** 0.5:.4g}, ||W - (Q(W) + LoRA)|| {after ** 0.5:.4g}")


def _adapted_linear_layers(peft_model, adapter: str) -> list:
    import torch
    from peft.tuners.lora import LoraLayer

    layers = [module for module in peft_model.modules()
              if isinstance(module, LoraLayer) and adapter in module.lora_A]
    other = [type(layer.get_base_layer()).__name__ for layer in layers
             if type(layer.get_base_layer()) is not torch.nn.Linear]
    if other:
        raise UserError(f"peft.loftq_config: LoftQ initialises LoRA on linear layers only; the targets include "
                        f"{', '.join(sorted(set(other)))} layers. Narrow lora_target_modules to linear layers.")
    return layers


def loftq_factors(weight, bits: int, rank: int, iterations: int):
    """(Q(W), lora_A, lora_B) for one weight: peft's own routine on a CUDA/XPU device, its CPU twin otherwise."""
    import torch

    if torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()):
        from peft.utils.loftq_utils import loftq_init

        return loftq_init(weight, num_bits=bits, reduced_rank=rank, num_iter=iterations)
    return _loftq_on_cpu(weight, bits, rank, iterations)


def _loftq_on_cpu(weight, bits: int, rank: int, iterations: int):
    """peft's ``loftq_init`` step for step: quantize the residual, SVD of what quantization lost, repeat."""
    import torch

    with torch.no_grad():
        target = weight.float()
        residual = target
        for step in range(iterations):
            quantized = quantize_dequantize(residual, bits)
            u, s, vh = torch.linalg.svd(target - quantized, full_matrices=False)
            root = s[:rank].sqrt()
            lora_b, lora_a = u[:, :rank] * root, root[:, None] * vh[:rank]
            if step + 1 < iterations:
                residual = target - lora_b @ lora_a
    return quantized.to(dtype=weight.dtype), lora_a, lora_b


def quantize_dequantize(matrix, bits: int):
    """The float32 matrix after a round trip through bitsandbytes' NF4 (4 bits) or row-wise int8 (8 bits)."""
    import bitsandbytes.functional as bnb_functional
    import torch

    if bits == 4:
        packed, state = bnb_functional.quantize_4bit(matrix.contiguous(), blocksize=64, compress_statistics=False,
                                                     quant_type="nf4")
        return bnb_functional.dequantize_4bit(packed, state).to(torch.float32)
    rows, scales, _ = bnb_functional.int8_vectorwise_quant(matrix.contiguous().to(torch.float16))
    return bnb_functional.int8_vectorwise_dequant(rows, scales).to(torch.float32)


def keep_loftq_base(peft_model) -> None:
    """Every save of this adapter also writes Q(W) of each adapted layer (``<layer>.base_layer.weight``)."""
    save_adapter_only = peft_model.save_pretrained

    def save_with_base(directory, **options) -> None:
        save_adapter_only(directory, **options)
        _add_base_weights(peft_model, Path(directory))

    peft_model.save_pretrained = save_with_base


def _add_base_weights(peft_model, directory: Path) -> None:
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file, save_file

    path = directory / ADAPTER_WEIGHTS
    state = load_file(str(path))
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and module.lora_A:
            state[name + BASE_SUFFIX] = module.get_base_layer().weight.detach().to("cpu").contiguous()
    staged = temp_sibling(path)
    save_file(state, str(staged), metadata={"format": "pt"})
    staged.replace(path)


def holds_base_weights(adapter_dir: Path) -> bool:
    """Whether a saved adapter carries base weights of its LoRA layers (what a LoftQ run saves)."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        return False
    names = tensor_shapes(path)
    return any(name.endswith(BASE_SUFFIX) and name[: -len(BASE_SUFFIX)] + ".lora_A.weight" in names for name in names)

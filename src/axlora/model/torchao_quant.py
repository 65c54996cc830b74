"""A torchao-quantized frozen base, Axolotl's torchao QLoRA (``model_quantization_config: {backend: torchao}``).

int8, fp8 and nvfp4 weights are quantized while loading, through transformers' ``TorchAoConfig``, as weight-only
layouts: each matmul reads the weight dequantized to the run's dtype, so they train on any device, and peft puts
its ``TorchaoLoraLinear`` on them. torchao's NF4 is not a ``TorchAoConfig`` layout: the linear layers are loaded in
the run's dtype and their weights swapped for ``NF4Tensor``s, whose matmul carries gradients to the input, so
peft's plain LoRA layer trains over them. The adapter is a plain LoRA either way: it loads with peft onto the
unquantized base, and merge-lora merges it into the full-precision weights, as for a bitsandbytes QLoRA.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from axlora.config.model_keys import TorchAoQuantization
from axlora.config.schema import Config
from axlora.core.errors import UserError

_KEY = "model_quantization_config"
_SCALER_BLOCKS = (256, 128, 64, 32, 16, 8, 4, 2, 1)


def require_torchao_support(config: Config) -> None:
    """What this machine and peft must provide for the weight dtype asked for; one message naming the key."""
    quant = config.torchao_quantization()
    if quant is None:
        return
    if quant.weight_dtype == "int4":
        raise UserError(
            f"{_KEY}.weight_dtype: int4: torchao's int4 weights need its CUDA kernels, have no backward pass, and "
            "peft's LoRA layer refuses them, so no gradient would reach the LoRA below them. Use weight_dtype: nf4 "
            "or nvfp4 (also 4-bit), int8 or fp8.")
    if importlib.util.find_spec("torchao") is None:
        raise UserError(f"{_KEY}: backend torchao needs the torchao package, which is not installed "
                        "(pip install torchao).")


def torchao_load_kwargs(quant: TorchAoQuantization, source: str, trust_remote_code: bool,
                        log: Callable[[str], None] = print) -> dict:
    """``from_pretrained`` arguments: a ``TorchAoConfig`` for the layouts torchao quantizes while loading; layers
    whose input width is not a multiple of the group size stay in full precision (torchao cannot group them)."""
    group = quant.effective_group_size()
    log(f"quantization: torchao {quant.weight_dtype} base weights" + (f" (group size {group})" if group else "")
        + (", quantized after loading" if quant.weight_dtype == "nf4" else ""))
    if quant.weight_dtype == "nf4":
        return {}
    from transformers import TorchAoConfig

    unfit = _ungroupable_layers(source, trust_remote_code, group) if group else []
    if unfit:
        log(f"quantization: kept in full precision (input width not a multiple of {group}): {', '.join(unfit)}")
    return {"quantization_config": TorchAoConfig(quant_type=_torchao_config(quant), modules_to_not_convert=unfit or None)}


def _ungroupable_layers(source: str, trust_remote_code: bool, group: int) -> list[str]:
    """Linear layers of the model (built on the meta device, no weights read) that ``group`` does not divide."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module.in_features % group]


def _torchao_config(quant: TorchAoQuantization):
    import torchao.quantization as quantization

    if quant.weight_dtype == "int8":
        return quantization.Int8WeightOnlyConfig(granularity=quantization.PerGroup(quant.effective_group_size()))
    if quant.weight_dtype == "fp8":
        return quantization.Float8WeightOnlyConfig()
    if quant.weight_dtype == "nvfp4":
        from torchao.prototype.mx_formats import NVFP4WeightOnlyConfig

        return NVFP4WeightOnlyConfig()
    raise UserError(f"{_KEY}.weight_dtype: {quant.weight_dtype} is not loaded through TorchAoConfig")


def quantize_to_nf4(model, quant: TorchAoQuantization, log: Callable[[str], None] = print) -> None:
    """Swap every linear weight but the output head's for torchao's NF4 (blocks of ``group_size``)."""
    import torch
    from torchao.quantization import to_nf4

    block = quant.effective_group_size()
    head = model.get_output_embeddings()
    skipped, done = [], 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        weight = module.weight
        if weight.numel() % block:
            skipped.append(name)
            continue
        scaler_block = next(size for size in _SCALER_BLOCKS if (weight.numel() // block) % size == 0)
        module.weight = torch.nn.Parameter(to_nf4(weight.data, block, scaler_block), requires_grad=False)
        done += 1
    log(f"quantization: {done} linear layers stored as torchao NF4 (blocks of {block})"
        + (f"; kept in full precision (size not a multiple of {block}): {', '.join(skipped)}" if skipped else ""))

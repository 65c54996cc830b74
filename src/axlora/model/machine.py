"""What the machine must provide for the config: bitsandbytes for 4/8-bit weights (with a CUDA GPU, or its CPU
backend), the flash-attn package and a GPU for flash attention, ``kernels`` for Hub attention kernels.

Checked just before data preparation and again before the load, never when the config is validated: a
config validates anywhere, and a run on the wrong machine stops with one message naming the key.
"""

from __future__ import annotations

import importlib.util

from axlora.config.model_keys import ATTENTION_FLAGS
from axlora.config.schema import Config
from axlora.core.errors import UserError


def _quantization_key(config: Config, bits: int) -> str:
    if bits == 8:
        return "load_in_8bit"
    return "load_in_4bit" if config.load_in_4bit else "adapter: qlora"


def require_quantization_support(config: Config, bits: int) -> None:
    """Quantized weights need bitsandbytes (0.48 and later also run them on a CPU); say what is missing."""
    import torch

    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package is not installed (pip install bitsandbytes)")
    elif not torch.cuda.is_available() and not _bitsandbytes_runs_on_cpu():
        missing.append("no CUDA GPU is visible and this bitsandbytes has no CPU backend (0.48 or later has one)")
    if missing:
        off = "adapter: lora and load_in_4bit: false" if bits == 4 else "load_in_8bit: false"
        raise UserError(
            f"{_quantization_key(config, bits)}: {bits}-bit quantized base weights (QLoRA) need bitsandbytes, "
            f"but {' and '.join(missing)}. To train here without quantization, set {off}."
        )


def _bitsandbytes_runs_on_cpu() -> bool:
    from importlib.metadata import version

    major, minor = (int(part) for part in version("bitsandbytes").split(".")[:2])
    return (major, minor) >= (0, 48)


def require_machine_support(config: Config) -> None:
    """Fail fast, before data preparation, when this machine cannot run the quantization or attention asked for."""
    attention = config.attention_implementation()
    if attention is not None:
        require_attention_support(config, attention)
    bits = config.quantization_bits()
    if bits:
        require_quantization_support(config, bits)
    if config.torchao_quantization() or config.loftq():
        from axlora.model.loftq import require_loftq_support
        from axlora.model.torchao_quant import require_torchao_support

        require_torchao_support(config)
        require_loftq_support(config)


def _attention_key(config: Config) -> str:
    if config.attn_implementation is not None:
        return "attn_implementation"
    return next(flag for flag in ATTENTION_FLAGS if getattr(config, flag))


def require_attention_support(config: Config, implementation: str) -> None:
    """Flash attention needs its package and a CUDA GPU; Hub kernels need ``kernels``. SDPA/eager/flex run anywhere."""
    import torch

    needs = {
        "flash_attention_2": ("flash_attn", "flash-attn"),
        "flash_attention_3": ("flash_attn_interface", "flash-attn 3 (flash_attn_interface)"),
    }
    missing = []
    if implementation in needs:
        module, package = needs[implementation]
        if not torch.cuda.is_available():
            missing.append("no CUDA GPU is visible")
        if importlib.util.find_spec(module) is None:
            missing.append(f"the {package} package is not installed")
    elif "/" in implementation and importlib.util.find_spec("kernels") is None:
        missing.append("the kernels package is not installed (pip install kernels)")
    if missing:
        raise UserError(
            f"{_attention_key(config)}: attention '{implementation}' cannot run here: {' and '.join(missing)}. "
            "Use sdp_attention: true (PyTorch's fused attention, no extra package) or remove the key."
        )

"""Axolotl's kernel switches at load time: the kernel where its package and a CUDA GPU are present, else the
model's own code and one line saying which kernel did not run and why. Either way the same math is trained.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from axlora.config.schema import Config

Log = Callable[[str], None]


def _unavailable(package: str, module: str) -> str | None:
    """Why a CUDA kernel package cannot run here (None: it can)."""
    import torch

    missing = []
    if importlib.util.find_spec(module) is None:
        missing.append(f"{package} is not installed")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible")
    return " and ".join(missing) or None


def hub_kernels_kwargs(config: Config, log: Log) -> dict:
    """``use_kernels``: transformers swaps in Hub kernels when the ``kernels`` package can run them."""
    if not config.use_kernels:
        return {}
    why = _unavailable("the kernels package", "kernels")
    if why:
        log(f"note: use_kernels: {why}; the model's own layers run (the same math).")
        return {}
    log("kernels: Hub kernels for the model's layers (use_kernels)")
    return {"use_kernels": True}


def apply_kernels(model, config: Config, log: Log):
    """Patch ``model`` (a transformers model, before the adapter) with the kernels the config asks for."""
    _apply_liger(model, config, log)
    model = _apply_cut_cross_entropy(model, config, log)
    if config.fused_attn_kernel:
        log("note: fused_attn_kernel: Axolotl's fused q/k RMSNorm + RoPE kernel ships with Axolotl only; the model's "
            "own RMSNorm and RoPE run (the same math).")
    return model


def _apply_liger(model, config: Config, log: Log) -> None:
    switches = config.liger_switches()
    if not switches:
        return
    keys = ", ".join(key for key in type(config).model_fields if key.startswith("liger_") and getattr(config, key))
    why = _unavailable("liger-kernel", "liger_kernel")
    if why:
        log(f"note: {keys}: {why}; the model's own layers and loss run (the same math).")
        return
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    # liger-kernel picks the patch for the model type and ignores arguments that model has no kernel for
    _apply_liger_kernel_to_instance(model=model, **switches)
    log(f"kernels: Liger ({', '.join(switches)}) on {type(model).__name__}")


def _apply_cut_cross_entropy(model, config: Config, log: Log):
    if not config.cut_cross_entropy:
        return model
    why = _unavailable("cut-cross-entropy", "cut_cross_entropy")
    if why:
        log(f"note: cut_cross_entropy: {why}; the model's own cross-entropy runs (the same loss, more memory; "
            "chunked_cross_entropy: true saves most of it anywhere).")
        return model
    from cut_cross_entropy.transformers import cce_patch

    log("kernels: Cut Cross-Entropy loss (cut_cross_entropy)")
    return cce_patch(model)

"""DiffusionGemma loaded for block-diffusion training (``block_diffusion``).

``DiffusionGemmaForBlockDiffusion`` is not a causal-LM head: it is loaded by name, its image-only parts stay frozen
(text rows never reach them), and it refuses token-by-token generation, which peft's causal-LM wrapper would route
through ``prepare_inputs_for_generation`` (DiffusionGemma generates by denoising canvases with its own ``generate``).
"""

from __future__ import annotations

import types
from collections.abc import Callable

from axlora.config.block_diffusion_keys import DIFFUSION_GEMMA_CLASS, IMAGE_ONLY_PARTS
from axlora.config.schema import Config
from axlora.core.errors import UserError

DIFFUSION_GEMMA_TYPE = "diffusion_gemma"


def diffusion_gemma_class(config: Config) -> str | None:
    """The class ``block_diffusion`` trains (the one Axolotl's DiffusionGemmaPlugin sets as type_of_model)."""
    return DIFFUSION_GEMMA_CLASS if config.block_diffusion is not None else None


def prepare_diffusion_gemma(model, config: Config, log: Callable[[str], None]) -> None:
    """Check the checkpoint is a DiffusionGemma, freeze its image-only parts, refuse causal generation."""
    if config.block_diffusion is None:
        return
    require_fp4_experts_support(config)
    found = getattr(model.config, "model_type", None)
    if found != DIFFUSION_GEMMA_TYPE:
        raise UserError(f"base_model / block_diffusion: '{config.base_model}' is a {found} model; block_diffusion "
                        f"trains DiffusionGemma ({DIFFUSION_GEMMA_TYPE}) checkpoints.")
    for name in IMAGE_ONLY_PARTS:
        part = _submodule(model, name)
        if part is not None:
            part.requires_grad_(False)
    model.prepare_inputs_for_generation = types.MethodType(_no_token_generation, model)
    canvas = canvas_length(model, config)
    log(f"model: {DIFFUSION_GEMMA_CLASS}: block diffusion on canvases of {canvas} tokens "
        f"({config.block_diffusion.corruption} corruption, {config.block_diffusion.loss_weighting} weighting)")


def require_fp4_experts_support(config: Config) -> None:
    """``frozen_fp4_experts``: the 4-bit experts are consumed by ScatterMoE's fused expert-LoRA kernel on a CUDA GPU.

    transformers' own expert loop cannot run LoRA over torchao FP4 tensors (peft adds its delta to the weight), and
    axlora does not ship that kernel; the run stops here, naming what is missing, instead of training something else.
    """
    assert config.block_diffusion is not None
    fp4 = config.block_diffusion.frozen_fp4_experts
    if not fp4:
        return
    import importlib.util

    import torch

    missing = [] if torch.cuda.is_available() else ["a CUDA GPU"]
    if importlib.util.find_spec("torchao") is None:
        missing.append("the torchao package")
    missing.append("ScatterMoE's fused expert-LoRA kernel over FP4 experts (Axolotl's KernelsPlugin, use_scattermoe), "
                   "which axlora does not ship")
    raise UserError(f"block_diffusion.frozen_fp4_experts: {fp4} experts need {', '.join(missing)}. Remove "
                    "frozen_fp4_experts to train the LoRA over the experts in the compute dtype.")


def canvas_length(model, config: Config) -> int:
    """``block_diffusion.canvas_length``, else the model config's."""
    assert config.block_diffusion is not None
    length = config.block_diffusion.canvas_length or getattr(model.config, "canvas_length", None)
    if not length:
        raise UserError("block_diffusion.canvas_length: the model config has no canvas_length; set one.")
    return int(length)


def _submodule(model, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _no_token_generation(self, *args, **kwargs):
    raise UserError(f"{DIFFUSION_GEMMA_CLASS} generates by denoising canvases (its own generate), not token by token.")

"""Choosing the training precision from ``bf16``/``fp16``/``tf32`` and the hardware present."""

from __future__ import annotations

from dataclasses import dataclass

from axlora.config.schema import Config
from axlora.core.errors import UserError


@dataclass(frozen=True)
class Precision:
    """The dtype the base weights load in and accelerate's mixed-precision mode."""

    name: str  # "bf16", "fp16" or "fp32"

    @property
    def torch_dtype(self):
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.name]

    @property
    def mixed_precision(self) -> str:
        return {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[self.name]


def choose_precision(config: Config) -> Precision:
    """``bf16: auto`` means bf16 where a CUDA GPU supports it, else fp32 (CPU bf16 is slow and lossy).

    Axolotl's ``bfloat16`` / ``float16`` / ``float32`` name the dtype the weights load in: the same as
    ``bf16: true`` / ``fp16: true`` / ``bf16: false`` here, where the base weights always load in the run's
    dtype and the LoRA weights stay in float32."""
    import torch

    cuda = torch.cuda.is_available()
    if config.tf32 and cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if config.fp16 or config.float16:
        if not cuda:
            key = "fp16" if config.fp16 else "float16"
            raise UserError(f"{key}: float16 training needs a CUDA GPU; none is visible. Set {key}: false.")
        return Precision("fp16")
    if config.float32:
        return Precision("fp32")
    bf16 = True if config.bfloat16 is True else config.bf16  # bfloat16: auto is bf16's own auto (its default)
    if bf16 == "auto":
        return Precision("bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32")
    if bf16 and cuda and not torch.cuda.is_bf16_supported():
        key = "bfloat16" if config.bfloat16 is True else "bf16"
        raise UserError(f"{key}: this GPU does not support bfloat16; set {key}: false (or bf16: auto).")
    return Precision("bf16" if bf16 else "fp32")

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
    """``bf16: auto`` means bf16 where a CUDA GPU supports it, else fp32 (CPU bf16 is slow and lossy)."""
    import torch

    cuda = torch.cuda.is_available()
    if config.tf32 and cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if config.fp16:
        if not cuda:
            raise UserError("fp16: float16 mixed precision needs a CUDA GPU; none is visible. Set fp16: false.")
        return Precision("fp16")
    if config.bf16 == "auto":
        return Precision("bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32")
    if config.bf16 and cuda and not torch.cuda.is_bf16_supported():
        raise UserError("bf16: this GPU does not support bfloat16; set bf16: false or auto.")
    return Precision("bf16" if config.bf16 else "fp32")

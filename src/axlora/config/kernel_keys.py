"""Axolotl's kernel switches (Liger, Cut Cross-Entropy, Hub kernels, Axolotl's fused attention kernel).

Each one changes speed and memory only, never what is trained. ``model.kernels`` runs the kernel where its
package (and the GPU it needs) is present; otherwise the model's own code runs and one line says so.
"""

from __future__ import annotations

from pydantic import Field

from axlora.config.base import StrictModel

LIGER_SWITCHES = {
    "liger_rope": "rope",
    "liger_rms_norm": "rms_norm",
    "liger_rms_norm_gated": "rms_norm_gated",
    "liger_layer_norm": "layer_norm",
    "liger_glu_activation": "swiglu",
    "liger_swiglu": "swiglu",
    "liger_cross_entropy": "cross_entropy",
    "liger_fused_linear_cross_entropy": "fused_linear_cross_entropy",
}
"""Liger switch -> the argument of liger-kernel's per-model patch that turns it on (GeGLU models read swiglu)."""


class KernelSettings(StrictModel):
    """Faster kernels for the same math: used where installed, else the model's own code (with a note)."""

    liger_rope: bool = Field(default=False, description="Liger's RoPE kernel (liger-kernel, CUDA).")
    liger_rms_norm: bool = Field(default=False, description="Liger's RMSNorm kernel (liger-kernel, CUDA).")
    liger_rms_norm_gated: bool = Field(
        default=False, description="Liger's gated RMSNorm kernel, for models that have one (liger-kernel, CUDA)."
    )
    liger_layer_norm: bool = Field(default=False, description="Liger's LayerNorm kernel (liger-kernel, CUDA).")
    liger_glu_activation: bool = Field(
        default=False, description="Liger's SwiGLU/GeGLU MLP kernel (liger-kernel, CUDA)."
    )
    liger_swiglu: bool = Field(default=False, description="Liger's SwiGLU MLP kernel (liger-kernel, CUDA).")
    liger_cross_entropy: bool = Field(default=False, description="Liger's cross-entropy kernel (liger-kernel, CUDA).")
    liger_fused_linear_cross_entropy: bool = Field(
        default=False,
        description="Liger's fused output-head + cross-entropy kernel: the loss without the logits (liger-kernel, CUDA).",
    )
    cut_cross_entropy: bool = Field(
        default=False,
        description="Cut Cross-Entropy: the loss without materialising the logits (cut-cross-entropy, CUDA); "
        "set by Axolotl's CutCrossEntropyPlugin.",
    )
    use_kernels: bool = Field(
        default=False, description="Hub kernels for the model's layers (transformers' use_kernels; the kernels package)."
    )
    fused_attn_kernel: bool = Field(
        default=False,
        description="Axolotl's fused q/k RMSNorm + RoPE Triton kernel; axlora runs the model's own RMSNorm and RoPE "
        "(the same math) and says so.",
    )

    def liger_switches(self) -> dict[str, bool]:
        """The liger-kernel patch arguments the switches ask for (only those set)."""
        return {argument: True for key, argument in LIGER_SWITCHES.items() if getattr(self, key)}

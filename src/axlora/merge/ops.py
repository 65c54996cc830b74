"""The arithmetic of one merged weight, and the probe that checks it independently of that arithmetic.

Every weight is handled as the matrix ``M`` (out x in) that multiplies activations: ``M = W`` for ``nn.Linear``,
``M = W.T`` for GPT-2 ``Conv1D`` (``fan_in_fan_out``) and for embeddings (whose LoRA delta peft transposes). The
merge computes ``M += scale * B @ A`` in fp32 in place (no separate delta matrix), then DoRA's row rescaling.

The check never reuses the merged matrix's arithmetic: for a few random probe columns ``x`` it computes
``M0 x + scale * B (A x)`` from the untouched base and factors, and compares it with ``M x`` twice: with the fp32
merged matrix (catches a wrong delta even when it is below bf16 rounding noise) and with the output-dtype matrix
that is written (catches the cast).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

PROBE_COLUMNS = 4
PROBE_SEED = 20240601
FP32_TOLERANCE = 1e-4
# Relative error ||M_out x - ref|| / ||ref|| expected from rounding to the output dtype is ~1e-3 (bf16) and
# ~1.5e-4 (fp16); the defaults leave about a 10x margin.
DEFAULT_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: FP32_TOLERANCE,
    torch.float32: FP32_TOLERANCE,
    torch.bfloat16: 1e-2,
    torch.float16: 2e-3,
}
_CHUNK_ELEMENTS = 4 * 1024 * 1024  # rows of a low-precision matrix are upcast this many elements at a time


@dataclass(frozen=True)
class ProbeError:
    """How far a merged matrix is from the reference on the probe columns."""

    relative: float
    absolute: float


def matrix_view(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The (out x in) matrix that multiplies activations, as a view sharing the stored weight's memory."""
    return weight.t() if transposed else weight


def add_lora_delta(matrix: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> None:
    """``matrix += scale * lora_b @ lora_a`` in place; addmm avoids materialising the full-size delta."""
    matrix.addmm_(lora_b, lora_a, alpha=scale)


def apply_dora(matrix: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA merge as peft does it: rows of ``W + delta`` rescaled to ``magnitude / ||row||``; returns the factors."""
    factor = magnitude / torch.linalg.norm(matrix, dim=1)
    matrix.mul_(factor.unsqueeze(1))
    return factor


def probe_columns(name: str, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """Deterministic random probe for one tensor (seeded by its name, so reruns see the same numbers)."""
    gen = torch.Generator().manual_seed(PROBE_SEED ^ zlib.crc32(name.encode()))
    return torch.randn(in_features, PROBE_COLUMNS, generator=gen, dtype=torch.float32).to(dtype)


def reference_output(
    base_out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float
) -> torch.Tensor:
    """``M0 x + scale * B (A x)``: the adapter's effect computed the way peft's forward pass computes it."""
    return base_out + scale * matmul_fp32(lora_b, matmul_fp32(lora_a, x))


def matmul_fp32(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``matrix @ x`` in ``x``'s dtype for a matrix of any float dtype, one probe column at a time.

    Column-wise matrix-vector products read the matrix once per column without the packing copies a skinny
    matrix-matrix product makes, and avoid thread-pool synchronisation: measured 3-4x faster (200x for the
    rank-sized products) on a busy 2-core machine. Low-precision matrices are upcast a slice at a time.
    """
    if matrix.dtype == x.dtype:
        return _columns(matrix, x)
    out_features, in_features = matrix.shape
    rows = max(1, _CHUNK_ELEMENTS // max(in_features, 1))
    parts = [_columns(matrix[i:i + rows].to(x.dtype), x) for i in range(0, out_features, rows)]
    return torch.cat(parts) if parts else x.new_zeros(0, x.shape[1])


def _columns(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.mv(matrix, column) for column in x.unbind(1)], dim=1)


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN/inf: min and max propagate NaN and expose +-inf, one pass and no mask the size of the tensor."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) and torch.isfinite(high))


def compare(actual: torch.Tensor, reference: torch.Tensor) -> ProbeError:
    """Relative (Frobenius) and largest absolute difference; non-finite values count as infinitely wrong."""
    diff = (actual - reference).double()
    if not torch.isfinite(diff).all():
        return ProbeError(float("inf"), float("inf"))
    denom = max(float(torch.linalg.norm(reference.double())), 1e-30)
    return ProbeError(float(torch.linalg.norm(diff)) / denom, float(diff.abs().max()) if diff.numel() else 0.0)

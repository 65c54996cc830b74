"""A parameter LoRA's (MoE experts') delta on one stored tensor, and the probe check of every expert matrix in it.

Each expert is handled as ordinary LoRA is (``ops``): its (out x in) matrix is a view of the stored tensor
(``W[e]``, ``W[e].T`` for transposed experts, or the tensor itself when the checkpoint stores one expert per
tensor, possibly only some of its rows), ``scale * B_e @ A_e`` is added in place in fp32, and probe columns
compare ``M x`` with ``M0 x + scale * B_e (A_e x)`` before and after the cast to the output dtype.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from axlora.merge import ops
from axlora.merge.lora_weights import LoraModule
from axlora.merge.param_lora import ExpertDelta
from axlora.merge.safetensors_io import TensorReader

Check = Callable[[str, ops.ProbeError, ops.ProbeError, torch.dtype], None]
_KEPT_MODULES = 4  # a layer's gate_up and down LoRAs, and the next layer's when its tensors straddle a shard


class ExpertFactors:
    """Per-expert factors of the parameter LoRAs in use, read and reshaped once per module.

    A per-expert checkpoint holds three tensors per expert and layer, each needing its expert's slice of the same
    two factors: reading them from the adapter file each time would read them thousands of times. The tensors of
    one layer come together in the base's shards, so a few modules kept are enough.
    """

    def __init__(self, reader: TensorReader):
        self._reader = reader
        self._kept: OrderedDict[tuple[str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def get(self, lora: LoraModule, num_experts: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A: experts x r x in, B: experts x out x r), laid out as peft's ``ParamWrapper`` reshapes them."""
        key = (lora.module, dtype)
        if key in self._kept:
            self._kept.move_to_end(key)
            return self._kept[key]
        assert lora.a is not None and lora.b is not None
        lora_a = self._reader.read(lora.a).to(dtype)
        lora_b = self._reader.read(lora.b).to(dtype)
        factors = (lora_a.reshape(num_experts, -1, lora_a.shape[1]).contiguous(),
                   lora_b.reshape(lora_b.shape[0], -1, num_experts).permute(2, 0, 1).contiguous())
        self._kept[key] = factors
        if len(self._kept) > _KEPT_MODULES:
            self._kept.popitem(last=False)
        return factors


def merge_expert_tensor(name: str, tensor: torch.Tensor, delta: ExpertDelta, factors: ExpertFactors,
                        work: torch.dtype, out_dtype: torch.dtype, check: Check | None) -> torch.Tensor:
    """The stored ``tensor`` (a buffer the caller owns) plus the delta, in ``out_dtype``.

    One expert at a time is lifted to the working precision ``work``, merged, checked and written out, so a
    fused tensor of all experts never exists in fp32 (gpt-oss-120b's gate_up_proj would take 8.5 GB).
    ``check`` (the verifier) gets each expert matrix's probe errors, fp32 and as written; None skips the probes.
    """
    lora_a, lora_b = factors.get(delta.lora, delta.num_experts, work)
    start, stop = delta.rows
    out = tensor if tensor.dtype == out_dtype else torch.empty(tensor.shape, dtype=out_dtype)
    for expert in range(delta.num_experts) if delta.expert is None else [delta.expert]:
        label = name if delta.expert is not None else f"{name} (expert {expert})"
        weight = _stored(tensor, delta, expert).to(work)  # the stored view itself when already in ``work``
        written = _stored(out, delta, expert)
        probe = _Probe(label, lora_a[expert], lora_b[expert, start:stop], delta.lora.scale, delta.transposed)
        probe.merge(weight, written, check, out_dtype)
    return out


def _stored(tensor: torch.Tensor, delta: ExpertDelta, expert: int) -> torch.Tensor:
    """What ``tensor`` holds of expert ``expert`` as stored: ``tensor[expert]`` of a fused tensor, else all of it."""
    return tensor[expert] if delta.expert is None else tensor


class _Probe:
    """One expert matrix's merge, checked on probe columns as ``core`` checks an ordinary LoRA weight."""

    def __init__(self, label: str, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, transposed: bool):
        self.label, self.lora_a, self.lora_b, self.scale, self.transposed = label, lora_a, lora_b, scale, transposed

    def merge(self, weight: torch.Tensor, written: torch.Tensor, check: Check | None, out_dtype: torch.dtype) -> None:
        """``weight += delta`` in place, copied into ``written`` (the output's memory) unless it is that memory."""
        matrix = ops.matrix_view(weight, self.transposed)
        x = ops.probe_columns(self.label, matrix.shape[1], weight.dtype) if check is not None else None
        base_out = ops.matmul_fp32(matrix, x) if x is not None else None
        ops.add_lora_delta(matrix, self.lora_a, self.lora_b, self.scale)
        in_place = weight.dtype == written.dtype and weight.data_ptr() == written.data_ptr()
        if not in_place:
            written.copy_(weight)
        if check is None or x is None or base_out is None:
            return
        reference = ops.reference_output(base_out, x, self.lora_a, self.lora_b, self.scale)
        err_fp32 = ops.compare(ops.matmul_fp32(matrix, x), reference)
        err_out = err_fp32 if in_place else ops.compare(
            ops.matmul_fp32(ops.matrix_view(written, self.transposed), x), reference)
        check(self.label, err_fp32, err_out, out_dtype)

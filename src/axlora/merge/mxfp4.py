"""MXFP4-packed MoE experts (gpt-oss checkpoints on the Hub) read as the plain tensors transformers decodes them to.

Such a checkpoint says ``quantization_config: {quant_method: mxfp4}`` and stores each fused expert parameter
``X`` (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``) as two uint8 tensors:

- ``X_blocks`` (experts x rows x groups x 16): two FP4 (e2m1) codes per byte, the low nibble first;
- ``X_scales`` (experts x rows x groups): one e8m0 exponent (bias 127) per group of 32 values.

Row ``r`` of expert ``e`` holds ``groups * 32`` values, ``code value * 2 ** (scale - 127)``, and the model's
parameter is that (experts x rows x columns) matrix transposed: ``X[e] = decoded[e].T``, which is transformers'
own layout (``convert_moe_packed_tensors``): gate_up_proj (experts x hidden x 2*intermediate), down_proj
(experts x intermediate x hidden). The merge lists each pair as one tensor under the parameter's name and
decodes it when it is read, one expert at a time, so a merged model is a plain one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from axlora.core.errors import UserError
from axlora.core.safetensors_header import TensorInfo
from axlora.merge.safetensors_io import ITEM_SIZE, TensorReader

MXFP4_METHOD = "mxfp4"
BLOCKS_SUFFIX = "_blocks"
SCALES_SUFFIX = "_scales"
VALUES_PER_GROUP = 32
DECODED_DTYPE = "BF16"  # what a decoded tensor is written as unless the merge is asked for another dtype
_BYTES_PER_GROUP = VALUES_PER_GROUP // 2
_SCALE_BIAS = 127
# The e2m1 value of each 4-bit code: bit 3 is the sign, bits 0-2 index 0, 0.5, 1, 1.5, 2, 3, 4, 6.
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(frozen=True)
class Mxfp4Tensor(TensorInfo):
    """A parameter the checkpoint stores MXFP4-packed: its decoded name, dtype and shape, and the two stored tensors.

    ``path``/``start``/``end`` are the blocks' (where its bytes begin); ``nbytes`` is the decoded size, so plans and
    totals count what the merge writes. It is never copied raw: ``read_decoded`` produces it.
    """

    blocks: TensorInfo
    scales: TensorInfo

    @property
    def nbytes(self) -> int:
        return self.numel * ITEM_SIZE[self.dtype]


def is_mxfp4(config: dict[str, Any]) -> bool:
    """Whether config.json says the checkpoint's experts are MXFP4-packed."""
    quant = config.get("quantization_config")
    return isinstance(quant, dict) and quant.get("quant_method") == MXFP4_METHOD


def plain_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config of the decoded model: without the quantization_config that would make transformers expect blocks."""
    if not is_mxfp4(config):
        return config
    return {key: value for key, value in config.items() if key != "quantization_config"}


def decoded_tensors(directory: Path, tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """``tensors`` with each blocks/scales pair replaced by its decoded tensor, at the blocks' place in the order."""
    out: dict[str, TensorInfo] = {}
    for name, info in tensors.items():
        if name.endswith(SCALES_SUFFIX) and name.removesuffix(SCALES_SUFFIX) + BLOCKS_SUFFIX in tensors:
            continue  # joins its blocks
        if not name.endswith(BLOCKS_SUFFIX):
            out[name] = info
            continue
        target = name.removesuffix(BLOCKS_SUFFIX)
        scales = tensors.get(target + SCALES_SUFFIX)
        if scales is None:
            raise UserError(f"{info.path}: MXFP4 tensor {name!r} has no {target + SCALES_SUFFIX!r} beside it in "
                            f"{directory}; the checkpoint is incomplete")
        if target in tensors:
            raise UserError(f"{info.path}: {directory} stores {target!r} both plain and MXFP4-packed ({name!r})")
        out[target] = _decoded_info(target, info, scales)
    return out


def _decoded_info(name: str, blocks: TensorInfo, scales: TensorInfo) -> Mxfp4Tensor:
    """The decoded tensor's header fields, after checking the pair is laid out as MXFP4 experts are."""
    shape = blocks.shape
    if blocks.dtype != "U8" or scales.dtype != "U8" or len(shape) != 4 or shape[3] != _BYTES_PER_GROUP \
            or scales.shape != shape[:3]:
        raise UserError(
            f"{blocks.path}: {blocks.name!r} ({blocks.dtype} {list(shape)}) and {scales.name!r} ({scales.dtype} "
            f"{list(scales.shape)}) are not MXFP4 experts: expected uint8 blocks (experts x rows x groups x "
            f"{_BYTES_PER_GROUP}) and uint8 scales (experts x rows x groups)")
    experts, rows, groups, _ = shape
    return Mxfp4Tensor(name, DECODED_DTYPE, (experts, groups * VALUES_PER_GROUP, rows), blocks.path, blocks.start,
                       blocks.end, blocks, scales)


def read_decoded(info: Mxfp4Tensor, reader_for: Callable[[Path], TensorReader], dtype: torch.dtype) -> torch.Tensor:
    """Read one packed parameter and decode it to ``dtype`` (experts x columns x rows), one expert at a time."""
    blocks = reader_for(info.blocks.path).read(info.blocks)
    scales = reader_for(info.scales.path).read(info.scales)
    out = torch.empty(info.shape, dtype=dtype)
    for expert in range(info.shape[0]):
        out[expert].copy_(decode_rows(blocks[expert], scales[expert]).t())
    return out


def decode_rows(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(rows x groups x 16) packed codes and (rows x groups) exponents -> (rows x groups*32) values in fp32.

    Every FP4 value times a power of two is exact in fp32, so casting this result rounds once, exactly as
    transformers' decoder (which multiplies in fp32 and writes the target dtype) does; a scale of 255 (e8m0's NaN)
    gives NaN or inf, which the merge refuses to write.
    """
    table = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2)  # low nibble is the earlier value
    values = table[codes.long()]
    exponents = scales.to(torch.int32) - _SCALE_BIAS
    values = torch.ldexp(values, exponents.unsqueeze(-1))
    return values.flatten(-2)

"""Deciding, before anything is written, what every output tensor is and where it comes from.

All adapter/base mismatches (unknown keys, wrong shapes, missing biases) are found here, from headers alone,
so a bad adapter fails in a second instead of after minutes of writing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UserError
from .adapter import Adapter, LoraModule
from .base import BaseModel
from .safetensors_io import CODE_TO_TORCH, FLOAT_CODES, ITEM_SIZE, TORCH_TO_CODE, PlannedTensor, TensorInfo

OUTPUT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
LM_HEAD = "lm_head.weight"
# Names of the input embedding an untied ``lm_head`` is tied to, across common architectures.
_EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


@dataclass
class OutputTensor:
    """One tensor of the merged model: its source, what is applied to it, and its output header fields."""

    name: str
    source: TensorInfo  # the base tensor (for an untied lm_head: the embedding it was tied to)
    dtype: str  # safetensors dtype code written
    replacement: TensorInfo | None = None  # modules_to_save / saved base_layer: replaces the base tensor
    lora: LoraModule | None = None  # LoRA delta added to this weight
    transposed: bool = False  # stored as (in x out): Conv1D / embedding
    bias_of: LoraModule | None = None  # lora_bias delta added to this bias

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    @property
    def planned(self) -> PlannedTensor:
        return PlannedTensor(self.name, self.dtype, self.shape)

    @property
    def passthrough(self) -> bool:
        """Nothing changes: the bytes can be copied without ever becoming a tensor."""
        return (self.replacement is None and self.lora is None and self.bias_of is None
                and self.dtype == self.source.dtype)


@dataclass
class MergePlan:
    tensors: list[OutputTensor]
    config: dict[str, Any]
    untied: bool  # lm_head was tied to the embedding in the base and is written separately now

    @property
    def merged_modules(self) -> int:
        return sum(t.lora is not None for t in self.tensors)

    @property
    def replaced(self) -> int:
        return sum(t.replacement is not None for t in self.tensors)

    @property
    def output_dtype(self) -> torch.dtype:
        """The floating dtype holding most bytes: what config.json should announce."""
        sizes: dict[str, int] = {}
        for t in self.tensors:
            if t.dtype in FLOAT_CODES:
                sizes[t.dtype] = sizes.get(t.dtype, 0) + t.planned.nbytes
        return CODE_TO_TORCH[max(sizes, key=sizes.__getitem__)] if sizes else torch.float32


def parse_dtype(dtype: str | None) -> torch.dtype | None:
    """``None``/"auto" keeps each tensor's own dtype; otherwise one of float32, bfloat16, float16."""
    if dtype is None or dtype == "auto":
        return None
    if dtype not in OUTPUT_DTYPES:
        raise UserError(f"dtype {dtype!r}: expected one of float32, bfloat16, float16 (or leave it unset)")
    return OUTPUT_DTYPES[dtype]


def build_plan(base: BaseModel, adapter: Adapter, dtype: torch.dtype | None) -> MergePlan:
    """Attach every adapter tensor to its base tensor, checking names and shapes; nothing is read yet."""
    config = dict(base.config)
    sources = dict(base.tensors)
    untied = _untie_lm_head(base, adapter, sources)
    if untied:
        config["tie_word_embeddings"] = False
    out_code = TORCH_TO_CODE[dtype] if dtype is not None else None
    entries = {
        name: OutputTensor(name, info, out_code if out_code and info.dtype in FLOAT_CODES else info.dtype)
        for name, info in sources.items()
    }
    for target, info in adapter.replacements.items():
        entry = _entry(entries, base, adapter, target, info.name)
        _check_same_shape(adapter, info, entry)
        entry.replacement = info
    for lora in adapter.modules.values():
        _attach_lora(entries, base, adapter, lora)
    for entry in entries.values():
        if entry.dtype not in ITEM_SIZE:
            raise UserError(f"{entry.source.path}: tensor {entry.name!r} has unknown dtype {entry.dtype}")
    return MergePlan(list(entries.values()), config, untied)


def _input_embedding(base: BaseModel) -> str | None:
    names = [n for n in base.tensors if n.endswith(_EMBED_SUFFIXES)]
    return names[0] if len(names) == 1 else None


def _untie_lm_head(base: BaseModel, adapter: Adapter, sources: dict[str, TensorInfo]) -> bool:
    """With tied embeddings the base stores no lm_head; if the adapter changes either side, untie them.

    peft's forward keeps lm_head on the original (shared) matrix when only the embedding is replaced or
    LoRA-adapted, and uses its own copy when lm_head is in modules_to_save; writing lm_head separately and
    setting ``tie_word_embeddings: false`` reproduces exactly that. If the adapter touches neither, the tie
    is kept and no lm_head is written.
    """
    if LM_HEAD in base.tensors or not base.config.get("tie_word_embeddings", True):
        return False
    embed = _input_embedding(base)
    touched = {LM_HEAD, "lm_head"}
    if embed is not None:
        touched |= {embed, embed.removesuffix(".weight")}
    if not (touched & (set(adapter.replacements) | set(adapter.modules))):
        return False
    if embed is None:
        raise UserError(f"{base.directory}: lm_head is tied to the input embedding, but which tensor that is could "
                        "not be determined; cannot merge an adapter that changes the embeddings or lm_head")
    sources[LM_HEAD] = base.tensors[embed]
    return True


def _entry(entries: dict[str, OutputTensor], base: BaseModel, adapter: Adapter, target: str,
           adapter_key: str) -> OutputTensor:
    entry = entries.get(target)
    if entry is None:
        raise UserError(
            f"{adapter.weights}: key {adapter_key!r} applies to base tensor {target!r}, which {base.directory} does "
            "not have; this adapter probably belongs to another base model")
    return entry


def _check_same_shape(adapter: Adapter, info: TensorInfo, entry: OutputTensor) -> None:
    if info.shape != entry.shape:
        raise UserError(
            f"{adapter.weights}: {info.name!r} has shape {list(info.shape)} but base tensor {entry.name!r} has "
            f"shape {list(entry.shape)}; the adapter does not fit this base model (resized vocabulary or another "
            "model)")
    if info.dtype not in FLOAT_CODES or entry.source.dtype not in FLOAT_CODES:
        raise UserError(f"{adapter.weights}: {info.name!r} ({info.dtype}) cannot replace {entry.name!r} "
                        f"({entry.source.dtype}); only floating-point tensors can be replaced")


def _attach_lora(entries: dict[str, OutputTensor], base: BaseModel, adapter: Adapter, lora: LoraModule) -> None:
    """Find the weight a LoRA module modifies and decide its layout from the shapes (config only if square)."""
    assert lora.a is not None and lora.b is not None  # guaranteed by load_adapter
    entry = _entry(entries, base, adapter, lora.weight_name, lora.a.name)
    out_features, in_features = lora.b.shape[0], lora.a.shape[1]
    normal, flipped = (out_features, in_features), (in_features, out_features)
    shape = entry.shape
    if entry.source.dtype not in FLOAT_CODES or len(shape) != 2 or shape not in (normal, flipped):
        raise UserError(
            f"{adapter.weights}: LoRA for {lora.module!r} (lora_A {list(lora.a.shape)}, lora_B {list(lora.b.shape)}) "
            f"expects a weight of shape {list(normal)}, but base tensor {entry.name!r} has shape {list(shape)} "
            f"({entry.source.dtype}); the adapter belongs to another base model")
    if lora.embedding:
        if shape != flipped:
            raise UserError(f"{adapter.weights}: embedding LoRA for {lora.module!r} expects a weight of shape "
                            f"{list(flipped)}, but base tensor {entry.name!r} has shape {list(shape)}")
        entry.transposed = True
    else:
        entry.transposed = shape == flipped and (shape != normal or adapter.fan_in_fan_out)
    if lora.magnitude is not None and lora.magnitude.shape != (out_features,):
        raise UserError(f"{adapter.weights}: DoRA magnitude of {lora.module!r} has shape "
                        f"{list(lora.magnitude.shape)}, expected [{out_features}]")
    entry.lora = lora
    if lora.bias is not None:
        bias_entry = entries.get(lora.bias_name)
        if bias_entry is None:
            raise UserError(f"{adapter.weights}: {lora.bias.name!r} (lora_bias) needs base tensor {lora.bias_name!r}, "
                            "which the base model does not have")
        if bias_entry.shape != (out_features,) or lora.bias.shape != (out_features,):
            raise UserError(f"{adapter.weights}: {lora.bias.name!r} has shape {list(lora.bias.shape)}, base bias "
                            f"{lora.bias_name!r} has shape {list(bias_entry.shape)}; expected [{out_features}]")
        bias_entry.bias_of = lora

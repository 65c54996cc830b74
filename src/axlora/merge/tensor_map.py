"""The merged model's tensor map: what every output tensor is and where it comes from, before anything is written.

All adapter/base mismatches (unknown keys, wrong shapes, missing biases) are found here, from headers alone,
so a bad adapter fails in a second instead of after minutes of writing.

One shape change is legitimate: after tokens were added to the vocabulary, peft saves the input embedding and
the output head whole, with more (or, shrunk, fewer) rows than the base. The merged model then takes those
tensors and announces the new ``vocab_size`` in its config.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from axlora.core.errors import UserError
from axlora.core.safetensors_header import TensorInfo
from axlora.merge.base import BaseModel
from axlora.merge.lora_weights import Adapter, LoraModule
from axlora.merge.mxfp4 import Mxfp4Tensor, plain_config
from axlora.merge.param_lora import ExpertDelta, parameter_deltas
from axlora.merge.safetensors_io import CODE_TO_TORCH, FLOAT_CODES, ITEM_SIZE, TORCH_TO_CODE, PlannedTensor

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
    expert: ExpertDelta | None = None  # a parameter LoRA's (MoE experts') delta, or the part of it stored here

    @property
    def shape(self) -> tuple[int, ...]:
        """The replacement's shape when there is one: it differs from the base's only for a resized vocabulary."""
        return self.replacement.shape if self.replacement is not None else self.source.shape

    @property
    def planned(self) -> PlannedTensor:
        return PlannedTensor(self.name, self.dtype, self.shape)

    @property
    def passthrough(self) -> bool:
        """Nothing changes: the bytes can be copied without ever becoming a tensor."""
        return (self.replacement is None and self.lora is None and self.bias_of is None and self.expert is None
                and self.dtype == self.source.dtype and not isinstance(self.source, Mxfp4Tensor))


@dataclass
class OutputTensors:
    """Every tensor of the merged model, in base-shard order, and the config.json that describes them."""

    tensors: list[OutputTensor]
    config: dict[str, Any]
    untied: bool  # lm_head was tied to the embedding in the base and is written separately now
    vocab_size: int | None = None  # rows of the resized vocabulary; None when the base's is kept

    @property
    def merged_modules(self) -> int:
        """LoRA modules merged: each ordinary one, and each parameter LoRA (whatever tensors hold its parameter)."""
        experts = {t.expert.lora.module for t in self.tensors if t.expert is not None}
        return sum(t.lora is not None for t in self.tensors) + len(experts)

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


def map_output_tensors(base: BaseModel, adapter: Adapter, dtype: torch.dtype | None) -> OutputTensors:
    """Attach every adapter tensor to its base tensor, checking names and shapes; nothing is read yet."""
    config = dict(plain_config(base.config))  # MXFP4 experts are written decoded
    sources = dict(base.tensors)
    untied = _untie_lm_head(base, adapter, sources)
    if untied:
        config["tie_word_embeddings"] = False
    out_code = TORCH_TO_CODE[dtype] if dtype is not None else None
    entries = {
        name: OutputTensor(name, info, out_code if out_code and info.dtype in FLOAT_CODES else info.dtype)
        for name, info in sources.items()
    }
    embed = _input_embedding(base)
    vocab = [name for name in (embed, LM_HEAD) if name is not None and name in entries]
    for target, info in adapter.replacements.items():
        entry = _entry(entries, base, adapter, target, info.name)
        _check_replacement(adapter, info, entry, vocab)
        entry.replacement = info
    if untied and embed is not None:
        _share_embedding_base_layer(entries[embed], entries[LM_HEAD])
    vocab_size = _resized_vocab(base, adapter, entries, embed, vocab)
    if vocab_size is not None:
        config = _with_vocab_size(config, vocab_size)
    expert_deltas = parameter_deltas(base, adapter)  # first: it also settles which LoRAs are ordinary ones
    for lora in adapter.modules.values():
        if not lora.parameter:
            _attach_lora(entries, base, adapter, lora, vocab)
    for name, delta in expert_deltas.items():
        _attach_expert_delta(adapter, entries[name], delta)
    for entry in entries.values():
        if entry.dtype not in ITEM_SIZE:
            raise UserError(f"{entry.source.path}: tensor {entry.name!r} has unknown dtype {entry.dtype}")
    return OutputTensors(list(entries.values()), config, untied, vocab_size)


def _input_embedding(base: BaseModel) -> str | None:
    names = [n for n in base.tensors if n.endswith(_EMBED_SUFFIXES)]
    return names[0] if len(names) == 1 else None


def _untie_lm_head(base: BaseModel, adapter: Adapter, sources: dict[str, TensorInfo]) -> bool:
    """With tied embeddings the base stores no lm_head; if the adapter changes either side, untie them.

    peft's forward keeps lm_head on the original (shared) matrix when only the embedding is replaced or
    LoRA-adapted, and uses its own copy when lm_head is in modules_to_save; writing lm_head separately and
    setting ``tie_word_embeddings: false`` reproduces exactly that (see ``_share_embedding_base_layer`` for an
    embedding saved whole). If the adapter touches neither, the tie is kept and no lm_head is written.
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


def _share_embedding_base_layer(embed: OutputTensor, lm_head: OutputTensor) -> None:
    """A tied lm_head is, in peft's forward, the very matrix saved as the embedding's ``base_layer.weight``.

    That saved matrix is the base's own unless the vocabulary was resized; then only it holds the new rows.
    """
    if lm_head.replacement is None and embed.replacement is not None and ".base_layer." in embed.replacement.name:
        lm_head.replacement = embed.replacement


def _check_replacement(adapter: Adapter, info: TensorInfo, entry: OutputTensor, vocab: list[str]) -> None:
    """A replacement has the base tensor's shape, except for the row count of a resized vocabulary."""
    base_shape = entry.source.shape
    resized = entry.name in vocab and len(info.shape) == len(base_shape) == 2 and info.shape[1] == base_shape[1]
    if info.shape != base_shape and not resized:
        raise UserError(
            f"{adapter.weights}: {info.name!r} has shape {list(info.shape)} but base tensor {entry.name!r} has "
            f"shape {list(base_shape)}; the adapter does not fit this base model")
    if info.dtype not in FLOAT_CODES or entry.source.dtype not in FLOAT_CODES:
        raise UserError(f"{adapter.weights}: {info.name!r} ({info.dtype}) cannot replace {entry.name!r} "
                        f"({entry.source.dtype}); only floating-point tensors can be replaced")


def _resized_vocab(base: BaseModel, adapter: Adapter, entries: dict[str, OutputTensor], embed: str | None,
                   vocab: list[str]) -> int | None:
    """The new vocabulary size when the adapter's embeddings changed row count, else None.

    Every vocabulary tensor of the output must then come from the adapter at the same new size: one left at the
    base's size would not load, and the new rows' values exist only in the adapter.
    """
    resized = [entries[name] for name in vocab if entries[name].shape != entries[name].source.shape]
    if not resized:
        return None
    if embed is None:
        raise UserError(f"{adapter.weights}: {resized[0].replacement.name!r} resizes the vocabulary, but which base "
                        f"tensor of {base.directory} is the input embedding could not be determined")
    rows = {entries[name].shape[0] for name in vocab}
    if len(rows) > 1:
        found = "; ".join(_vocab_source(entries[name]) for name in vocab)
        raise UserError(
            f"{adapter.weights}: the adapter resizes the vocabulary, but the embedding and output head disagree "
            f"on its size: {found}. An adapter trained on a resized vocabulary must hold both resized tensors "
            "(peft saves them with save_embedding_layers=True)")
    return rows.pop()


def _vocab_source(entry: OutputTensor) -> str:
    if entry.replacement is None:
        return f"{entry.name} has {entry.shape[0]} rows (the base's: the adapter does not hold it)"
    return f"{entry.name} has {entry.shape[0]} rows (from {entry.replacement.name!r})"


def _with_vocab_size(config: dict[str, Any], rows: int) -> dict[str, Any]:
    """config.json must announce the resized vocabulary or transformers refuses the weights; multimodal
    configs (gemma3, llava, ...) keep it in ``text_config``."""
    config = dict(config)
    text = config.get("text_config")
    if isinstance(text, dict):
        config["text_config"] = {**text, "vocab_size": rows}
    if "vocab_size" in config or not isinstance(text, dict):
        config["vocab_size"] = rows
    return config


def _attach_lora(entries: dict[str, OutputTensor], base: BaseModel, adapter: Adapter, lora: LoraModule,
                 vocab: list[str]) -> None:
    """Find the weight a LoRA module modifies and decide its layout from the shapes (config only if square)."""
    assert lora.a is not None and lora.b is not None  # guaranteed by load_adapter
    entry = _entry(entries, base, adapter, lora.weight_name, lora.a.name)
    out_features, in_features = lora.b.shape[0], lora.a.shape[1]
    normal, flipped = (out_features, in_features), (in_features, out_features)
    shape = entry.shape
    if entry.name in vocab:
        _refuse_lora_on_other_vocab(adapter, lora, entry, (normal, flipped))
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


def _attach_expert_delta(adapter: Adapter, entry: OutputTensor, delta: ExpertDelta) -> None:
    if entry.lora is not None:
        raise UserError(f"{adapter.weights}: LoRAs {entry.lora.module!r} and {delta.lora.module!r} both adapt "
                        f"{entry.name!r}")
    if entry.shape != entry.source.shape:
        raise UserError(f"{adapter.weights}: {entry.name!r} is both resized and adapted by {delta.lora.module!r}")
    entry.expert = delta


def _refuse_lora_on_other_vocab(adapter: Adapter, lora: LoraModule, entry: OutputTensor,
                                layouts: tuple[tuple[int, int], ...]) -> None:
    """A LoRA that fits the embedding/head but for its row count was trained on a resized vocabulary whose
    resized weight the adapter lacks: say so, rather than blame another base model."""
    shape = entry.shape
    if entry.replacement is not None or len(shape) != 2 or shape in layouts:
        return
    rows = [layout[0] for layout in layouts if layout[1] == shape[1]]
    if rows:
        raise UserError(
            f"{adapter.weights}: LoRA for {lora.module!r} was trained on a vocabulary of {rows[0]} rows, but "
            f"{entry.name!r} has {shape[0]} rows and the adapter does not hold the resized weight; save the adapter "
            "with peft's save_embedding_layers=True (from the run's model, resized to its tokenizer) to merge it")

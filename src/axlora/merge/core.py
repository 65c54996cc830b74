"""``merge_lora``: stream a base checkpoint through the adapter into a new, verified, atomically published model."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from axlora import __version__
from axlora.core.errors import UserError
from axlora.core.names import MERGE_MARKER
from axlora.core.safetensors_header import read_header
from axlora.merge import ops
from axlora.merge.base import BaseModel, load_base, resolve_base_dir
from axlora.merge.expert_merge import ExpertFactors, merge_expert_tensor
from axlora.merge.lora_weights import Adapter, LoraModule, load_adapter
from axlora.merge.mxfp4 import Mxfp4Tensor, read_decoded
from axlora.merge.output import (
    MARKER_FILES_KEY,
    check_output_dir,
    copy_synced,
    publish,
    staging_dir,
    tokenizer_files,
    tokenizer_length,
    write_json,
    written_files,
)
from axlora.merge.safetensors_io import CODE_TO_TORCH, FLOAT_CODES, ShardWriter, TensorReader, plan_shards
from axlora.merge.tensor_map import OutputTensor, OutputTensors, map_output_tensors, parse_dtype

Log = Callable[[str], None]
# Embedding rows may be the tokenizer's length rounded up to one of these (resize_token_embeddings_to_32x, ...).
_VOCAB_MULTIPLES = (1, 32, 64, 128)


class MergeVerificationError(RuntimeError):
    """A merged weight does not reproduce base + adapter on the probe: nothing was published."""


@dataclass(frozen=True)
class MergeReport:
    """What a merge produced; ``max_verify_error`` is None when verification was switched off."""

    output_dir: Path
    merged_modules: int
    max_verify_error: float | None
    total_size: int
    seconds: float
    replaced_tensors: int = 0
    max_abs_error: float | None = None
    dtype: str = "float32"
    shards: int = 0


@dataclass
class _Verifier:
    """Runs the probe checks and keeps the worst errors seen, to report and to fail on."""

    enabled: bool
    tolerance: float | None
    worst_fp32: float = 0.0
    worst_out: float = 0.0
    worst_abs: float = 0.0
    worst_name: str = ""
    checked: int = 0

    def limit(self, dtype: torch.dtype) -> float:
        return self.tolerance if self.tolerance is not None else ops.DEFAULT_TOLERANCE[dtype]

    def check(self, name: str, fp32: ops.ProbeError, out: ops.ProbeError, dtype: torch.dtype) -> None:
        """Fail on the first weight past tolerance: in fp32 before the cast, and as written in ``dtype``."""
        self.checked += 1
        fp32_limit = min(ops.FP32_TOLERANCE, self.limit(dtype))
        if not fp32.relative <= fp32_limit:
            raise MergeVerificationError(
                f"verification failed for {name}: the fp32 merged weight differs from base + adapter by relative "
                f"error {fp32.relative:.3g} (tolerance {fp32_limit:.3g}); the merge arithmetic is wrong, nothing "
                "was written")
        if not out.relative <= self.limit(dtype):
            raise MergeVerificationError(
                f"verification failed for {name}: as {_dtype_name(dtype)} it differs from base + adapter by relative "
                f"error {out.relative:.3g} (tolerance {self.limit(dtype):.3g}); nothing was written. Pass a larger "
                "tolerance only if this precision loss is expected")
        if out.relative >= self.worst_out:
            self.worst_out, self.worst_name = out.relative, name
        self.worst_fp32 = max(self.worst_fp32, fp32.relative)
        self.worst_abs = max(self.worst_abs, out.absolute)


@dataclass
class _Context:
    adapter_reader: TensorReader
    verifier: _Verifier
    expert_factors: ExpertFactors
    base_reader: TensorReader | None = None
    written: dict[str, str] = field(default_factory=dict)

    def reader_for(self, path: Path) -> TensorReader:
        """One base shard open at a time; switching shards closes the previous file."""
        if self.base_reader is None or self.base_reader.path != path:
            if self.base_reader is not None:
                self.base_reader.close()
            self.base_reader = TensorReader(path)
        return self.base_reader


def merge_lora(
    base_model: str | Path,
    adapter_dir: Path,
    output_dir: Path,
    *,
    dtype: str | None = None,
    verify: bool = True,
    tolerance: float | None = None,
    tokenizer_dir: Path | None = None,
    max_shard_size: int = 2 * 1024**3,
    log: Log = print,
) -> MergeReport:
    """Merge a peft LoRA adapter into its base model, one tensor in memory at a time.

    Reads the base's safetensors shards tensor by tensor, adds ``scale * B @ A`` (fp32) to each targeted weight
    (per expert for LoRA on fused MoE expert parameters, ``expert_merge.py``), writes bounded output shards, the index, config, generation config and tokenizer files into a temporary
    sibling of ``output_dir``, then renames it into place. With ``verify`` each merged weight is checked against
    base + adapter on random probe vectors; any failure raises and leaves no output. ``dtype`` (float32, bfloat16,
    float16) overrides the floating tensors' dtype, which otherwise stays the base's own. ``tolerance`` is the
    largest relative probe error accepted in the output dtype (default 1e-4 fp32, 1e-2 bf16, 2e-3 fp16); before
    the cast every weight must also match within 1e-4 in fp32.
    """
    started = time.monotonic()
    out_dtype = parse_dtype(dtype)
    _check_numbers(max_shard_size, tolerance)
    adapter_dir, output_dir = Path(adapter_dir).expanduser(), Path(output_dir).expanduser()
    base_dir = resolve_base_dir(base_model, log)
    inputs = {"base model": base_dir, "adapter": adapter_dir}
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir).expanduser()
        inputs["tokenizer"] = tokenizer_dir
    check_output_dir(output_dir, inputs)  # refuse before minutes of work, and again at publish
    base = load_base(base_dir)
    adapter = load_adapter(adapter_dir)
    _require_finite_adapter(adapter)
    outputs = map_output_tensors(base, adapter, out_dtype)
    tokenizer_sources = _tokenizer_sources(tokenizer_dir, base_dir)
    if outputs.vocab_size is not None:
        _check_tokenizer_fits(outputs.vocab_size, tokenizer_sources, adapter)
    log(f"merging {adapter_dir} into {base_dir}: {outputs.merged_modules} LoRA modules, {outputs.replaced} replaced "
        f"tensors, output {_dtype_name(outputs.output_dtype)}"
        + (" (lm_head untied from the embedding)" if outputs.untied else "")
        + (f" ({decoded} MXFP4 expert tensors decoded)" if (decoded := _decoded_count(outputs)) else "")
        + (f" (vocabulary resized to {outputs.vocab_size})" if outputs.vocab_size is not None else ""))
    verifier = _Verifier(verify, tolerance)
    with staging_dir(output_dir, log) as tmp:
        total_size, shard_count = _write_weights(outputs, adapter, tmp, verifier, max_shard_size, log)
        _write_side_files(outputs, base, tmp, tokenizer_sources)
        report = MergeReport(
            output_dir=output_dir, merged_modules=outputs.merged_modules,
            max_verify_error=verifier.worst_out if verify else None, total_size=total_size,
            seconds=0.0, replaced_tensors=outputs.replaced, max_abs_error=verifier.worst_abs if verify else None,
            dtype=_dtype_name(outputs.output_dtype), shards=shard_count)
        marker = _marker(base_model, base_dir, adapter_dir, report, verifier)
        write_json(tmp / MERGE_MARKER, {**marker, MARKER_FILES_KEY: written_files(tmp)})
        publish(tmp, output_dir, inputs)
    seconds = time.monotonic() - started
    if not verify:
        log("verification skipped (verify=False)")
    else:
        log(f"verified {verifier.checked} merged weights: largest relative error {verifier.worst_out:.3g} as "
            f"{report.dtype} ({verifier.worst_name or 'none'}), {verifier.worst_fp32:.3g} in fp32 before the cast, "
            f"largest absolute error {verifier.worst_abs:.3g}")
    log(f"wrote {output_dir} ({total_size / 1e9:.2f} GB in {shard_count} shards) in {seconds:.1f}s")
    return replace(report, seconds=seconds)


def _decoded_count(outputs: OutputTensors) -> int:
    return sum(isinstance(t.source, Mxfp4Tensor) for t in outputs.tensors)


def _require_finite_adapter(adapter: Adapter) -> None:
    """A diverged run's adapter holds NaN/inf: refuse it as such, before any work (not as a merge failure)."""
    infos, _ = read_header(adapter.weights)
    with TensorReader(adapter.weights) as reader:
        for info in infos:
            if info.dtype in FLOAT_CODES and not ops.all_finite(reader.read(info)):
                raise UserError(f"{adapter.weights}: tensor {info.name} holds NaN/inf; the adapter is broken (a "
                                "training run that diverged?) and cannot be merged; nothing was written")


def _check_numbers(max_shard_size: int, tolerance: float | None) -> None:
    if max_shard_size <= 0:
        raise UserError(f"max_shard_size {max_shard_size}: expected a positive number of bytes")
    if tolerance is not None and not tolerance > 0:
        raise UserError(f"tolerance {tolerance}: expected a positive number")


def _tokenizer_sources(tokenizer_dir: Path | None, base_dir: Path) -> list[Path]:
    """The run's tokenizer (it may have added tokens or a chat template) when given, else the base's."""
    if tokenizer_dir is None:
        return tokenizer_files(base_dir)
    if not tokenizer_dir.is_dir():
        raise UserError(f"{tokenizer_dir}: tokenizer directory not found")
    found = tokenizer_files(tokenizer_dir)
    if not found:
        raise UserError(f"{tokenizer_dir}: expected tokenizer files (tokenizer.json, tokenizer_config.json, ...)")
    return found


def _check_tokenizer_fits(rows: int, tokenizer_sources: list[Path], adapter: Adapter) -> None:
    """A resized vocabulary belongs to the tokenizer it was resized for (the run's, with its added tokens).

    With another one (say the base's) the merged model would have tokens without rows or trained rows no token
    reaches. Rows may exceed the tokenizer's length only by rounding up to a multiple (resize_token_embeddings_to_32x).
    Tokenizers without a tokenizer.json are not checked.
    """
    tokens = tokenizer_length(tokenizer_sources)
    if tokens is None or rows in {-(-tokens // m) * m for m in _VOCAB_MULTIPLES}:
        return
    where = next(p.parent for p in tokenizer_sources if p.name == "tokenizer.json")
    raise UserError(
        f"{adapter.weights}: the adapter's embeddings have {rows} rows (a resized vocabulary), but the tokenizer the "
        f"merged model would get, from {where}, has {tokens} tokens; merge with the tokenizer of the run that "
        "trained this adapter (its tokenizer files saved next to the adapter)")


def _write_weights(outputs: OutputTensors, adapter: Adapter, tmp: Path, verifier: _Verifier, max_shard_size: int,
                   log: Log) -> tuple[int, int]:
    """Write all output shards and the index; returns (total bytes of tensors, shard count)."""
    groups = plan_shards([t.planned for t in outputs.tensors], max_shard_size)
    by_name = {t.name: t for t in outputs.tensors}
    total = sum(t.nbytes for g in groups for t in g)
    weight_map: dict[str, str] = {}
    with TensorReader(adapter.weights) as adapter_reader:
        ctx = _Context(adapter_reader, verifier, ExpertFactors(adapter_reader))
        try:
            for i, group in enumerate(groups, start=1):
                filename = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
                writer = ShardWriter(tmp / filename, group)
                try:
                    for planned in group:
                        _write_tensor(by_name[planned.name], writer, ctx)
                        weight_map[planned.name] = filename
                    writer.close()
                except BaseException:
                    writer.abort()
                    raise
                log(f"  {filename}: {len(group)} tensors, {sum(t.nbytes for t in group) / 1e9:.2f} GB")
        finally:
            if ctx.base_reader is not None:
                ctx.base_reader.close()
    params = sum(math.prod(by_name[n].shape) for n in weight_map)
    index = {"metadata": {"total_size": total, "total_parameters": params},
             "weight_map": dict(sorted(weight_map.items()))}
    write_json(tmp / "model.safetensors.index.json", index)
    return total, len(groups)


def _write_tensor(entry: OutputTensor, writer: ShardWriter, ctx: _Context) -> None:
    """Produce one output tensor (copy, cast, replace and/or merge) and stream it into the shard."""
    if entry.passthrough:
        ctx.reader_for(entry.source.path).copy_raw(entry.source, writer, entry.name)
        return
    out_dtype = CODE_TO_TORCH[entry.dtype]
    if entry.lora is not None:
        tensor = _merge_weight(entry, entry.lora, out_dtype, ctx)
    elif entry.expert is not None:
        tensor = _merge_expert(entry, out_dtype, ctx)
    elif entry.bias_of is not None:
        tensor = _merge_bias(entry, entry.bias_of, out_dtype, ctx)
    else:
        tensor = _load(entry, ctx).to(out_dtype)
    _require_finite(entry, tensor)
    writer.write_tensor(entry.name, tensor)


def _load(entry: OutputTensor, ctx: _Context) -> torch.Tensor:
    """The tensor the output starts from: the adapter's replacement if it has one, else the base tensor."""
    if entry.replacement is not None:
        return ctx.adapter_reader.read(entry.replacement)
    if isinstance(entry.source, Mxfp4Tensor):  # decoded straight to the dtype it is written in
        return read_decoded(entry.source, ctx.reader_for, CODE_TO_TORCH[entry.dtype])
    return ctx.reader_for(entry.source.path).read(entry.source)


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    """Merge arithmetic runs in fp32 (fp64 for fp64 checkpoints, so precision is never lowered)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _merge_weight(entry: OutputTensor, lora: LoraModule, out_dtype: torch.dtype, ctx: _Context) -> torch.Tensor:
    """W + scale * B @ A (DoRA-rescaled if needed) in fp32, cast to the output dtype, probe-checked.

    The tensor is loaded here, not by the caller, so the low-precision original is freed as soon as its fp32
    copy exists (a caller-held reference would keep it alive for the whole merge).
    """
    assert lora.a is not None and lora.b is not None
    tensor = _load(entry, ctx)
    work = _work_dtype(tensor)
    weight = tensor.to(work)  # our own freshly read buffer when already fp32: safe to modify in place
    del tensor
    matrix = ops.matrix_view(weight, entry.transposed)
    lora_a = ctx.adapter_reader.read(lora.a).to(work)
    lora_b = ctx.adapter_reader.read(lora.b).to(work)
    verify = ctx.verifier.enabled
    if verify:
        x = ops.probe_columns(entry.name, matrix.shape[1], work)
        base_out = ops.matmul_fp32(matrix, x)
    ops.add_lora_delta(matrix, lora_a, lora_b, lora.scale)
    factor = None
    if lora.magnitude is not None:
        factor = ops.apply_dora(matrix, ctx.adapter_reader.read(lora.magnitude).to(work))
    out = weight.to(out_dtype)
    if verify:
        reference = ops.reference_output(base_out, x, lora_a, lora_b, lora.scale)
        if factor is not None:
            reference = reference * factor.unsqueeze(1)
        err_fp32 = ops.compare(ops.matmul_fp32(matrix, x), reference)
        err_out = err_fp32 if out is weight else ops.compare(
            ops.matmul_fp32(ops.matrix_view(out, entry.transposed), x), reference)
        ctx.verifier.check(entry.name, err_fp32, err_out, out_dtype)
    return out


def _merge_expert(entry: OutputTensor, out_dtype: torch.dtype, ctx: _Context) -> torch.Tensor:
    """A parameter LoRA (MoE experts): each expert matrix in this tensor merged and probe-checked like a weight."""
    assert entry.expert is not None
    tensor = _load(entry, ctx)
    check = ctx.verifier.check if ctx.verifier.enabled else None
    return merge_expert_tensor(entry.name, tensor, entry.expert, ctx.expert_factors, _work_dtype(tensor), out_dtype,
                               check)


def _merge_bias(entry: OutputTensor, lora: LoraModule, out_dtype: torch.dtype, ctx: _Context) -> torch.Tensor:
    """lora_bias: the base bias plus scale * lora_B.bias, like peft's merge."""
    assert lora.bias is not None
    tensor = _load(entry, ctx)
    work = _work_dtype(tensor)
    bias = tensor.to(work)
    bias.add_(ctx.adapter_reader.read(lora.bias).to(work), alpha=lora.scale)
    return bias.to(out_dtype)


def _require_finite(entry: OutputTensor, tensor: torch.Tensor) -> None:
    """NaN/inf in a written tensor (the adapter was checked finite before): an overflow in the output dtype.

    Checked on every tensor that is computed (not raw-copied), after the cast, so overflow is caught too.
    """
    if not ops.all_finite(tensor):
        raise MergeVerificationError(
            f"{entry.name}: contains NaN or inf as {_dtype_name(tensor.dtype)} (values out of range for this dtype, "
            "or a base weight that holds NaN/inf); nothing was written")


def _write_side_files(outputs: OutputTensors, base: BaseModel, tmp: Path, tokenizer_sources: list[Path]) -> None:
    """config.json (with the output dtype), generation config, remote code, tokenizer files."""
    config = dict(outputs.config)
    dtype_name = _dtype_name(outputs.output_dtype)
    config["dtype"] = dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    write_json(tmp / "config.json", config)
    extras = [base.directory / "generation_config.json"]
    if config.get("auto_map"):
        extras += sorted(base.directory.glob("*.py"))
    for src in extras + tokenizer_sources:
        if src.exists() and not (tmp / src.name).exists():
            copy_synced(src, tmp / src.name)


def _marker(base_model: str | Path, base_dir: Path, adapter_dir: Path, report: MergeReport,
            verifier: _Verifier) -> dict[str, Any]:
    """What identifies this directory as ours (so a later merge may replace it) and how it was made."""
    return {
        "tool": "axlora merge-lora",
        "axlora_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": str(base_model),
        "base_dir": str(base_dir),
        "adapter_dir": str(adapter_dir.resolve()),
        "dtype": report.dtype,
        "merged_modules": report.merged_modules,
        "replaced_tensors": report.replaced_tensors,
        "verified": verifier.enabled,
        "max_verify_error": report.max_verify_error,
        "max_verify_error_fp32": verifier.worst_fp32 if verifier.enabled else None,
        "total_size": report.total_size,
        "pid": os.getpid(),
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")

"""Finding the base model's files and listing its tensors without loading any of them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from axlora.core.errors import UserError
from axlora.core.safetensors_header import TensorInfo, read_header
from axlora.merge.mxfp4 import decoded_tensors, is_mxfp4

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# What a Hub download needs: weights, configs, tokenizer files, remote code. Never *.bin/*.pt duplicates.
HUB_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "vocab*", "merges.txt",
                "*.py"]


@dataclass
class BaseModel:
    """The base checkpoint: its config and every tensor's location, in the order shards are read."""

    directory: Path
    config: dict[str, Any]
    shards: list[Path]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)


def resolve_base_dir(base_model: str | Path, log: Any) -> Path:
    """A local directory is used as is; anything else that looks like a Hub id is downloaded (weights only)."""
    path = Path(base_model).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise UserError(f"{path}: the base model must be a directory with config.json and *.safetensors, not a file")
    text = str(base_model)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or not text.strip():
        raise UserError(f"{text}: base model directory not found")
    log(f"base model {text!r} is not a local directory: fetching its safetensors and configs from the Hub")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=text, allow_patterns=HUB_PATTERNS)).resolve()
    except Exception as e:  # the hub client raises many types; all mean "cannot get this base"
        raise UserError(f"{text}: neither a local directory nor a downloadable Hub model ({e})") from e


def load_base(directory: Path) -> BaseModel:
    """Read config.json and all shard headers; refuses quantized or non-safetensors checkpoints up front.

    MXFP4-packed experts (gpt-oss) are the exception: they are listed as the plain tensors they decode to.
    """
    config = _read_config(directory)
    packed = is_mxfp4(config)
    if not packed:
        _refuse_quantized(directory, config)
    shards = _shard_files(directory)
    base = BaseModel(directory, config, shards)
    for shard in shards:
        infos, _ = read_header(shard)
        for info in infos:
            if info.name in base.tensors:
                raise UserError(f"{shard}: tensor {info.name!r} is also stored in {base.tensors[info.name].path.name}")
            base.tensors[info.name] = info
    _check_index_matches(directory, base)
    if packed:
        base.tensors = decoded_tensors(directory, base.tensors)
    return base


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise UserError(f"{path}: missing; the base model directory must hold a transformers config.json") from e
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from e


def _refuse_quantized(directory: Path, config: dict[str, Any]) -> None:
    """Packed 4/8-bit weights cannot take a full-precision delta; the adapter belongs on the fp base."""
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
        raise UserError(
            f"{directory}: this base model is quantized ({method}); a LoRA/QLoRA adapter is merged into the "
            "full-precision (de-quantized) weights. Pass the original full-precision model as base_model "
            "(e.g. the Hub id the quantized model was made from), not the quantized checkpoint.")


def _shard_files(directory: Path) -> list[Path]:
    """The shard files in read order: from the index when sharded, else the single model.safetensors."""
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{index}: not a valid safetensors index (expected a 'weight_map') ({e})") from e
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise UserError(f"{index}: lists shard(s) that do not exist in {directory}: {', '.join(missing)}")
        return [directory / n for n in names]
    single = directory / SINGLE_FILE
    if single.is_file():
        return [single]
    others = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt*"))
    hint = f" (found {', '.join(others[:3])}: convert the checkpoint to safetensors first)" if others else ""
    raise UserError(f"{directory}: expected {INDEX_FILE} or {SINGLE_FILE}{hint}")


def _check_index_matches(directory: Path, base: BaseModel) -> None:
    """An index naming tensors its shards lack means a broken download; better to stop than merge half a model."""
    index = directory / INDEX_FILE
    if not index.exists():
        return
    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    for name, shard in weight_map.items():
        info = base.tensors.get(name)
        if info is None or info.path.name != shard:
            raise UserError(f"{index}: says {name!r} is in {shard}, but that shard does not hold it")

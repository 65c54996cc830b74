"""The plan ``axlora validate`` prints: what a train run would do, worked out without importing torch."""

from __future__ import annotations

import json
import math
from pathlib import Path

from axlora.config.datasets import DatasetConfig, data_files_location
from axlora.config.fsdp import fsdp_settings
from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.core.names import is_builtin_model
from axlora.model.adapter_choice import resolve_adapter


def count_local_rows(dataset: DatasetConfig) -> int | None:
    """Rows in a local JSON/JSONL file (None for other sources: counted when the data is prepared)."""
    names = [dataset.path] if dataset.path is not None else dataset.file_names()
    path = Path(names[0])
    if len(names) != 1 or not path.is_file() or dataset.split != "train":
        return None
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as handle:
            return sum(1 for line in handle if line.strip())
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: not valid JSON: {exc}") from None
        return len(data) if isinstance(data, list) else None
    return None


def _dataset_location(dataset: DatasetConfig) -> str:
    """local, Hugging Face Hub, or local files (an entry without path); a missing local path is an error."""
    if dataset.path is None:
        return data_files_location(dataset)
    path = Path(dataset.path)
    if not path.exists() and (path.is_absolute() or dataset.path.startswith(".")):
        raise UserError(f"datasets: '{dataset.path}' not found.")
    return "local" if path.exists() else "Hugging Face Hub"


def describe_plan(config: Config) -> str:
    """A readable summary: model, adapter case, datasets, batch and steps."""
    lines = [f"base_model: {config.base_model}" + (" (built-in demo model)" if is_builtin_model(config.base_model) else "")]
    lines.append(resolve_adapter(config).describe())
    total_rows: int | None = 0
    for dataset in config.datasets:
        where = _dataset_location(dataset)
        rows = count_local_rows(dataset)
        lines.append(f"dataset: {dataset.label} ({where}, type {dataset.type or 'pre-tokenized'}, split {dataset.split}"
                     + (f", {rows} rows)" if rows is not None else ")"))
        total_rows = None if rows is None or total_rows is None else total_rows + rows
    for corpus in config.pretraining_dataset or ():
        where = "local" if Path(corpus.path).exists() or corpus.data_files else "Hugging Face Hub"
        lines.append(f"pretraining_dataset: {corpus.path} ({where}, streamed while training, column "
                     f"{corpus.text_column}" + (f", skipping {corpus.skip} documents)" if corpus.skip else ")"))
    per_step = config.effective_batch_per_process()
    lines.append(f"batch: {config.micro_batch_size} micro x {config.gradient_accumulation_steps} accumulation "
                 f"= {per_step} rows per step per process"
                 + (", packed into rows of " + str(config.sequence_len) + " tokens" if config.sample_packing else ""))
    if config.max_steps is not None:
        lines.append(f"steps: {config.max_steps} (max_steps)")
    elif total_rows is not None and not config.sample_packing:
        val = config.val_row_count(total_rows)
        steps = math.ceil(config.num_epochs * math.ceil((total_rows - val) / per_step))
        lines.append(f"steps: {steps} ({config.num_epochs:g} epochs of {total_rows - val} rows, {val} held out)")
    else:
        lines.append(f"steps: {config.num_epochs:g} epochs (step count known once the data is prepared)")
    lines += [f"training: {feature}" for feature in _training_features(config)]
    lines.append(f"output_dir: {config.output_dir}")
    if config.resume_from_checkpoint:
        lines.append(f"resume_from_checkpoint: {config.resume_from_checkpoint}")
    processes = f"{config.num_processes or 'every visible GPU (else 1)'} process(es) per machine"
    fsdp = fsdp_settings(config)
    lines.append(f"hardware: {processes} x {config.num_machines} machine(s)"
                 + (f", DeepSpeed {config.deepspeed}" if config.deepspeed else "")
                 + (f", FSDP2 {fsdp.describe()} per {', '.join(fsdp.layer_classes or ['decoder layer'])}"
                    if fsdp else ""))
    lines += [f"note: {note}" for note in (fsdp.notes if fsdp else ())]
    return "\n".join(lines)


def _training_features(config: Config) -> list[str]:
    """What makes this run more than next-token LoRA training: objectives, restarts, initialisation, layouts."""
    features = []
    if config.diffusion is not None:
        features.append("masked diffusion objective (diffusion): answer tokens masked at a random rate, "
                        "bidirectional attention")
    if config.block_diffusion is not None:
        features.append("block diffusion of DiffusionGemma (block_diffusion): the response denoised in canvases")
    if config.restart_steps() is not None:
        what = "LoRA merged into the base and restarted" if config.merges_lora() else "learning rate restarted"
        features.append(f"{what} every {config.restart_steps()} steps (ReLoRA)")
    if config.loftq() is not None:
        features.append(f"LoftQ initialisation: base weights quantized to {config.loftq().loftq_bits} bits, the LoRA "
                        "starting from what quantization lost")
    quantization = config.model_quantization_config
    if quantization is not None and not isinstance(quantization, str):
        features.append(f"base weights in torchao {quantization.weight_dtype}")
    if config.expert_parallel_size > 1:
        features.append(f"experts split over groups of {config.expert_parallel_size} processes (expert parallelism)")
    if config.use_otel_metrics:
        features.append(f"metrics served at http://{config.otel_metrics_host}:{config.otel_metrics_port}/metrics")
    return features

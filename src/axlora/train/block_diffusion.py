"""Block-diffusion training steps for DiffusionGemma (``block_diffusion``), on the recipe's data order and parallel.

Each micro batch: split the rows into prefix and canvas, draw t per row, corrupt the canvas, optionally run a
no-grad forward whose logits condition the real one (self-conditioning), and score the corrupted tokens
(``block_diffusion_loss``). A step's loss is the sum of the row losses over every row of the step (all micro
batches, all processes) that has a corrupted token, divided by that global count: the same objective whatever the
micro batch, accumulation and process count. Every draw comes from a generator seeded by (seed, step, process,
micro batch), so a resumed run draws what the uninterrupted one drew.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from axlora.config.schema import Config
from axlora.model.diffusion_gemma import canvas_length
from axlora.train.block_diffusion_canvas import CanvasShape, canvas_batch
from axlora.train.block_diffusion_loss import Corruption, corrupt_canvas, row_losses, sample_timesteps
from axlora.train.step import StepResult

EVAL_STREAM = 1 << 40  # generator streams of evaluation, apart from every training step's


@dataclass(frozen=True)
class BlockDiffusionObjective:
    """What a block-diffusion step needs from the config and the model."""

    shape: CanvasShape
    corruption: Corruption
    weighting: str
    self_conditioning_prob: float
    seed: int


def start_block_diffusion(config: Config, peft_model, tokenizer, say) -> BlockDiffusionObjective | None:
    """The objective of a ``block_diffusion`` run (None otherwise).

    The adapter is saved without peft's causal-LM task type: plain ``PeftModel.from_pretrained`` then wraps
    DiffusionGemma as it is, instead of a causal-LM wrapper that needs token-by-token generation.
    """
    settings = config.block_diffusion
    if settings is None:
        return None
    for adapter_config in peft_model.peft_config.values():
        adapter_config.task_type = None
    base = peft_model.get_base_model()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else base.config.get_text_config().pad_token_id
    shape = CanvasShape(canvas_length(base, config), int(pad or 0), tokenizer.bos_token_id)
    corruption = Corruption(settings.corruption, base.config.get_text_config().vocab_size, settings.mask_token_id,
                            settings.timestep_eps)
    say(f"objective: block diffusion, canvas {shape.canvas_length} tokens, t in [{settings.timestep_eps}, 1], "
        f"self-conditioning p={settings.self_conditioning_prob}")
    return BlockDiffusionObjective(shape, corruption, settings.loss_weighting, settings.self_conditioning_prob,
                                   config.seed)


def _generator(objective: BlockDiffusionObjective, *stream: int) -> torch.Generator:
    seed = objective.seed
    for part in stream:
        seed = (seed * 1_000_003 + part + 1) % (1 << 62)
    return torch.Generator().manual_seed(seed)


def _corrupted_batch(objective: BlockDiffusionObjective, rows, generator: torch.Generator) -> dict[str, Any]:
    batch = canvas_batch(rows, objective.shape, generator)
    batch["t"] = sample_timesteps(len(rows), objective.corruption.timestep_eps, generator)
    batch["noised"], batch["corrupted"] = corrupt_canvas(batch["canvas"], batch["eligible"], batch["t"],
                                                         objective.corruption, generator)
    batch["self_condition"] = bool(torch.rand((), generator=generator) < objective.self_conditioning_prob)
    return batch


def _row_losses(model, objective: BlockDiffusionObjective, batch: dict[str, Any], device):
    """The forward(s) of one micro batch: ``(weighted loss per row, corrupted-token CE sums)``."""
    inputs = {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": batch["attention_mask"].to(device),
        "decoder_input_ids": batch["noised"].to(device),
        "decoder_attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(batch["canvas"])], 1).to(device),
        "decoder_position_ids": batch["canvas_positions"].to(device),
    }
    conditioning = None
    if batch["self_condition"]:
        with torch.no_grad():
            conditioning = model(**inputs).logits.detach()
    logits = model(**inputs, self_conditioning_logits=conditioning).logits
    return row_losses(logits, batch["canvas"], batch["corrupted"], batch["t"], objective.weighting)


def block_diffusion_step(objective: BlockDiffusionObjective, model, parallel, order, step: int, rows,
                         max_grad_norm) -> StepResult:
    """One optimizer step of block diffusion (see the module docstring for the normalization)."""
    accelerator = parallel.accelerator
    rank = accelerator.process_index
    chunks = order.micro_batches(step, rank)
    batches = [_corrupted_batch(objective, [rows[i] for i in chunk], _generator(objective, step, rank, index))
               for index, chunk in enumerate(chunks)]
    scored = sum(int(batch["corrupted"].any(dim=1).sum()) for batch in batches)
    counts = torch.tensor([scored, sum(b["tokens"] for b in batches), sum(int(b["corrupted"].sum()) for b in batches)],
                          device=accelerator.device, dtype=torch.long)
    if accelerator.num_processes > 1:
        counts = accelerator.reduce(counts, reduction="sum")
    denominator = max(int(counts[0]), 1)
    passes = [(batch, 1.0) for batch in batches]
    fillers = order.micro_batch_count(step) - len(batches)
    if fillers:  # every rank runs as many forwards as the busiest (sharded weights are gathered per forward)
        filler_rows = [rows[i] for i in (chunks[-1] if chunks else order.step_rows(step)[:1])]
        passes += [(_corrupted_batch(objective, filler_rows, _generator(objective, step, rank, -1)), 0.0)] * fillers
    totals = torch.zeros(2, device=accelerator.device, dtype=torch.float32)  # loss sum, corrupted-token CE sum
    for index, (batch, weight) in enumerate(passes):
        with parallel.micro_step(last=index == len(passes) - 1), accelerator.autocast():
            losses, ce_sums = _row_losses(model, objective, batch, accelerator.device)
            loss = losses.sum() / denominator
            parallel.backward(loss * (accelerator.num_processes * weight))
        totals += torch.stack([loss.detach().float(), ce_sums.detach().sum().float()]) * weight
    grad_norm = parallel.finish_step(max_grad_norm)
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    token_ce = float(totals[1]) / max(int(counts[2]), 1)
    return StepResult(float(totals[0]), grad_norm, int(counts[1]), int(counts[2]), {"token_ce": token_ce})


def block_diffusion_evaluate(objective: BlockDiffusionObjective, model, accelerator, rows,
                             micro_batch_size: int) -> float:
    """The block-diffusion loss over all validation rows, with the same draws at every evaluation."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # loss sum, rows scored
    mine = list(range(accelerator.process_index, len(rows), accelerator.num_processes))
    chunks = [mine[start:start + micro_batch_size] for start in range(0, len(mine), micro_batch_size)]
    passes = math.ceil(math.ceil(len(rows) / accelerator.num_processes) / micro_batch_size)  # rank 0's forwards
    with torch.no_grad():
        for index in range(passes):
            chunk = chunks[index] if index < len(chunks) else [0]
            batch = _corrupted_batch(objective, [rows[i] for i in chunk], _generator(objective, EVAL_STREAM, chunk[0]))
            with accelerator.autocast():
                losses, _ = _row_losses(model, objective, batch, accelerator.device)
            if index < len(chunks):
                totals += torch.stack([losses.sum().double(), batch["corrupted"].any(dim=1).sum().double()
                                       .to(totals.device)])
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    model.train()
    return float(totals[0] / totals[1].clamp(min=1))

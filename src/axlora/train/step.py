"""One optimizer step and one evaluation pass, both normalized by label tokens across all processes.

Every rank runs as many forwards as the busiest one: under FSDP and ZeRO-3 each forward gathers weights
from all ranks, so a rank that skipped one would leave the others waiting. The extra forwards run on a
filler batch whose loss counts zero.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from axlora.data.collate import model_inputs
from axlora.data.diffusion_collate import diffusion_inputs, step_collator
from axlora.train.data_order import DataOrder


class StepResult(NamedTuple):
    """One optimizer step's figures, summed over all processes."""

    loss: float  # sum of token losses / the step's global label-token count
    grad_norm: float  # before clipping; nan when not clipped
    tokens: int
    label_tokens: int
    figures: dict[str, float] | None = None  # preference tuning: rewards and log-probs per side (TRL's names)


def train_step(model, parallel, order: DataOrder, step: int, rows, collate, max_grad_norm, loss_mode,
               router_aux_loss_coef: float | None = None) -> StepResult:
    """One optimizer step; the loss is normalized by the label tokens of the whole step on all ranks.

    The last step of an epoch may give ranks different numbers of micro batches (or none); the missing
    ones run on a filler batch with weight zero. With ``router_aux_loss_coef`` each micro batch's loss also holds
    that coefficient times the MoE router's load-balancing loss (the model adds it, see ``router_aux``); the
    logged loss stays the token loss, and the router loss is logged as ``aux_loss``.
    """
    import torch

    accelerator = parallel.accelerator
    chunks = order.micro_batches(step, accelerator.process_index)
    collate = step_collator(collate, step, accelerator.process_index)  # diffusion: this step's own masks
    micro_batches = [collate([rows[i] for i in chunk]) for chunk in chunks]
    local = sum(batch["num_label_tokens"] for batch in micro_batches)
    tokens = sum(len(rows[i]["input_ids"]) for chunk in chunks for i in chunk)
    counts = torch.tensor([local, tokens], device=accelerator.device, dtype=torch.long)
    if accelerator.num_processes > 1:
        counts = accelerator.reduce(counts, reduction="sum")
    global_label_tokens, global_tokens = int(counts[0]), int(counts[1])
    passes = [(batch, 1.0) for batch in micro_batches]
    fillers = order.micro_batch_count(step) - len(micro_batches)
    if fillers:
        filler = collate([rows[i] for i in (chunks[-1] if chunks else order.step_rows(step)[:1])])
        passes += [(filler, 0.0)] * fillers
    router = {"output_router_logits": True} if router_aux_loss_coef else {}
    step_loss = torch.zeros((), device=accelerator.device, dtype=torch.float32)
    aux = torch.zeros(2, device=accelerator.device, dtype=torch.float32)  # router loss sum, micro batches
    for index, (batch, weight) in enumerate(passes):
        with parallel.micro_step(last=index == len(passes) - 1), accelerator.autocast(), loss_mode():
            out = model(**model_inputs(batch, accelerator.device, include_labels=True),
                        num_items_in_batch=max(global_label_tokens, 1), **router,
                        **diffusion_inputs(batch, accelerator.device))
            # gradients are averaged over ranks (DDP, FSDP, ZeRO); scale up so the result is the global token mean
            parallel.backward(out.loss * (accelerator.num_processes * weight))
        token_loss = out.loss.detach().float()
        if router:
            router_loss = out.aux_loss.detach().float().to(token_loss.device)
            token_loss = token_loss - router_aux_loss_coef * router_loss
            aux += torch.stack([router_loss * weight, torch.tensor(weight, device=aux.device)])
        step_loss += token_loss * weight
    grad_norm = parallel.finish_step(max_grad_norm)
    if accelerator.num_processes > 1:
        step_loss = accelerator.reduce(step_loss, reduction="sum")
        aux = accelerator.reduce(aux, reduction="sum") if router else aux
    figures = {"aux_loss": float(aux[0] / aux[1].clamp(min=1))} if router else None
    return StepResult(float(step_loss), grad_norm, global_tokens, global_label_tokens, figures)


def evaluate(model, accelerator, rows, collate, micro_batch_size: int) -> float:
    """Mean token loss over all validation rows (sum of token losses / label tokens)."""
    import torch

    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    mine = list(range(accelerator.process_index, len(rows), accelerator.num_processes))
    chunks = [mine[start:start + micro_batch_size] for start in range(0, len(mine), micro_batch_size)]
    # rank 0 holds the most rows: every rank runs as many forwards, the extra ones on row 0, not counted
    passes = math.ceil(math.ceil(len(rows) / accelerator.num_processes) / micro_batch_size)
    with torch.no_grad():
        for index in range(passes):
            chunk = chunks[index] if index < len(chunks) else [0]
            batch = collate([rows[i] for i in chunk])
            with accelerator.autocast():
                out = model(**model_inputs(batch, accelerator.device, include_labels=True), num_items_in_batch=1,
                            **diffusion_inputs(batch, accelerator.device))
            if index < len(chunks):
                total += out.loss.double()
                count += batch["num_label_tokens"]
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, reduction="sum")
        count = accelerator.reduce(count, reduction="sum")
    model.train()
    return float(total / count.clamp(min=1))

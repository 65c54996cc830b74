"""One preference-tuning step and one evaluation pass: the objective of ``rl`` on batched chosen / rejected
answers, the loss normalized by the step's global pair count across micro batches and processes.

As in ``step.train_step``, every rank runs as many forwards as the busiest one (a filler batch of weight zero),
and the loss is scaled so that the gradients averaged over ranks are those of the global mean.
The figures (rewards per side, their margin, how often chosen beats rejected, log-probs per side) are sums over
pairs, reduced over processes, then divided by the global pair count: TRL's names and meanings.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

from axlora.config.schema import Config
from axlora.train import preference_loss as objectives
from axlora.train.data_order import DataOrder
from axlora.train.preference_batch import PreferenceBatch, answer_logps, split_sides
from axlora.train.preference_loss import PairLoss, SideLogps
from axlora.train.step import StepResult

FIGURES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


@dataclass
class PreferenceObjective:
    """The loss of ``config.rl`` on a batch; the reference comes with the rows (precomputed) or, for a fresh
    LoRA, from the same model with its adapter disabled (``disabled_adapter``)."""

    config: Config
    disabled_adapter: Any = None  # a context manager factory, when the reference is computed at each step

    def pair_losses(self, model, batch: PreferenceBatch, device) -> tuple[Any, dict[str, Any]]:
        """Each pair's loss (with gradient) and the per-pair figures (detached)."""
        config = self.config
        weighted = config.rl == "dpo" and config.dpo_use_weighting
        policy, weights = answer_logps(model, batch, device, with_weights=weighted)
        chosen, rejected = split_sides(policy, batch.pairs)
        if config.rl == "simpo":
            result = objectives.simpo_loss(chosen, rejected, config.beta(), config.simpo_gamma, config.cpo_alpha,
                                           config.dpo_label_smoothing)
        elif config.rl == "orpo":
            result = objectives.orpo_loss(chosen, rejected, config.orpo_alpha)
        else:
            ref_chosen, ref_rejected = split_sides(self.reference(model, batch, device, policy), batch.pairs)
            result = objectives.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, config.beta(),
                                         config.dpo_variant(), config.dpo_label_smoothing)
            if weights is not None:
                result = result._replace(loss=result.loss * objectives.wpo_weights(*weights.split(batch.pairs)))
        return result.loss, _figures(result, chosen, rejected)

    def reference(self, model, batch: PreferenceBatch, device, policy: SideLogps) -> SideLogps:
        """The reference log-probs of the batch's sequences."""
        import torch

        if batch.ref_logps is not None:
            return SideLogps(batch.ref_logps.to(device), policy.tokens)
        assert self.disabled_adapter is not None
        with torch.no_grad(), self.disabled_adapter():
            reference, _ = answer_logps(model, batch, device)
        return SideLogps(reference.logps.detach(), policy.tokens)


def _figures(result: PairLoss, chosen: SideLogps, rejected: SideLogps) -> dict[str, Any]:
    return {
        "rewards/chosen": result.chosen_rewards,
        "rewards/rejected": result.rejected_rewards,
        "rewards/margins": result.chosen_rewards - result.rejected_rewards,
        "rewards/accuracies": (result.chosen_rewards > result.rejected_rewards).float(),
        "logps/chosen": chosen.logps.detach(),
        "logps/rejected": rejected.logps.detach(),
    }


def preference_step(objective: PreferenceObjective, model, parallel, order: DataOrder, step: int, rows, collate,
                    max_grad_norm: float) -> StepResult:
    """One optimizer step: the sum of pair losses over the step's micro batches on all ranks / global pairs."""
    import torch

    accelerator = parallel.accelerator
    chunks = order.micro_batches(step, accelerator.process_index)
    batches = [collate([rows[i] for i in chunk]) for chunk in chunks]
    tokens = sum(len(rows[i]["prompt_ids"]) * 2 + len(rows[i]["chosen_ids"]) + len(rows[i].get("rejected_ids", ()))
                 for chunk in chunks for i in chunk)
    answer_tokens = sum(int((batch.labels != -100).sum()) for batch in batches)
    counts = torch.tensor([sum(batch.pairs for batch in batches), tokens, answer_tokens], device=accelerator.device)
    if accelerator.num_processes > 1:
        counts = accelerator.reduce(counts, reduction="sum")
    pairs = max(int(counts[0]), 1)
    passes = [(batch, 1.0) for batch in batches]
    fillers = order.micro_batch_count(step) - len(batches)
    if fillers:
        filler = collate([rows[i] for i in (chunks[-1] if chunks else order.step_rows(step)[:1])])
        passes += [(filler, 0.0)] * fillers
    sums = torch.zeros(len(FIGURES) + 1, device=accelerator.device, dtype=torch.float64)
    for index, (batch, weight) in enumerate(passes):
        with parallel.micro_step(last=index == len(passes) - 1), accelerator.autocast():
            losses, figures = objective.pair_losses(model, batch, accelerator.device)
            parallel.backward(losses.sum() / pairs * (accelerator.num_processes * weight))
        sums += _sums(losses, figures) * weight
    grad_norm = parallel.finish_step(max_grad_norm)
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    means = (sums / pairs).tolist()
    return StepResult(means[0], grad_norm, int(counts[1]), int(counts[2]), dict(zip(FIGURES, means[1:], strict=True)))


def _sums(losses, figures: dict[str, Any]):
    import torch

    return torch.stack([losses.detach().double().sum()] + [figures[name].double().sum() for name in FIGURES])


def preference_evaluate(objective: PreferenceObjective, model, accelerator, rows, collate,
                        micro_batch_size: int) -> dict[str, float]:
    """``eval_loss`` and the eval figures: means over all validation pairs."""
    import torch

    model.eval()
    sums = torch.zeros(len(FIGURES) + 1, dtype=torch.float64, device=accelerator.device)
    mine = list(range(accelerator.process_index, len(rows), accelerator.num_processes))
    chunks = [mine[start:start + micro_batch_size] for start in range(0, len(mine), micro_batch_size)]
    passes = math.ceil(math.ceil(len(rows) / accelerator.num_processes) / micro_batch_size)
    with torch.no_grad():
        for index in range(passes):
            batch = collate([rows[i] for i in (chunks[index] if index < len(chunks) else [0])])
            with accelerator.autocast():
                losses, figures = objective.pair_losses(model, batch, accelerator.device)
            if index < len(chunks):
                sums += _sums(losses, figures)
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    model.train()
    means = (sums / max(len(rows), 1)).tolist()
    return {"eval_loss": means[0], **{f"eval_{name}": value for name, value in zip(FIGURES, means[1:], strict=True)}}


def no_loss_patch() -> contextlib.AbstractContextManager:
    """Preference losses read the logits themselves: no change to the model's own loss."""
    return contextlib.nullcontext()

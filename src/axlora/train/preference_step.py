"""One preference-tuning step and one evaluation pass: the objective of ``rl`` on batched chosen / rejected
answers (KTO: labelled completions), the loss normalized by the step's global row count across micro batches
and processes.

As in ``step.train_step``, every rank runs as many forwards as the busiest one (a filler batch of weight zero),
and the loss is scaled so that the gradients averaged over ranks are those of the global mean.
The figures (``preference_figures``: rewards per side, their margin, how often chosen beats rejected, log-probs
per side, KTO's KL estimate) are sums reduced over processes, then divided by their global counts: TRL's names
and meanings.

KTO's KL estimate z0 (Ethayarajh et al. 2024, as TRL computes it) is the mean, over a batch, of the policy's
minus the reference's log-prob of completions paired with the wrong prompt, at least 0 and without gradient.
Here the batch is the whole optimizer step on all processes (TRL: one micro batch), so micro batch size,
accumulation and process count do not change it; its forwards run before the step's loss forwards.
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
from axlora.train.preference_figures import figure_means, figure_names, figure_sums, kto_figures, pair_figures
from axlora.train.preference_loss import SideLogps
from axlora.train.step import StepResult


@dataclass
class PreferenceObjective:
    """The loss of ``config.rl`` on a batch; the reference comes with the rows (precomputed) or, for a fresh
    LoRA, from the same model with its adapter disabled (``disabled_adapter``)."""

    config: Config
    disabled_adapter: Any = None  # a context manager factory, when the reference is computed at each step
    deferred_reference: str | None = None  # FSDP / ZeRO-3: "adapter" or "base", until the weights are placed
    reference_checkpointed: bool = False  # ZeRO-3: the rows' reference log-probs travel with each checkpoint

    @property
    def figure_names(self) -> tuple[str, ...]:
        return figure_names(self.config.rl)

    def pair_losses(self, model, batch: PreferenceBatch, device, kl=None) -> tuple[Any, dict[str, Any]]:
        """Each pair's (KTO: completion's) loss with gradient, and the per-row figures (detached); ``kl``: KTO's
        z0 for the step (``kl_estimate``)."""
        config = self.config
        weighted = config.rl == "dpo" and config.dpo_use_weighting
        policy, weights = answer_logps(model, batch, device, with_weights=weighted)
        if config.rl == "kto":
            desirable = batch.desirable.to(device)
            result = objectives.kto_loss(policy, self.reference(model, batch, device, policy), desirable, kl,
                                         config.beta(), config.kto_desirable_weight, config.kto_undesirable_weight)
            return result.loss, kto_figures(result, policy, desirable)
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
        return result.loss, pair_figures(result, chosen, rejected)

    def reference(self, model, batch: PreferenceBatch, device, policy: SideLogps) -> SideLogps:
        """The reference log-probs of the batch's sequences."""
        import torch

        if batch.ref_logps is not None:
            return SideLogps(batch.ref_logps.to(device), policy.tokens)
        assert self.disabled_adapter is not None
        with torch.no_grad(), self.disabled_adapter():
            reference, _ = answer_logps(model, batch, device)
        return SideLogps(reference.logps.detach(), policy.tokens)

    def kl_estimate(self, model, accelerator, passes: list[tuple[PreferenceBatch, float]]):
        """KTO's z0 over ``passes`` on all processes (None for the other methods): every rank runs its passes'
        forwards, fillers (weight 0) included, so sharded weights gather in step."""
        import torch

        if self.config.rl != "kto":
            return None
        sums = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
        with torch.no_grad():
            for batch, weight in passes:
                mismatched = batch.mismatched
                assert mismatched is not None
                with accelerator.autocast():
                    policy, _ = answer_logps(model, mismatched, accelerator.device)
                    reference = self.reference(model, mismatched, accelerator.device, policy)
                sums += torch.stack([(policy.logps - reference.logps).double().sum(),
                                     sums.new_tensor(float(batch.pairs))]) * weight
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, reduction="sum")
        return (sums[0] / sums[1].clamp(min=1)).clamp(min=0).float()


def _row_tokens(row: dict[str, Any]) -> int:
    """Tokens a row puts through the model with gradient: the prompt once per answer, and the answers."""
    answers = [row["chosen_ids"]] + ([row["rejected_ids"]] if "rejected_ids" in row else [])
    return sum(len(row["prompt_ids"]) + len(answer) for answer in answers)


def preference_step(objective: PreferenceObjective, model, parallel, order: DataOrder, step: int, rows, collate,
                    max_grad_norm: float) -> StepResult:
    """One optimizer step: the sum of pair losses over the step's micro batches on all ranks / global pairs."""
    import torch

    accelerator = parallel.accelerator
    chunks = order.micro_batches(step, accelerator.process_index)
    batches = [collate([rows[i] for i in chunk]) for chunk in chunks]
    tokens = sum(_row_tokens(rows[i]) for chunk in chunks for i in chunk)
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
    kl = objective.kl_estimate(model, accelerator, passes)
    names = objective.figure_names
    sums = torch.zeros(2 * len(names) + 1, device=accelerator.device, dtype=torch.float64)
    for index, (batch, weight) in enumerate(passes):
        with parallel.micro_step(last=index == len(passes) - 1), accelerator.autocast():
            losses, figures = objective.pair_losses(model, batch, accelerator.device, kl)
            parallel.backward(losses.sum() / pairs * (accelerator.num_processes * weight))
        sums += figure_sums(names, losses, figures) * weight
    grad_norm = parallel.finish_step(max_grad_norm)
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    loss, means = figure_means(names, sums.tolist(), pairs)
    if kl is not None:
        means["kl"] = float(kl)
    return StepResult(loss, grad_norm, int(counts[1]), int(counts[2]), means)


def preference_evaluate(objective: PreferenceObjective, model, accelerator, rows, collate,
                        micro_batch_size: int) -> dict[str, float]:
    """``eval_loss`` and the eval figures: means over all validation pairs (KTO: z0 over all of them)."""
    import torch

    model.eval()
    mine = list(range(accelerator.process_index, len(rows), accelerator.num_processes))
    chunks = [mine[start:start + micro_batch_size] for start in range(0, len(mine), micro_batch_size)]
    count = math.ceil(math.ceil(len(rows) / accelerator.num_processes) / micro_batch_size)
    passes = [(collate([rows[i] for i in (chunks[index] if index < len(chunks) else [0])]),
               1.0 if index < len(chunks) else 0.0) for index in range(count)]
    kl = objective.kl_estimate(model, accelerator, passes)
    names = objective.figure_names
    sums = torch.zeros(2 * len(names) + 1, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for batch, weight in passes:
            with accelerator.autocast():
                losses, figures = objective.pair_losses(model, batch, accelerator.device, kl)
            sums += figure_sums(names, losses, figures) * weight
    if accelerator.num_processes > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    model.train()
    loss, means = figure_means(names, sums.tolist(), len(rows))
    if kl is not None:
        means["kl"] = float(kl)
    return {"eval_loss": loss, **{f"eval_{name}": value for name, value in means.items()}}


def no_loss_patch() -> contextlib.AbstractContextManager:
    """Preference losses read the logits themselves: no change to the model's own loss."""
    return contextlib.nullcontext()

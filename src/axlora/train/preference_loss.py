"""The preference objectives as pure functions of per-sequence log-probs (TRL's formulas, Axolotl's keys).

Each takes, per pair (KTO: per completion), the summed token log-probs of the answers and their token counts
under the policy (and under the reference where the method has one), and returns each pair's loss with the
rewards the metrics report. The step sums the per-pair losses and divides by the step's global pair count, so
micro batches, accumulation and processes do not change what is optimized.

* DPO (Rafailov et al. 2023): z = beta * ((pi_c - pi_r) - (ref_c - ref_r)); sigmoid loss
  -(1 - eps) log s(z) - eps log s(-z) (eps: ``dpo_label_smoothing``, conservative DPO); ``hinge``:
  relu(1 - z); ``robust`` (Chowdhury et al. 2024): the sigmoid loss unbiased for flipped labels,
  (-(1 - eps) log s(z) + eps log s(-z)) / (1 - 2 eps). Rewards: beta * (pi - ref) per answer.
* IPO (Azar et al. 2023): (h - 1 / (2 beta))^2 with h the log-ratio difference of token-mean log-probs.
* SimPO (Meng et al. 2024): -log s(beta * (avg_c - avg_r) - gamma) on token-mean log-probs, no reference,
  plus ``cpo_alpha`` times the chosen answer's token-mean NLL (TRL's CPO trainer). Rewards: beta * avg.
* ORPO (Hong et al. 2024): the chosen answer's token-mean NLL minus lambda * log s(log odds(c) - log odds(r)),
  odds(y) = p / (1 - p) with p the token-mean probability; lambda = ``orpo_alpha``. Rewards: lambda * avg.
* KTO (Ethayarajh et al. 2024): desirable 1 - s(beta * (r - z0)), undesirable 1 - s(beta * (z0 - r)), weighted
  by ``kto_desirable_weight`` / ``kto_undesirable_weight``; r = pi - ref, z0 the batch's KL estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from torch import Tensor


class PairLoss(NamedTuple):
    """Per pair: the loss, and the rewards of the chosen and rejected answers (detached)."""

    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


@dataclass(frozen=True)
class SideLogps:
    """Summed token log-probs of each answer on one side (chosen or rejected), and its token counts."""

    logps: Tensor
    tokens: Tensor

    def mean(self) -> Tensor:
        return self.logps / self.tokens.clamp(min=1)


def _sigmoid_loss(z: Tensor, smoothing: float) -> Tensor:
    import torch.nn.functional as F

    return -F.logsigmoid(z) * (1 - smoothing) - F.logsigmoid(-z) * smoothing


def dpo_loss(chosen: SideLogps, rejected: SideLogps, ref_chosen: SideLogps, ref_rejected: SideLogps, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> PairLoss:
    """DPO and its variants (``dpo_loss_type``); ``ipo`` compares token-mean log-probs."""
    import torch
    import torch.nn.functional as F

    if loss_type == "ipo":
        h = (chosen.mean() - rejected.mean()) - (ref_chosen.mean() - ref_rejected.mean())
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        z = beta * ((chosen.logps - rejected.logps) - (ref_chosen.logps - ref_rejected.logps))
        if loss_type == "sigmoid":
            loss = _sigmoid_loss(z, label_smoothing)
        elif loss_type == "hinge":
            loss = torch.relu(1 - z)
        elif loss_type == "robust":
            loss = (-F.logsigmoid(z) * (1 - label_smoothing) + F.logsigmoid(-z) * label_smoothing) / (
                1 - 2 * label_smoothing)
        else:
            raise ValueError(f"unknown DPO loss type {loss_type!r}")
    return PairLoss(loss, (beta * (chosen.logps - ref_chosen.logps)).detach(),
                    (beta * (rejected.logps - ref_rejected.logps)).detach())


def simpo_loss(chosen: SideLogps, rejected: SideLogps, beta: float, gamma: float, cpo_alpha: float,
               label_smoothing: float = 0.0) -> PairLoss:
    """SimPO with TRL's ``simpo_gamma`` (the margin, in reward units) and ``cpo_alpha`` NLL term."""
    avg_chosen, avg_rejected = chosen.mean(), rejected.mean()
    z = beta * (avg_chosen - avg_rejected) - gamma
    loss = _sigmoid_loss(z, label_smoothing) - cpo_alpha * avg_chosen
    return PairLoss(loss, (beta * avg_chosen).detach(), (beta * avg_rejected).detach())


def orpo_loss(chosen: SideLogps, rejected: SideLogps, alpha: float) -> PairLoss:
    """ORPO: the chosen NLL plus ``alpha`` times the odds-ratio loss."""
    import torch
    import torch.nn.functional as F

    avg_chosen, avg_rejected = chosen.mean(), rejected.mean()
    log_odds = (avg_chosen - avg_rejected) - (torch.log1p(-torch.exp(avg_chosen).clamp(max=1 - 1e-7))
                                              - torch.log1p(-torch.exp(avg_rejected).clamp(max=1 - 1e-7)))
    loss = -avg_chosen - alpha * F.logsigmoid(log_odds)
    return PairLoss(loss, (alpha * avg_chosen).detach(), (alpha * avg_rejected).detach())


def kto_loss(completion: SideLogps, ref_completion: SideLogps, desirable: Tensor, kl: Tensor, beta: float,
             desirable_weight: float, undesirable_weight: float) -> PairLoss:
    """KTO per completion; ``chosen_rewards`` holds each completion's reward, ``rejected_rewards`` the same
    (the caller splits them by ``desirable``)."""
    import torch

    reward = completion.logps - ref_completion.logps
    kl = kl.detach()
    loss = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (reward - kl))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (kl - reward))))
    rewards = (beta * reward).detach()
    return PairLoss(loss, rewards, rewards)


def wpo_weights(chosen_weight_logps: Tensor, rejected_weight_logps: Tensor) -> Tensor:
    """``dpo_use_weighting`` (WPO, Zhou et al. 2024): each pair's weight exp(w_c + w_r), at most 1, where w is an
    answer's token-mean log-prob renormalized by the policy's sum of squared probabilities (TRL's formula)."""
    import torch

    return torch.clamp(torch.exp(chosen_weight_logps + rejected_weight_logps), max=1).detach()

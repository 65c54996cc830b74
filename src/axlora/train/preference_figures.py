"""The figures a preference step reports, in TRL's names: each a sum over the rows it describes and a count of
those rows, summed over micro batches and processes, then divided.

For pairs every figure describes every pair. KTO has no pairs: ``rewards/chosen`` and ``logps/chosen`` are
means over the desirable completions, ``rewards/rejected`` and ``logps/rejected`` over the undesirable ones,
and ``kl`` is the step's estimate z0. ``rewards/margins`` is the chosen mean minus the rejected mean; a figure
whose rows the step did not have (a KTO step of desirable completions only) is left out of the row.
"""

from __future__ import annotations

from typing import Any

from axlora.train.preference_loss import PairLoss, SideLogps

PAIR_FIGURES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected")
KTO_FIGURES = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")


def figure_names(rl: str | None) -> tuple[str, ...]:
    return KTO_FIGURES if rl == "kto" else PAIR_FIGURES


def pair_figures(result: PairLoss, chosen: SideLogps, rejected: SideLogps) -> dict[str, tuple[Any, Any]]:
    """Per pair: each figure's value and whether it counts (always)."""
    import torch

    every = torch.ones_like(result.chosen_rewards)
    return {
        "rewards/chosen": (result.chosen_rewards, every),
        "rewards/rejected": (result.rejected_rewards, every),
        "rewards/accuracies": ((result.chosen_rewards > result.rejected_rewards).float(), every),
        "logps/chosen": (chosen.logps.detach(), every),
        "logps/rejected": (rejected.logps.detach(), every),
    }


def kto_figures(result: PairLoss, completion: SideLogps, desirable) -> dict[str, tuple[Any, Any]]:
    """Per completion: the chosen figures count the desirable ones, the rejected figures the others."""
    wanted, unwanted = desirable.float(), (~desirable).float()
    return {
        "rewards/chosen": (result.chosen_rewards, wanted),
        "rewards/rejected": (result.rejected_rewards, unwanted),
        "logps/chosen": (completion.logps.detach(), wanted),
        "logps/rejected": (completion.logps.detach(), unwanted),
    }


def figure_sums(names: tuple[str, ...], losses, figures: dict[str, tuple[Any, Any]]):
    """[loss sum, then per figure: the sum of its counted values, the count] as one float64 tensor."""
    import torch

    parts = [losses.detach().double().sum()]
    for name in names:
        values, counted = figures[name]
        parts += [(values.double() * counted.double()).sum(), counted.double().sum()]
    return torch.stack(parts)


def figure_means(names: tuple[str, ...], sums: list[float], rows: int) -> tuple[float, dict[str, float]]:
    """The mean loss over ``rows`` and each figure's mean over its own rows (reduced ``figure_sums``)."""
    means = {}
    for index, name in enumerate(names):
        total, count = sums[1 + 2 * index], sums[2 + 2 * index]
        if count > 0:
            means[name] = total / count
    if "rewards/chosen" in means and "rewards/rejected" in means:
        means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
    return sums[0] / max(rows, 1), means

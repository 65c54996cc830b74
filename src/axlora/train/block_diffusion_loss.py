"""The block-diffusion objective as pure functions of tensors: draw t, corrupt the canvas, weight the loss.

At time ``t`` in ``[eps, 1]`` each eligible canvas token (a response token, not padding) is corrupted with
probability ``t``: replaced by a uniformly drawn vocabulary token (``uniform``, how DiffusionGemma's sampler starts
a canvas) or by the mask token (``mask``). The decoder is trained to restore the corrupted tokens; a row's loss is
its mean cross-entropy over them, times ``1/t`` (``elbo``) or 1 (``uniform``). Rows with nothing corrupted add
nothing and are not counted. All draws come from an explicit generator, so a step is a function of its seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Corruption:
    """How the canvas is corrupted: ``uniform`` over ``vocab_size`` tokens, or ``mask`` with ``mask_token_id``."""

    kind: str
    vocab_size: int
    mask_token_id: int | None = None
    timestep_eps: float = 1e-3


def sample_timesteps(rows: int, eps: float, generator: torch.Generator) -> torch.Tensor:
    """One diffusion time per row, uniform in ``[eps, 1]``."""
    return torch.rand(rows, generator=generator) * (1.0 - eps) + eps


def corrupt_canvas(canvas: torch.Tensor, eligible: torch.Tensor, timesteps: torch.Tensor, corruption: Corruption,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(noised canvas, corrupted positions)``: each eligible token is corrupted with its row's probability ``t``."""
    draws = torch.rand(canvas.shape, generator=generator)
    corrupted = (draws < timesteps[:, None]) & eligible.bool()
    if corruption.kind == "uniform":
        noise = torch.randint(0, corruption.vocab_size, canvas.shape, generator=generator, dtype=canvas.dtype)
    else:
        assert corruption.mask_token_id is not None
        noise = torch.full_like(canvas, corruption.mask_token_id)
    return torch.where(corrupted, noise, canvas), corrupted


def row_losses(logits: torch.Tensor, canvas: torch.Tensor, corrupted: torch.Tensor, timesteps: torch.Tensor,
               weighting: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weighted loss per row, cross-entropy summed over each row's corrupted tokens)``.

    A row's loss is ``w(t) * mean CE over its corrupted tokens`` with ``w(t) = 1/t`` (elbo) or 1 (uniform); a row
    with no corrupted token has loss 0. The batch's objective is the sum of row losses over the rows that have a
    corrupted token, divided by their count (the caller counts them across micro batches and processes).
    """
    rows, length, vocab = logits.shape
    token_ce = F.cross_entropy(logits.reshape(-1, vocab).float(), canvas.reshape(-1).to(logits.device),
                               reduction="none").reshape(rows, length)
    mask = corrupted.to(token_ce.device, token_ce.dtype)
    ce_sums = (token_ce * mask).sum(dim=-1)
    mean_ce = ce_sums / mask.sum(dim=-1).clamp(min=1.0)
    weight = 1.0 / timesteps if weighting == "elbo" else torch.ones_like(timesteps)
    return mean_ce * weight.to(mean_ce.device), ce_sums

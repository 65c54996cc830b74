"""Preference rows in one forward: chosen and rejected answers batched together after their shared prompt,
and each answer's summed token log-probs read off the logits.

A batch of n pairs is 2n sequences, chosen first then rejected, padded on the right; only the answer
tokens count (the prompt is masked). KTO rows are n sequences, one completion each, with a second batch of
the same prompts followed by mismatched completions (``kl_ids``) for the KL estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from axlora.core.names import IGNORE_INDEX
from axlora.train.preference_loss import SideLogps


@dataclass
class PreferenceBatch:
    input_ids: Any
    attention_mask: Any
    labels: Any
    pairs: int  # rows in the batch (pairs, or KTO completions)
    ref_logps: Any | None  # precomputed reference log-probs, one per sequence, when the rows carry them
    desirable: Any | None = None  # KTO labels
    mismatched: PreferenceBatch | None = None  # KTO: each prompt with another row's completion (the KL estimate)


@dataclass(frozen=True)
class PreferenceCollator:
    """Pads the answers of ``rows`` (after their prompts) into one batch."""

    pad_token_id: int

    def __call__(self, rows: list[dict[str, Any]]) -> PreferenceBatch:
        import torch

        if "label" not in rows[0]:
            return self._pad(rows, ["chosen_ids", "rejected_ids"], 0)
        batch = self._pad(rows, ["chosen_ids"], 0)
        batch.desirable = torch.tensor([row["label"] for row in rows])
        batch.mismatched = self._pad(rows, ["kl_ids"], 1)
        return batch

    def _pad(self, rows: list[dict[str, Any]], sides: list[str], ref_index: int) -> PreferenceBatch:
        """The answers named by ``sides`` after their prompts, side by side; ``ref_index``: where the rows'
        precomputed reference log-probs of the first side sit in ``ref_logps``."""
        import torch

        sequences = [(row["prompt_ids"], row[side]) for side in sides for row in rows]
        width = max(len(prompt) + len(answer) for prompt, answer in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(sequences), width), dtype=torch.long)
        for index, (prompt, answer) in enumerate(sequences):
            length = len(prompt) + len(answer)
            input_ids[index, :length] = torch.tensor(prompt + answer)
            labels[index, len(prompt):length] = torch.tensor(answer)
            attention[index, :length] = 1
        ref = None
        if "ref_logps" in rows[0]:
            ref = torch.tensor([row["ref_logps"][ref_index + side] for side in range(len(sides)) for row in rows],
                               dtype=torch.float32)
        return PreferenceBatch(input_ids, attention, labels, len(rows), ref)


def answer_logps(model, batch: PreferenceBatch, device, with_weights: bool = False) -> tuple[SideLogps, Any]:
    """Summed log-probs of each sequence's answer tokens and their counts; with ``with_weights`` also WPO's
    per-sequence token-mean of log p - log sum(p^2) (no gradient)."""
    import torch

    out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
    logits = out.logits[:, :-1].float()
    labels = batch.labels[:, 1:].to(device)
    mask = labels != IGNORE_INDEX
    log_probs = logits.log_softmax(-1)
    token_logps = torch.gather(log_probs, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    tokens = mask.sum(-1)
    weights = None
    if with_weights:
        with torch.no_grad():
            adjusted = (token_logps - torch.logsumexp(2 * log_probs, dim=-1)) * mask
            weights = adjusted.sum(-1) / tokens.clamp(min=1)
    return SideLogps(token_logps.sum(-1), tokens), weights


def split_sides(values: SideLogps, pairs: int) -> tuple[SideLogps, SideLogps]:
    """The chosen half and the rejected half of a pair batch's sequences."""
    return (SideLogps(values.logps[:pairs], values.tokens[:pairs]),
            SideLogps(values.logps[pairs:], values.tokens[pairs:]))

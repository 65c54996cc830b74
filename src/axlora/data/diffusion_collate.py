"""The forward (noising) process of masked diffusion training, applied to a collated batch.

Each document (a row, or each sample of a packed row) draws its own noise level ``t ~ U(0, 1)`` and masking
probability ``p = (1 - floor) * t + floor``. Every answer token of it (label != -100) is replaced by the mask
token with probability ``p``, except bos/eos/pad ids (as Axolotl keeps them) and a document's first token (its
prediction is read from the position before it, which belongs to another document or to none). Prompt and
padding tokens always stay visible.

The batch then holds what the masked-diffusion loss needs, in the keys the model already takes:

* ``input_ids``: the noised tokens;
* ``labels``: the original token at each masked position, -100 elsewhere; the loss reads the logits of the
  position before it (a causal LM's head predicts the next token, so that is where its knowledge of token j
  sits, as in Axolotl and Dream);
* ``attention_mask``: a 4-D mask, bidirectional inside each document and closed between documents (sdpa: bool;
  eager: additive float). transformers uses a 4-D mask as it is, so packed documents stay isolated without
  packing detection; ``position_ids`` still restart at each document for the rotary embeddings;
* ``diffusion_weights``: each masked token's loss weight (1 / p for importance weighting);
* ``num_label_tokens``: the denominator (answer tokens, or masked tokens for ``masked_token_mean``).

Training masks come from a generator seeded by the run's seed, the step, the process and the micro batch
(``mask_seed``), never from torch's global generator, which every process seeds alike: so each process draws its
own masks for its own rows, and a resumed run masks every later step as the uninterrupted run did. Evaluation
seeds a generator from the seed and the batch's tokens, so every evaluation masks the same validation batch the
same way and eval losses are comparable.
"""

from __future__ import annotations

import hashlib
import itertools
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from axlora.core.names import IGNORE_INDEX

WEIGHTS_KEY = "diffusion_weights"
"""Batch key (and model keyword) of the per-token loss weights."""

FLASH_ONLY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


@dataclass(frozen=True)
class NoisePlan:
    """How a batch is noised; ``seed`` is the run's, from which every batch's masks are drawn."""

    mask_token_id: int
    keep_visible: tuple[int, ...]  # token ids never masked (bos, eos, pad)
    noise_floor: float = 1e-3
    weighting: str = "inv_t"  # inv_t: 1 / p, linear: 1 - p, none: 1
    reduction: str = "supervised_token_mean"  # or masked_token_mean
    attention: str = "sdpa"  # sdpa: bool mask; eager: additive float mask
    seed: int = 0


def document_ids(position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Which document each token belongs to (1, 2, ... along the row); padding of a padded row is document 0.

    A document starts wherever the position restarts at 0, which is how packed rows (and their padding tails)
    mark their samples.
    """
    documents = torch.cumsum((position_ids == 0).long(), dim=1)
    if attention_mask is not None and attention_mask.dim() == 2:
        documents = torch.where(attention_mask.bool(), documents, torch.zeros_like(documents))
    return documents


def document_attention(documents: torch.Tensor, attention: str) -> torch.Tensor:
    """``(batch, 1, L, L)``: a token sees every token of its own document and nothing else."""
    same = (documents[:, :, None] == documents[:, None, :])[:, None]
    if attention == "eager":  # eager adds the mask to the scores
        return torch.zeros(same.shape, dtype=torch.float32).masked_fill_(~same, torch.finfo(torch.float32).min)
    return same


def masking_probability(documents: torch.Tensor, floor: float, generator: torch.Generator | None) -> torch.Tensor:
    """Per token: its document's ``p = (1 - floor) * t + floor``, one ``t ~ U(0, 1)`` per document."""
    rows, length = documents.shape
    t = torch.rand((rows, length + 1), generator=generator)  # at most length documents per row, plus padding
    return ((1.0 - floor) * t + floor).gather(1, documents)


def loss_weights(p: torch.Tensor, weighting: str) -> torch.Tensor:
    if weighting == "inv_t":
        return 1.0 / p
    if weighting == "linear":
        return 1.0 - p
    return torch.ones_like(p)


def noise_batch(batch: Mapping[str, Any], plan: NoisePlan, generator: torch.Generator | None = None) -> dict[str, Any]:
    """The masked-diffusion version of a collated batch (see the module docstring)."""
    input_ids, labels, position_ids = batch["input_ids"], batch["labels"], batch["position_ids"]
    documents = document_ids(position_ids, batch.get("attention_mask"))
    answer = labels != IGNORE_INDEX
    eligible = answer & (position_ids != 0) & ~torch.isin(input_ids, torch.tensor(plan.keep_visible, dtype=torch.long))
    p = masking_probability(documents, plan.noise_floor, generator)
    masked = eligible & (torch.rand(input_ids.shape, generator=generator) < p)
    denominator = masked if plan.reduction == "masked_token_mean" else answer
    out = {key: value for key, value in batch.items() if key not in FLASH_ONLY_KEYS}
    out.update(
        input_ids=torch.where(masked, torch.full_like(input_ids, plan.mask_token_id), input_ids),
        labels=torch.where(masked, input_ids, torch.full_like(input_ids, IGNORE_INDEX)),
        attention_mask=document_attention(documents, plan.attention),
        num_label_tokens=int(denominator.sum()),
    )
    out[WEIGHTS_KEY] = torch.where(masked, loss_weights(p, plan.weighting), torch.zeros_like(p)).float()
    return out


def batch_seed(seed: int, input_ids: torch.Tensor) -> int:
    """A seed fixed by the run's seed and the batch's tokens: the same batch is masked the same way each time."""
    return (seed * 1_000_003 + zlib.crc32(input_ids.numpy().tobytes())) % (2**63)


def mask_seed(seed: int, step: int, process_index: int, micro_batch: int) -> int:
    """The seed of one training micro batch's masks: a hash, so nearby positions give unrelated streams."""
    key = f"{seed}/{step}/{process_index}/{micro_batch}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % (2**63)


class DiffusionCollator:
    """Collates with the run's own collator, then noises the batch (``noise_batch``).

    Called as it is, it masks a batch by its tokens (evaluation); ``for_step`` gives a training step's collator.
    """

    def __init__(self, base: Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]], plan: NoisePlan):
        self.base = base
        self.plan = plan

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch = self.base(rows)
        return self._noised(batch, batch_seed(self.plan.seed, batch["input_ids"]))

    def for_step(self, step: int, process_index: int) -> Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]:
        """The collator of one training step on one process: its n-th call is the step's n-th micro batch."""
        micro_batches = itertools.count()

        def collate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
            return self._noised(self.base(rows), mask_seed(self.plan.seed, step, process_index, next(micro_batches)))

        return collate

    def _noised(self, batch: dict[str, Any], seed: int) -> dict[str, Any]:
        return noise_batch(batch, self.plan, torch.Generator().manual_seed(seed))


def step_collator(collate: Callable, step: int, process_index: int) -> Callable:
    """The collator a training step calls: with ``diffusion:`` one whose masks are this step's, this process's
    and each micro batch's own; any other collator as it is."""
    return collate.for_step(step, process_index) if isinstance(collate, DiffusionCollator) else collate


def diffusion_inputs(batch: Mapping[str, Any], device: torch.device | str | None = None) -> dict[str, Any]:
    """The loss weights as a model keyword (transformers hands forward keywords on to ``loss_function``)."""
    weights = batch.get(WEIGHTS_KEY)
    if weights is None:
        return {}
    return {WEIGHTS_KEY: weights.to(device) if device is not None else weights}

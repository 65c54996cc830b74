"""``chunked_cross_entropy``: the causal-LM loss without ever holding the whole logits tensor.

A transformers model computes ``lm_head(hidden)`` for every token, upcasts the logits to float32 and
then takes the cross-entropy: with a 128k vocabulary that is 0.5 MB per token, several GB for a packed
micro batch, plus as much again for its gradient. Here the head's projection, the loss and both
gradients are computed chunk by chunk in one pass, for label tokens only (prompt tokens masked with
``train_on_inputs: false`` never reach the 128k-wide matmul), and only ``d loss / d hidden`` (the size
of the hidden states) is kept for the backward pass. The loss is the same sum over label tokens divided
by ``num_items_in_batch`` that transformers' ``ForCausalLMLoss`` computes.

It is wired in without replacing modules (adapter file names stay as peft writes them): while active,
the output head's forward passes the hidden states through and the model's ``loss_function`` is this
module's, so the forward still runs through DDP/DeepSpeed wrappers and their hooks.
"""

from __future__ import annotations

import contextlib
import math

import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from axlora.core.errors import UserError
from axlora.core.names import IGNORE_INDEX

# model families whose forward is exactly loss_function(lm_head(hidden)): no logit scaling or soft-capping
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "gemma")


class _LinearCrossEntropy(torch.autograd.Function):
    """``scale * sum_i CE(hidden_i @ weight.T, target_i)`` over targets != -100, gradients made in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, scale: float, num_chunks: int):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        size = max(1, math.ceil(hidden.shape[0] / num_chunks))
        for start in range(0, hidden.shape[0], size):
            rows = start + torch.nonzero(targets[start:start + size] != IGNORE_INDEX).squeeze(1)
            if rows.numel() == 0:
                continue
            h, t = hidden[rows], targets[rows]
            logits = (h @ weight.t()).float()  # as transformers: projection in the model's dtype, loss in fp32
            log_norm = logits.logsumexp(dim=-1)
            total += (log_norm - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_hidden or need_weight:
                grad_logits = (logits - log_norm[:, None]).exp_()  # softmax
                grad_logits[torch.arange(t.numel(), device=t.device), t] -= 1.0
                grad_logits = (grad_logits * scale).to(hidden.dtype)
                if need_hidden:
                    grad_hidden[rows] = grad_logits @ weight
                if need_weight:
                    grad_weight += (grad_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None,
            (grad_weight * grad_output).to(ctx.weight_dtype) if grad_weight is not None else None,
            None, None, None,
        )


def linear_cross_entropy(hidden, weight, targets, num_items: float | None = None, num_chunks: int = 8):
    """Mean (or, with ``num_items``, sum / num_items) token cross-entropy of ``hidden @ weight.T`` vs ``targets``."""
    count = num_items if num_items is not None else int((targets != IGNORE_INDEX).sum())
    return _LinearCrossEntropy.apply(hidden, weight, targets, 1.0 / max(float(count), 1.0), num_chunks)


class ChunkedCrossEntropy:
    """Switches a causal LM between its own logits+loss and the chunked loss (``with loss.active():``)."""

    def __init__(self, causal_lm, num_chunks: int):
        check_supported(causal_lm)
        self.head = causal_lm.get_output_embeddings()
        self.num_chunks = num_chunks
        self._active = False
        project = self.head.forward
        self.head.forward = lambda hidden: hidden if self._active else project(hidden)
        causal_lm.loss_function = self.loss

    @contextlib.contextmanager
    def active(self):
        self._active = True
        try:
            yield
        finally:
            self._active = False

    def loss(self, logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = IGNORE_INDEX,
             shift_labels=None, **kwargs):
        if not self._active:  # generation, or a forward outside the training step: the model's own loss
            return ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels,
                                   **kwargs)
        hidden = logits  # the head passed the hidden states through
        if shift_labels is None:
            shift_labels = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        targets = shift_labels.reshape(-1).to(hidden.device)
        return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.head.weight, targets,
                                    None if num_items_in_batch is None else float(num_items_in_batch),
                                    self.num_chunks)


def check_supported(causal_lm) -> None:
    """Refuse models whose logits are more than ``lm_head(hidden)``, and an adapted head."""
    model_type = getattr(causal_lm.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"chunked_cross_entropy: not supported for model_type '{model_type}' (its logits may be "
                        f"scaled or soft-capped); supported: {', '.join(SUPPORTED_MODEL_TYPES)}.")
    if type(causal_lm.get_output_embeddings()) is not torch.nn.Linear:
        raise UserError("chunked_cross_entropy: the output head (lm_head) is adapted (LoRA target or "
                        "lora_modules_to_save); remove it from those or turn chunked_cross_entropy off.")

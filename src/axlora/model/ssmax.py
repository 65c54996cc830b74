"""``scaling_softmax``: Scalable-Softmax attention (SSMax, arXiv 2501.19399) with Axolotl's definition.

The attention logits of the query at position p (0-based, within its own sequence: packed sequences restart at 0)
are multiplied by ``s * log(n) + b`` with ``n = max(p + 1, 2)``: the number of keys a causal query sees, so longer
contexts get sharper attention and the softmax does not flatten out. ``s`` is ``scaling_softmax_factor`` (0.43) and
``b`` ``scaling_softmax_bias`` (0); the factor applies before the mask and any logit soft-capping, as in Axolotl.

The factor depends on the query only, so scaling each query vector by it scales its logits exactly: the model's own
attention kernel (SDPA, eager, flash or flex) then runs unchanged on the scaled queries. The wrapper is registered
with transformers' attention interface under ``ssmax_<kernel>`` and the model switched to it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial

import torch

from axlora.config.schema import Config


def ssmax_factors(positions: torch.Tensor, factor: float, bias: float) -> torch.Tensor:
    """``s * log(max(p + 1, 2)) + b`` for each 0-based query position ``p``."""
    return factor * torch.log((positions.float() + 1).clamp(min=2.0)) + bias


def query_positions(query: torch.Tensor, key: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """(batch, queries) positions: the model's ``position_ids`` (which restart in each packed sequence), else the
    queries' places among the keys (the last ``queries`` of them, as with a cache)."""
    if position_ids is not None:
        return position_ids.expand(query.shape[0], -1)
    queries, keys = query.shape[-2], key.shape[-2]
    return torch.arange(keys - queries, keys, device=query.device).expand(query.shape[0], -1)


def ssmax_attention(kernel: Callable, factor: float, bias: float, module, query, key, value, attention_mask,
                    **kwargs):
    """``kernel`` (a transformers attention function) on queries scaled by their SSMax factor."""
    positions = query_positions(query, key, kwargs.get("position_ids"))
    scale = ssmax_factors(positions, factor, bias).to(query.dtype)[:, None, :, None]  # (batch, 1, queries, 1)
    return kernel(module, query * scale, key, value, attention_mask, **kwargs)


def use_ssmax(model, config: Config, log: Callable[[str], None]) -> str:
    """Register SSMax around the model's attention kernel and switch the model to it; returns the new name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    base = model.config._attn_implementation or "sdpa"
    if base == "eager":  # each model defines its own eager attention (soft-capping, sinks, ...)
        kernel = sys.modules[type(model).__module__].eager_attention_forward
    else:
        kernel = ALL_ATTENTION_FUNCTIONS[base]
    name = "ssmax_" + base.replace("/", "_")
    AttentionInterface.register(name, partial(ssmax_attention, kernel, config.scaling_softmax_factor,
                                              config.scaling_softmax_bias))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    model.set_attn_implementation(name)
    log(f"attention: SSMax (scaling_softmax: logits x {config.scaling_softmax_factor:g} * log(n) "
        f"{config.scaling_softmax_bias:+g}) around {base}")
    return name

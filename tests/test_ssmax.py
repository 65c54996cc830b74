"""``scaling_softmax`` (SSMax): attention logits of the query at position p times s*log(max(p+1, 2)) + b, checked
against a computation by hand and through a real model's attention kernels."""

from __future__ import annotations

import math

import pytest
import torch

from axlora.config.load import load_config
from axlora.core.errors import ConfigError
from axlora.model.load import load_base_model
from axlora.model.ssmax import ssmax_attention


def _by_hand(query, key, value, positions, factor, bias, scaling):
    """Causal attention within each packed sequence, logits scaled per query position as Axolotl defines SSMax."""
    batch, heads, length, _ = query.shape
    out = torch.zeros_like(query)
    for b in range(batch):
        starts = [i for i in range(length) if positions[b, i] == 0]
        for h in range(heads):
            for i in range(length):
                first = max(s for s in starts if s <= i)
                scale = factor * math.log(max(positions[b, i].item() + 1, 2)) + bias
                logits = torch.stack([query[b, h, i] @ key[b, h, j] * scaling * scale for j in range(first, i + 1)])
                weights = torch.softmax(logits, dim=0)
                out[b, h, i] = sum(w * value[b, h, j] for w, j in zip(weights, range(first, i + 1), strict=True))
    return out.transpose(1, 2)


def test_ssmax_attention_matches_a_hand_computation_on_packed_rows():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    query, key, value = (torch.randn(2, 2, 7, 4) for _ in range(3))
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 0, 1, 2, 3]])  # the second row packs two sequences
    sequence = torch.tensor([[0] * 7, [0, 0, 0, 1, 1, 1, 1]])
    allowed = (sequence[:, :, None] == sequence[:, None, :]) & torch.ones(7, 7, dtype=torch.bool).tril()
    mask = torch.zeros(2, 1, 7, 7).masked_fill(~allowed[:, None], float("-inf"))

    class Module(torch.nn.Module):
        is_causal, num_key_value_groups = False, 1

    scaling = 0.5
    out, _ = ssmax_attention(sdpa_attention_forward, 0.43, 0.25, Module(), query, key, value, mask,
                             scaling=scaling, position_ids=positions)
    torch.testing.assert_close(out, _by_hand(query, key, value, positions, 0.43, 0.25, scaling), rtol=1e-5,
                               atol=1e-5)


def _logits(make_config, **keys):
    lines: list[str] = []
    model = load_base_model(load_config(make_config(**keys), log=lambda _n: None), torch.float32, log=lines.append)
    ids = torch.arange(1, 25).reshape(2, 12)
    with torch.no_grad():
        return model(input_ids=ids).logits, model, lines


def test_ssmax_runs_inside_the_model_around_its_own_kernel(make_config):
    plain, _, _ = _logits(make_config)
    ssmax, model, lines = _logits(make_config, scaling_softmax=True)
    assert model.config._attn_implementation == "ssmax_sdpa"
    assert "attention: SSMax (scaling_softmax: logits x 0.43 * log(n) +0) around sdpa" in lines
    assert not torch.allclose(ssmax, plain, atol=1e-4)
    eager, model, _ = _logits(make_config, scaling_softmax=True, attn_implementation="eager")
    assert model.config._attn_implementation == "ssmax_eager"
    torch.testing.assert_close(eager, ssmax, rtol=1e-4, atol=1e-4)  # the same SSMax whichever kernel runs it
    identity, _, _ = _logits(make_config, scaling_softmax=True, scaling_softmax_factor=0.0, scaling_softmax_bias=1.0)
    torch.testing.assert_close(identity, plain, rtol=1e-5, atol=1e-5)  # s=0, b=1: every logit times 1


def test_ssmax_settings_without_ssmax_are_refused(make_config):
    with pytest.raises(ConfigError, match="scaling_softmax_factor: sets SSMax attention"):
        load_config(make_config(scaling_softmax_factor=0.5), log=lambda _n: None)

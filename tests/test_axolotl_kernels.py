"""Axolotl's kernel switches: the kernel where its package and a CUDA GPU are present, else the model's own code
with one line naming the switch and what is missing; the model computes the same thing either way."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from axlora.config.load import load_config
from axlora.model.load import load_base_model

KERNELS = {"liger_rope": True, "liger_rms_norm": True, "liger_rms_norm_gated": True, "liger_glu_activation": True,
           "liger_fused_linear_cross_entropy": True, "cut_cross_entropy": True, "use_kernels": True,
           "fused_attn_kernel": True, "gemma4_hybrid_attn_impl": True, "attn_implementation": "flash_attention_2"}
NO_KERNEL_HERE = not torch.cuda.is_available() or not all(
    importlib.util.find_spec(m) for m in ("liger_kernel", "cut_cross_entropy", "kernels"))


def loss_of(model) -> torch.Tensor:
    ids = torch.arange(1, 17).reshape(2, 8)
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss


@pytest.mark.skipif(not NO_KERNEL_HERE, reason="the kernels can run on this machine")
def test_missing_kernels_run_the_models_own_code_and_say_so_once(make_config):
    plain = load_base_model(load_config(make_config(), log=lambda _n: None), torch.float32, log=lambda _m: None)
    config = load_config(make_config(**KERNELS), log=lambda _n: None)
    lines: list[str] = []
    model = load_base_model(config, torch.float32, log=lines.append)
    notes = [line for line in lines if line.startswith("note: ")]
    assert len(notes) == 4, lines  # liger (all switches in one line), cut_cross_entropy, use_kernels, fused_attn_kernel
    assert any(n.startswith("note: liger_rope, liger_rms_norm, liger_rms_norm_gated, liger_glu_activation, "
                            "liger_fused_linear_cross_entropy: liger-kernel is not installed") for n in notes)
    assert any(n.startswith("note: cut_cross_entropy: cut-cross-entropy is not installed") for n in notes)
    assert any(n.startswith("note: use_kernels: the kernels package is not installed") for n in notes)
    assert any(n.startswith("note: fused_attn_kernel:") for n in notes)
    # the Gemma 4 hybrid asks for flash attention on some layers: SDPA runs on all of them, named
    assert any(line.startswith("attention: sdpa (gemma4_hybrid_attn_impl: SDPA on every layer") for line in lines)
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(loss_of(model), loss_of(plain))

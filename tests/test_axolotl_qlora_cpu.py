"""QLoRA for real without a GPU: bitsandbytes (0.48 and later) quantizes NF4 and runs Linear4bit on a CPU torch."""

from __future__ import annotations

import pytest

from conftest import run_cli, train_ok

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def tiny_64(tmp_path_factory):
    """bitsandbytes quantizes in blocks of 64 inputs: the 32-wide test model is too narrow for its CPU kernels."""
    from axlora.model.builtin import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny64", hidden_size=64, num_layers=2)


@pytest.mark.slow
def test_qlora_trains_on_cpu_and_its_adapter_loads_and_merges(make_config, tiny_64, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = make_config(base_model=str(tiny_64), adapter="qlora", max_steps=2, gradient_checkpointing=True)
    result = train_ok(path)
    assert "quantization: base weights in 4-bit NF4 (double quantization)" in result.stdout + result.stderr
    final = tmp_path / "out" / "final"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_64), str(final))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.isfinite(p).all() for p in lora_b) and any(p.abs().sum() > 0 for p in lora_b)
    merged = run_cli("merge-lora", str(path))
    assert merged.returncode == 0, merged.stderr[-2000:]
    AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged")


def test_fsdp_with_a_4bit_base_validates_and_stores_packed_weights_in_the_compute_dtype(make_config):
    import torch

    from axlora.config.load import load_config
    from axlora.core.errors import UserError
    from axlora.model.load import bitsandbytes_config
    from axlora.model.machine import require_machine_support

    config = load_config(make_config(adapter="qlora", fsdp=["full_shard", "auto_wrap"], num_processes=2,
                                     fsdp_config={"fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}),
                         log=lambda _n: None)
    assert bitsandbytes_config(config, 4, torch.bfloat16).bnb_4bit_quant_storage == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"fsdp / load_in_4bit: FSDP with a 4-bit base \(FSDP-QLoRA\) needs CUDA"):
            require_machine_support(config)


def test_an_evaluation_leaves_the_4bit_layers_trainable(make_config, tiny_64):
    """bitsandbytes' CPU inference repacking (no backward) must not happen between training steps."""
    import torch

    from axlora.config.load import load_config
    from axlora.model.adapter import attach_adapter
    from axlora.model.adapter_choice import resolve_adapter
    from axlora.model.load import load_base_model

    config = load_config(make_config(base_model=str(tiny_64), adapter="qlora"), log=lambda _n: None)
    model = attach_adapter(load_base_model(config, torch.float32, log=lambda _m: None), config,
                           resolve_adapter(config), log=lambda _m: None)
    assert type(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    ids = torch.arange(1, 33).reshape(2, 16)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, labels=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if "lora_B" in n and p.grad is None]
    assert not missing, missing

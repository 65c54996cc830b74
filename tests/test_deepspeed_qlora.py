"""QLoRA under DeepSpeed ZeRO-3 (Axolotl's zero3 + adapter: qlora configs): no device_map, the packed 4-bit weights
stored in the compute dtype so ZeRO-3 partitions them with the rest; on CPU (gloo) with bitsandbytes' CPU backend."""

from __future__ import annotations

import pytest

from conftest import logged, train_ok

pytest.importorskip("bitsandbytes")
pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def tiny_64(tmp_path_factory):
    """bitsandbytes quantizes in blocks of 64 inputs: the 32-wide test model is too narrow for its CPU kernels."""
    from axlora.model.builtin import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny64", hidden_size=64, num_layers=2)


def test_zero3_takes_a_4bit_base_and_refuses_an_8bit_one(make_config):
    from axlora.config.load import load_config
    from axlora.core.errors import UserError
    from axlora.train.deepspeed import load_deepspeed_setup

    for four_bit in ({"adapter": "qlora"}, {"load_in_4bit": True}):
        config = load_config(make_config(deepspeed="zero3", num_processes=2, **four_bit), log=lambda _n: None)
        assert load_deepspeed_setup(config, 2, "fp32").stage == 3
    config = load_config(make_config(deepspeed="zero3", num_processes=2, load_in_8bit=True), log=lambda _n: None)
    with pytest.raises(UserError, match=r"ZeRO-3 \(preset zero3\) partitions .* 8-bit base \(load_in_8bit\)"):
        load_deepspeed_setup(config, 2, "fp32")


@pytest.mark.slow
def test_zero3_trains_a_4bit_base_as_one_process_does(make_config, tiny_64, tmp_path):
    """Two ZeRO-3 processes x micro batch 2 train what one process x micro batch 4 trains: the partitioned 4-bit
    weights are gathered whole for every forward (a lost quantization state or a partial weight would change the
    losses)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    common = {"base_model": str(tiny_64), "adapter": "qlora", "max_steps": 2, "seed": 7}
    one = make_config("one.yml", micro_batch_size=4, output_dir=str(tmp_path / "one"), **common)
    train_ok(one)
    path = make_config(deepspeed="zero3", num_processes=2, micro_batch_size=2, **common)
    result = train_ok(path)
    assert "deepspeed: ZeRO stage 3 (preset zero3) on 2 process(es)" in result.stdout
    assert "quantization: base weights in 4-bit NF4 (double quantization)" in result.stdout
    assert logged(tmp_path / "out") == pytest.approx(logged(tmp_path / "one"), rel=1e-4)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_64), str(tmp_path / "out" / "final"))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.isfinite(p).all() for p in lora_b) and any(p.abs().sum() > 0 for p in lora_b)

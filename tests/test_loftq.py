"""LoftQ (``peft: {loftq_config: ...}``): the init, the config rules, and a trained run that merges to itself."""

from __future__ import annotations

import pytest

from conftest import main_in_process, run_cli, train_ok

pytest.importorskip("bitsandbytes")

LOFTQ = {"peft": {"loftq_config": {"loftq_bits": 4}}}


@pytest.fixture(scope="module")
def tiny_64(tmp_path_factory):
    """NF4 quantizes in blocks of 64 inputs: a model 64 wide."""
    from axlora.model.builtin import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny64", hidden_size=64, num_layers=2)


def _lora_model(model_dir, rank: int, alpha: float):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear"))


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_init_leaves_less_error_than_quantization_alone(tiny_64, bits):
    """The LoftQ property: ||W - (Q(W) + s*B@A)|| is below ||W - Q(W)||, the error of a plain LoRA on Q(W)."""
    import torch
    from transformers import AutoModelForCausalLM

    from axlora.config.adapter_keys import LoftQSettings
    from axlora.model.loftq import initialize_loftq, quantize_dequantize

    original = dict(AutoModelForCausalLM.from_pretrained(tiny_64).named_parameters())
    peft_model = _lora_model(tiny_64, rank=8, alpha=8)
    initialize_loftq(peft_model, LoftQSettings(loftq_bits=bits), log=lambda _m: None)
    layers = [(name, m) for name, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")]
    assert len(layers) == 14
    for name, layer in layers:
        weight = original[f"{name}.weight"].detach()
        quantized = layer.base_layer.weight.detach()
        assert torch.equal(quantized, quantize_dequantize(weight, bits))  # the base now holds Q(W)
        delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        plain = torch.linalg.norm(weight - quantized)
        assert torch.linalg.norm(weight - quantized - delta.detach()) < 0.95 * plain, name


def test_more_loftq_iterations_fit_the_weight_at_least_as_well(tiny_64):
    import torch

    from axlora.model.loftq import loftq_factors

    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    errors = []
    for iterations in (1, 4):
        quantized, lora_a, lora_b = loftq_factors(weight, 4, 8, iterations)
        errors.append(torch.linalg.norm(weight - quantized - lora_b @ lora_a).item())
    assert errors[1] <= errors[0] * 1.001


@pytest.mark.parametrize("quantized", [{"load_in_4bit": True}, {"adapter": "qlora"}, {"load_in_8bit": True},
                                       {"model_quantization_config": {"backend": "torchao", "weight_dtype": "nf4"}}])
def test_loftq_with_a_quantized_load_is_refused_naming_the_keys(make_config, capsys, quantized):
    result = main_in_process(capsys, "validate", str(make_config(**LOFTQ, **quantized)))
    assert result.returncode == 2
    assert "peft.loftq_config / " in result.stderr and "LoftQ quantizes the base weights itself" in result.stderr
    assert next(iter(quantized)).split("_config")[0] in result.stderr


@pytest.mark.parametrize(("other", "message"), [
    ({"peft_use_dora": True}, "peft.loftq_config / peft_use_dora"),
    ({"deepspeed": "zero3"}, "peft.loftq_config / fsdp / deepspeed"),
])
def test_loftq_with_dora_or_sharded_weights_is_refused(make_config, capsys, other, message):
    result = main_in_process(capsys, "validate", str(make_config(**LOFTQ, **other)))
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_axolotls_loftq_block_validates_and_bad_bits_are_refused(make_config, capsys):
    from axlora.config.load import load_config

    config = load_config(make_config(**LOFTQ), log=lambda _m: None)
    assert config.loftq().loftq_bits == 4 and config.loftq().loftq_iter == 1
    bad = main_in_process(capsys, "validate", str(make_config(peft={"loftq_config": {"loftq_bits": 3}})))
    assert bad.returncode == 2 and "loftq_bits" in bad.stderr


@pytest.mark.slow
def test_a_loftq_run_saves_its_base_and_merges_to_the_trained_model(make_config, tiny_64, tmp_path):
    """The saved adapter holds Q(W); plain peft and merge-lora both give Q(W) + s*B@A, not W + s*B@A."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from axlora.model.loftq import quantize_dequantize

    path = make_config(base_model=str(tiny_64), max_steps=2, lora_alpha=4, **LOFTQ)
    assert "adapter: LoftQ (4-bit, 1 iteration(s)) on 14 layers" in train_ok(path).stdout
    assert run_cli("merge-lora", str(path)).returncode == 0
    out = tmp_path / "out"
    saved = load_file(out / "final" / "adapter_model.safetensors")
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_64).named_parameters())
    merged_model = AutoModelForCausalLM.from_pretrained(out / "merged")
    merged = dict(merged_model.named_parameters())
    name = "model.layers.1.mlp.down_proj"
    key = f"base_model.model.{name}"
    quantized = quantize_dequantize(base[f"{name}.weight"].detach(), 4)
    assert torch.equal(saved[f"{key}.base_layer.weight"], quantized)
    expected = quantized + (4 / 4) * saved[f"{key}.lora_B.weight"] @ saved[f"{key}.lora_A.weight"]
    torch.testing.assert_close(merged[f"{name}.weight"], expected, rtol=1e-5, atol=1e-6)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_64), str(out / "final"))
    tokens = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, merged_model(input_ids=tokens).logits,
                                   rtol=1e-4, atol=1e-5)

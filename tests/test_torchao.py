"""torchao QLoRA (``model_quantization_config: {backend: torchao, weight_dtype: ...}``): config, machine checks,
NF4 and int8 bases that LoRA trains over on a CPU, and an adapter that plain peft loads on the unquantized base."""

from __future__ import annotations

import pytest

from conftest import main_in_process, train_ok


def _torchao(dtype: str, **extra) -> dict:
    return {"model_quantization_config": {"backend": "torchao", "weight_dtype": dtype, **extra}}


@pytest.fixture(scope="module")
def tiny_64(tmp_path_factory):
    """NF4 quantizes in blocks of 64 inputs: a model 64 wide."""
    from axlora.model.builtin import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny64", hidden_size=64, num_layers=2)


def test_axolotls_torchao_block_validates_with_every_weight_dtype(make_config):
    from axlora.config.load import load_config

    for dtype, group in (("int4", 128), ("nf4", 64), ("nvfp4", 16), ("int8", 128), ("fp8", None), ("float8", None)):
        config = load_config(make_config(**_torchao(dtype)), log=lambda _m: None)
        assert config.torchao_quantization().effective_group_size() == group
    assert load_config(make_config(**_torchao("float8_e4m3fn")), log=lambda _m: None).torchao_quantization(
    ).weight_dtype == "fp8"
    assert load_config(make_config(**_torchao("int4", group_size=32)),
                       log=lambda _m: None).torchao_quantization().effective_group_size() == 32


def test_axolotls_older_peft_spelling_moves_to_the_quantization_keys(make_config):
    from axlora.config.load import load_config

    config = load_config(make_config(peft={"backend": "torchao", "weight_dtype": "int8", "group_size": 32}),
                         log=lambda _m: None)
    assert config.torchao_quantization().group_size == 32 and config.peft is None
    config = load_config(make_config(adapter="qlora", peft={"backend": "torchao", "weight_dtype": "nf4"}),
                         log=lambda _m: None)
    assert config.torchao_quantization().weight_dtype == "nf4" and config.quantization_bits() is None
    assert load_config(make_config(peft={"backend": "bnb", "weight_dtype": "nf4"}), log=lambda _m: None).load_in_4bit


@pytest.mark.parametrize(("settings", "message"), [
    (_torchao("int5"), "weight_dtype"),
    (_torchao("nvfp4", group_size=32), "NVFP4 scales blocks of 16"),
    ({**_torchao("int8"), "load_in_4bit": True}, "model_quantization_config / load_in_4bit"),
    ({**_torchao("int8"), "model_quantization_config_kwargs": {"x": 1}}, "model_quantization_config_kwargs"),
    ({**_torchao("nf4"), "adapter": "qlora"}, "model_quantization_config / adapter: qlora"),
    ({**_torchao("nf4"), "deepspeed": "zero2"}, "a torchao-quantized base trains on one process or with DDP"),
])
def test_contradicting_torchao_settings_are_refused(make_config, capsys, settings, message):
    result = main_in_process(capsys, "validate", str(make_config(**settings)))
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_int4_stops_at_train_time_saying_why(make_config, capsys, tmp_path):
    result = main_in_process(capsys, "train", str(make_config(**_torchao("int4"))))
    assert result.returncode == 2
    assert "model_quantization_config.weight_dtype: int4" in result.stderr and "nf4" in result.stderr
    assert not (tmp_path / "out" / "final").exists()


@pytest.mark.parametrize(("dtype", "tensor"), [("int8", "Int8Tensor"), ("fp8", "Float8Tensor"),
                                             ("nvfp4", "NVFP4Tensor")])
def test_weight_only_layouts_load_quantized_and_pass_gradients_to_the_lora(tiny_64, dtype, tensor):
    """Loaded through TorchAoConfig: the linear weights are torchao tensors, peft wraps them, and the loss reaches
    the LoRA of the first layer through every quantized layer above it."""
    pytest.importorskip("torchao")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from axlora.config.model_keys import TorchAoQuantization
    from axlora.model.torchao_quant import torchao_load_kwargs

    quant = TorchAoQuantization(backend="torchao", weight_dtype=dtype, group_size=32 if dtype == "int8" else None)
    kwargs = torchao_load_kwargs(quant, str(tiny_64), False, log=lambda _m: None)
    model = AutoModelForCausalLM.from_pretrained(tiny_64, dtype=torch.float32, **kwargs)
    assert type(model.model.layers[1].mlp.down_proj.weight).__name__ == tensor
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    peft_model(input_ids=tokens, labels=tokens).loss.backward()
    grad = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_nf4_base_trains_a_lora_through_the_quantized_layers(tiny_64):
    """torchao's NF4 weights pass gradients to their input: the first layer's LoRA learns through the rest."""
    pytest.importorskip("torchao")
    import torch
    from peft import LoraConfig, get_peft_model
    from torchao.quantization import NF4Tensor
    from transformers import AutoModelForCausalLM

    from axlora.config.model_keys import TorchAoQuantization
    from axlora.model.torchao_quant import quantize_to_nf4

    model = AutoModelForCausalLM.from_pretrained(tiny_64)
    quantize_to_nf4(model, TorchAoQuantization(backend="torchao", weight_dtype="nf4"), log=lambda _m: None)
    assert isinstance(model.model.layers[1].mlp.down_proj.weight, NF4Tensor)
    assert not isinstance(model.lm_head.weight, NF4Tensor)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    tokens = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    peft_model(input_ids=tokens, labels=tokens).loss.backward()
    grad = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.slow
def test_int8_base_trains_and_its_adapter_loads_in_plain_peft(make_config, tiny_64, tmp_path):
    pytest.importorskip("torchao")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = train_ok(make_config(base_model=str(tiny_64), max_steps=2, **_torchao("int8", group_size=32)))
    assert "quantization: torchao int8 base weights (group size 32)" in result.stdout
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_64), str(tmp_path / "out" / "final"))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 14 and all(torch.isfinite(p).all() for p in lora_b) and all(p.abs().sum() > 0 for p in lora_b)

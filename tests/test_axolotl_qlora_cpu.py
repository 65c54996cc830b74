"""QLoRA for real without a GPU: bitsandbytes (0.48 and later) quantizes NF4 and runs Linear4bit on a CPU torch."""

from __future__ import annotations

import pytest

from conftest import assert_close_final_adapters, logged, run_cli, train_ok

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


def test_fsdp_with_a_4bit_base_stores_packed_weights_in_the_compute_dtype(make_config):
    import torch

    from axlora.config.fsdp import fsdp_settings
    from axlora.config.load import load_config
    from axlora.model.load import bitsandbytes_config

    config = load_config(make_config(adapter="qlora", fsdp=["full_shard", "auto_wrap"], num_processes=2,
                                     fsdp_config={"fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
                                                  "cpu_ram_efficient_loading": True}),
                         log=lambda _n: None)
    assert bitsandbytes_config(config, 4, torch.bfloat16).bnb_4bit_quant_storage == torch.bfloat16
    settings = fsdp_settings(config)  # the quantized layers are made while loading: every process loads
    assert not settings.load_on_main_only
    assert any("every process reads and quantizes the weights itself" in note for note in settings.notes)


@pytest.mark.slow
def test_fsdp_qlora_on_two_processes_trains_what_one_process_does(make_config, tiny_64, tmp_path):
    """FSDP-QLoRA over gloo: the packed 4-bit weights are sharded like any weight, the adapter stays whole."""
    import json

    common = {"base_model": str(tiny_64), "adapter": "qlora", "optimizer": "sgd", "learning_rate": 0.05,
              "max_steps": 3}
    train_ok(make_config("one.yml", micro_batch_size=4, output_dir=str(tmp_path / "one"), **common))
    result = train_ok(make_config(
        "fsdp.yml", micro_batch_size=2, num_processes=2, output_dir=str(tmp_path / "fsdp"),
        fsdp_config={"fsdp_version": 2, "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
                     "cpu_ram_efficient_loading": True}, **common))
    assert "every process reads and quantizes the weights itself" in result.stdout
    figures = json.loads((tmp_path / "fsdp" / "final" / "train_summary.json").read_text())["fsdp"]
    assert 0.45 < figures["sharded_parameters_on_this_rank"] / figures["sharded_parameters"] < 0.55
    assert logged(tmp_path / "fsdp") == pytest.approx(logged(tmp_path / "one"), rel=1e-5)
    assert_close_final_adapters(tmp_path / "fsdp", tmp_path / "one", rtol=1e-4, atol=1e-6)


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


@pytest.mark.slow
def test_fsdp_with_an_8bit_base_keeps_the_int8_weights_whole_and_trains_what_one_process_does(
        make_config, tiny_64, tmp_path):
    import json

    common = {"base_model": str(tiny_64), "load_in_8bit": True, "optimizer": "sgd", "learning_rate": 0.05,
              "max_steps": 2}
    train_ok(make_config("one.yml", micro_batch_size=4, output_dir=str(tmp_path / "one"), **common))
    result = train_ok(make_config(
        "fsdp.yml", micro_batch_size=2, num_processes=2, output_dir=str(tmp_path / "fsdp"),
        fsdp_config={"fsdp_version": 2, "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}, **common))
    assert "the int8 weights stay whole on every process" in result.stdout
    figures = json.loads((tmp_path / "fsdp" / "final" / "train_summary.json").read_text())["fsdp"]
    assert figures["int8_parameters"] > 0 and figures["sharded_parameters_on_this_rank"] < figures["sharded_parameters"]
    assert logged(tmp_path / "fsdp") == pytest.approx(logged(tmp_path / "one"), rel=1e-5)
    assert_close_final_adapters(tmp_path / "fsdp", tmp_path / "one", rtol=1e-4, atol=1e-6)

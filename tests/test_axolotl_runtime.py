"""What the Axolotl keys do at train time: tokens and embeddings, classes, attention and quantization checks."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from axlora.config.load import load_config
from axlora.core.errors import ConfigError, UserError
from axlora.model.load import load_base_model, model_load_kwargs
from axlora.model.tokenizer import load_tokenizer, tokenizer_fingerprint

from conftest import run_cli


def config_of(make_config, **overrides):
    return load_config(make_config(**overrides), log=lambda _note: None)


def without_bitsandbytes(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))


def test_qlora_validates_anywhere_and_stops_at_load_without_bitsandbytes(make_config, monkeypatch):
    path = make_config(adapter="qlora", load_in_4bit=True)
    assert run_cli("validate", str(path)).returncode == 0
    without_bitsandbytes(monkeypatch)
    with pytest.raises(UserError) as info:
        load_base_model(config_of(make_config, adapter="qlora", load_in_4bit=True), torch.float32)
    assert info.value.exit_code == 2
    assert str(info.value).startswith("load_in_4bit: 4-bit quantized base weights (QLoRA) need bitsandbytes, but the "
                                      "bitsandbytes package is not installed")
    assert "set adapter: lora and load_in_4bit: false" in str(info.value)


@pytest.mark.parametrize(("keys", "named"), [({"adapter": "qlora"}, "adapter: qlora"),
                                             ({"load_in_8bit": True}, "load_in_8bit: 8-bit")])
def test_every_quantization_key_is_named_when_it_cannot_run(make_config, monkeypatch, keys, named):
    config = config_of(make_config, **keys)
    without_bitsandbytes(monkeypatch)
    with pytest.raises(UserError, match=named):
        load_base_model(config, torch.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_flash_attention_fails_at_load_naming_the_key(make_config, tiny_model_dir):
    config = config_of(make_config, flash_attention=True)
    with pytest.raises(UserError, match=r"flash_attention: attention 'flash_attention_2' cannot run here: "
                                         r"no CUDA GPU is visible.*sdp_attention: true"):
        model_load_kwargs(config, torch.float32, str(tiny_model_dir))


def test_attention_model_class_and_config_overrides_reach_the_model(make_config):
    config = config_of(make_config, sdp_attention=True, model_type="LlamaForCausalLM",
                       overrides_of_model_config={"attention_dropout": 0.25}, gradient_checkpointing=True,
                       gradient_checkpointing_kwargs={"use_reentrant": False})
    messages: list[str] = []
    model = load_base_model(config, torch.float32, log=messages.append)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config._attn_implementation == "sdpa" and model.config.attention_dropout == 0.25
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    assert model.config.use_cache is False
    assert messages == ["attention: sdpa"]


def test_unknown_classes_are_named(make_config):
    with pytest.raises(UserError, match="tokenizer_type: transformers .* has no class 'NoSuchTokenizer'"):
        load_tokenizer(config_of(make_config, tokenizer_type="NoSuchTokenizer"))
    with pytest.raises(UserError, match="model_type: transformers .* has no class 'NoSuchForCausalLM'"):
        load_base_model(config_of(make_config, model_type="NoSuchForCausalLM"), torch.float32)


def test_existing_special_token_adds_nothing(make_config):
    plain = load_tokenizer(config_of(make_config))
    tokenizer = load_tokenizer(config_of(make_config, special_tokens={"pad_token": plain.eos_token}), log=print)
    assert len(tokenizer) == len(plain) and tokenizer.pad_token == plain.eos_token


def test_new_tokens_need_their_embeddings_trained(make_config):
    with pytest.raises(UserError, match=r"2 token\(s\) new to the vocabulary .*lora_modules_to_save: \[embed_tokens"):
        load_tokenizer(config_of(make_config, tokens=["<tool>", "</tool>"]))


def test_new_tokens_resize_train_and_save_the_embeddings(make_config, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open

    config = config_of(make_config, tokens=["<tool>"], special_tokens={"additional_special_tokens": ["<|x|>"]},
                       resize_token_embeddings_to_32x=True, lora_modules_to_save=["embed_tokens", "lm_head"])
    messages: list[str] = []
    tokenizer = load_tokenizer(config, log=messages.append)
    base_rows = load_base_model(config_of(make_config), torch.float32).get_input_embeddings().weight.shape[0]
    assert tokenizer.convert_tokens_to_ids("<tool>") >= base_rows
    assert tokenizer.tokenize("a<|x|>b").count("<|x|>") == 1
    model = load_base_model(config, torch.float32, tokenizer=tokenizer, log=messages.append)
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows >= len(tokenizer) and rows % 32 == 0
    assert any(m.startswith("tokenizer: added 2 new tokens") for m in messages)
    assert any(m.startswith(f"model: embeddings resized from {base_rows} to {rows} rows") for m in messages)
    # what adapter.py passes to peft for a fresh adapter: the resized embeddings train and save in full
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], **config.peft_kwargs()))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("embed_tokens" in n for n in trainable) and any("lm_head" in n for n in trainable)
    peft_model.save_pretrained(tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as saved:
        embed = [k for k in saved.keys() if "embed_tokens" in k]
        assert embed and saved.get_tensor(embed[0]).shape[0] == rows


def test_chat_template_jinja_is_set_saved_and_fingerprinted(make_config, tmp_path):
    template_file = tmp_path / "chat.jinja"
    template_file.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    plain = load_tokenizer(config_of(make_config))
    tokenizer = load_tokenizer(config_of(make_config, chat_template_jinja="chat.jinja"))  # beside the config
    assert tokenizer.chat_template == template_file.read_text()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "[user] hi\n"
    assert tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(plain)
    tokenizer.save_pretrained(tmp_path / "saved")
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "saved").chat_template == tokenizer.chat_template


def test_length_grouped_schedule_sees_every_row_once_in_similar_length_steps(make_config):
    from axlora.train.data_order import DataOrder
    from axlora.train.length_groups import LengthGroupedOrder, build_data_order

    lengths = [(i * 37) % 101 + 1 for i in range(200)]
    rows = [{"input_ids": [0] * n} for n in lengths]
    config = config_of(make_config, group_by_length=True, micro_batch_size=4, gradient_accumulation_steps=2)
    schedule = build_data_order(config, rows, world_size=1)
    assert isinstance(schedule, LengthGroupedOrder)
    for epoch in range(2):
        seen = [r for step in range(epoch * 25, epoch * 25 + 25) for r in schedule.step_rows(step)]
        assert sorted(seen) == list(range(200))
    spread = [max(lengths[r] for r in schedule.step_rows(s)) - min(lengths[r] for r in schedule.step_rows(s))
              for s in range(25)]
    plain = DataOrder(200, 4, 2, 1, config.seed)
    plain_spread = [max(lengths[r] for r in plain.step_rows(s)) - min(lengths[r] for r in plain.step_rows(s))
                    for s in range(25)]
    assert sum(spread) < sum(plain_spread) / 3
    packed = config_of(make_config, group_by_length=True, sample_packing=True)
    assert type(build_data_order(packed, rows, world_size=1)) is DataOrder



def test_named_chat_template_is_carried_by_the_tokenizer(make_config):
    from axlora.config.chat_templates import BUILTIN_TEMPLATES

    plain = load_tokenizer(config_of(make_config))
    assert load_tokenizer(config_of(make_config, chat_template="chatml")).chat_template == BUILTIN_TEMPLATES["chatml"]
    kept = load_tokenizer(config_of(make_config, chat_template="tokenizer_default_fallback_chatml"))
    assert kept.chat_template == plain.chat_template  # the data side resolves the fallback
    with pytest.raises(ConfigError, match=r"config.yml:\d+: chat_template: unknown chat template 'chatmll' \(did you mean 'chatml'\?\)"):
        config_of(make_config, chat_template="chatmll")

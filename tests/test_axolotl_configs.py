"""Axolotl-style configs (tests/axolotl_configs/) validate, with Axolotl's meaning for every key they set."""

from __future__ import annotations

from pathlib import Path

import pytest

from axlora.config.load import load_config
from axlora.train.intervals import evaluates_at, saves_at

from conftest import REPO

CONFIGS = sorted((REPO / "tests" / "axolotl_configs").glob("*.yml"))


def load_with_notes(path: Path):
    notes: list[str] = []
    return load_config(path, log=notes.append), notes


def test_there_is_a_suite():
    assert len(CONFIGS) >= 8


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_axolotl_style_config_validates(path):
    config, notes = load_with_notes(path)
    assert config.base_model
    for note in notes:  # every note names its file and line
        assert note.startswith(f"note: {path}:")


def by_name(name: str):
    return load_with_notes(REPO / "tests" / "axolotl_configs" / name)


def test_llama3_example_keeps_axolotl_meaning():
    config, notes = by_name("llama3-lora-8b.yml")
    assert config.model_type == "LlamaForCausalLM" and config.tokenizer_type == "AutoTokenizer"
    assert config.learning_rate == pytest.approx(2e-4)  # "2e-4" is a string under YAML 1.1
    assert config.attention_implementation() == "flash_attention_2"
    assert config.pad_to_sequence_len and config.special_tokens.pad_token == "<|end_of_text|>"
    assert config.evals_per_epoch == 4 and config.saves_per_epoch == 1
    assert config.wandb_project is None and not config.wandb_enabled()
    assert [n.split("'")[1] for n in notes] == ["eval_max_new_tokens"]  # the only no-op key given a value


def test_qlora_example():
    config, notes = by_name("llama3.2-qlora-1b.yml")
    assert config.adapter == "qlora" and config.quantization_bits() == 4
    assert config.tf32 == "auto" and config.attention_implementation() == "flash_attention_2"
    assert config.checkpointing_kwargs() == {"use_reentrant": True}
    assert config.bnb_config_kwargs["bnb_4bit_quant_type"] == "nf4"
    assert {n.split("'")[1] for n in notes} == {"eval_sample_packing", "loss_watchdog_threshold",
                                                "loss_watchdog_patience"}


def test_hub_wandb_dora_example():
    config, _ = by_name("mistral-qlora-hub.yml")
    assert config.peft_kwargs() == {"use_dora": True}
    assert config.peft_use_rslora and config.wandb_enabled() and not config.mlflow_enabled()
    assert config.hub_model_id == "my-user/mistral-7b-qlora-alpaca"
    assert config.eval_steps == pytest.approx(0.1)
    # a fraction of the run's steps: every 10 of 100 steps
    assert [s for s in range(1, 101) if evaluates_at(config, s, 100, 50)] == list(range(10, 101, 10))


def test_chat_template_example():
    config, _ = by_name("qwen2.5-chat-template.yml")
    assert config.chat_template == "jinja" and config.chat_template_jinja.startswith("{% for message")
    assert config.mlflow_enabled() and config.hf_mlflow_log_artifacts
    assert [s for s in range(1, 31) if evaluates_at(config, s, 30, 10)] == [10, 20, 30]
    assert [s for s in range(1, 31) if saves_at(config, s, 30, 10)] == [10, 20]  # step 30 writes final/


def test_new_tokens_example():
    config, _ = by_name("new-tokens.yml")
    assert config.tokens == ["<tool_call>", "</tool_call>"]
    assert config.special_tokens.additional_special_tokens == ["<|tool|>"]
    assert config.peft_kwargs() == {"modules_to_save": ["embed_tokens", "lm_head"]}
    assert saves_at(config, 1, 500, 500) and not saves_at(config, 2, 500, 500)


def test_speed_only_plugins_are_noted_not_refused():
    config, notes = by_name("plugins-and-kernels.yml")
    plugin_notes = [n for n in notes if "plugin " in n]
    assert len(plugin_notes) == 3 and sum("changes speed and memory only" in n for n in plugin_notes) == 2
    assert any("CutCrossEntropyPlugin" in n and "cut_cross_entropy: true" in n for n in plugin_notes)
    assert config.cut_cross_entropy and config.liger_switches() == {"rope": True, "rms_norm": True, "swiglu": True,
                                                                    "layer_norm": True}
    assert not any("liger_fused_linear_cross_entropy" in n for n in notes)  # false asks for nothing
    assert config.attention_implementation() == "sdpa"


def test_renamed_keys_and_auto_resume():
    config, notes = by_name("renamed-and-resume.yml")
    assert config.revision_of_model == "main"
    assert config.overrides_of_model_config == {"rope_scaling": {"type": "linear", "factor": 2.0}}
    assert config.eval_strategy == "steps" and config.eval_steps == 25
    assert config.resume_from_checkpoint == "auto"
    assert any("auto_resume_from_checkpoints" in n for n in notes)
    assert config.attention_implementation() == "eager"


def test_unpadded_batches_example():
    config, _ = by_name("unpadded-batches.yml")
    assert config.group_by_length and not config.sample_packing
    assert config.padding() == {"pad_to_multiple_of": 64, "sequence_len": 2048, "pad_to_sequence_len": False}
    assert config.attention_implementation() == "sdpa"  # xformers runs PyTorch's memory-efficient SDPA
    assert not any(saves_at(config, s, 40, 20) for s in range(1, 41))
    assert [s for s in range(1, 41) if evaluates_at(config, s, 40, 20)] == [20, 40]


def test_switched_off_features_are_silent():
    _, notes = by_name("switched-off-features.yml")
    assert notes == []

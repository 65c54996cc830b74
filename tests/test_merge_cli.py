"""merge-lora through the CLI: merges what train produced, the result is plain transformers, and trains again."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli

pytestmark = pytest.mark.slow


def test_train_merge_train_round_trip(make_config, tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = make_config(max_steps=3)
    assert run_cli("train", str(config)).returncode == 0
    merged_result = run_cli("merge-lora", str(config))
    assert merged_result.returncode == 0, merged_result.stderr
    out = tmp_path / "out"
    assert "the run's final adapter" in merged_result.stdout and "verified" in merged_result.stdout
    merged_dir = out / "merged"
    index = json.loads((merged_dir / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] > 0

    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "final")
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max() <= 1e-4
    assert AutoTokenizer.from_pretrained(merged_dir).get_vocab() == AutoTokenizer.from_pretrained(out / "final").get_vocab()

    # round two: the merged model is a plain base for a fresh LoRA
    second = make_config("round2.yml", base_model=str(merged_dir), output_dir=str(tmp_path / "round2"))
    result = run_cli("train", str(second))
    assert result.returncode == 0, result.stderr
    assert "is a merged model; training a fresh LoRA" in result.stdout
    assert (tmp_path / "round2" / "final" / "adapter_model.safetensors").is_file()


def test_merge_without_adapter_exits_2(make_config):
    result = run_cli("merge-lora", str(make_config()))
    assert result.returncode == 2
    assert "nothing to merge" in result.stderr and "Traceback" not in result.stderr

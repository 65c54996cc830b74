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


def test_merge_after_adding_tokens(make_config, tmp_path, tiny_model_dir):
    """tokens + modules_to_save: the merged model has the run's vocabulary, tokenizer and outputs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axlora.core.errors import UserError
    from axlora.merge import merge_lora

    config = make_config(max_steps=2, tokens=["<|x|>"], lora_modules_to_save=["embed_tokens", "lm_head"])
    trained = run_cli("train", str(config))
    assert trained.returncode == 0, trained.stderr
    merged_result = run_cli("merge-lora", str(config))
    assert merged_result.returncode == 0, merged_result.stderr
    final, merged_dir = tmp_path / "out" / "final", tmp_path / "out" / "merged"

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    base_tokens = len(AutoTokenizer.from_pretrained(tiny_model_dir))
    assert len(tokenizer) == len(AutoTokenizer.from_pretrained(final)) == base_tokens + 1
    assert f"vocabulary resized to {len(tokenizer)}" in merged_result.stdout
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert merged.config.vocab_size == len(tokenizer)
    new_id = tokenizer.convert_tokens_to_ids("<|x|>")
    assert new_id == base_tokens
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base.resize_token_embeddings(len(tokenizer))
    reference = PeftModel.from_pretrained(base, final).eval()
    ids = torch.tensor([[4, 8, new_id, 15, 16, new_id]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4)

    # the base's tokenizer lacks the added token: that merge would be useless, so it is refused
    with pytest.raises(UserError, match=f"has {base_tokens} tokens"):
        merge_lora(tiny_model_dir, final, tmp_path / "wrong", tokenizer_dir=tiny_model_dir, log=lambda _: None)


def test_merge_without_adapter_exits_2(make_config):
    result = run_cli("merge-lora", str(make_config()))
    assert result.returncode == 2
    assert "nothing to merge" in result.stderr and "Traceback" not in result.stderr

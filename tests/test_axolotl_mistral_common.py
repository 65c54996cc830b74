"""``tokenizer_use_mistral_common``: Mistral's tekken tokenizer read by mistral-common (transformers'
MistralCommonBackend), on a tiny model whose vocabulary fits it."""

from __future__ import annotations

import base64
import json

import pytest

from axlora.config.load import load_config
from axlora.core.errors import UserError
from axlora.model.tokenizer import load_tokenizer

from conftest import train_ok

pytest.importorskip("mistral_common")
BYTES, SPECIAL = 256, 1000  # a byte-level tekken vocabulary behind mistral-common's default special tokens
PATTERN = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"


@pytest.fixture(scope="module")
def tekken_model(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    target = tmp_path_factory.mktemp("models") / "tekken"
    target.mkdir()
    vocab = [{"rank": i, "token_bytes": base64.b64encode(bytes([i])).decode(), "token_str": None} for i in range(BYTES)]
    (target / "tekken.json").write_text(json.dumps({
        "config": {"pattern": PATTERN, "num_vocab_tokens": BYTES, "default_vocab_size": BYTES + SPECIAL,
                   "default_num_special_tokens": SPECIAL, "version": "v7"},
        "vocab": vocab, "version": 1, "type": "Tekken"}))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=BYTES + SPECIAL, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                                 pad_token_id=11)).save_pretrained(target)
    return target


def test_mistral_common_tokenizer_loads_in_finetuning_mode(make_config, tekken_model):
    config = load_config(make_config(base_model=str(tekken_model), tokenizer_use_mistral_common=True),
                         log=lambda _n: None)
    tokenizer = load_tokenizer(config, log=lambda _m: None)
    assert type(tokenizer).__name__ == "MistralCommonBackend"
    ids = tokenizer("12+30=42", add_special_tokens=False)["input_ids"]
    assert ids == [SPECIAL + b for b in b"12+30=42"]  # byte tokens after the special ones
    # fine-tuning mode: a conversation may end with the assistant's turn
    tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    with pytest.raises(UserError, match="tokenizer_use_mistral_common / tokens"):
        load_tokenizer(config.model_copy(update={"tokens": ["<x>"]}), log=lambda _m: None)


@pytest.mark.slow
def test_training_with_the_mistral_common_tokenizer_saves_it_with_the_adapter(make_config, tekken_model, tmp_path):
    train_ok(make_config(base_model=str(tekken_model), tokenizer_use_mistral_common=True, sequence_len=256,
                         max_steps=2))
    assert (tmp_path / "out" / "final" / "tekken.json").is_file()

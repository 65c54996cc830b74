"""chunked_cross_entropy: the same loss and gradients as transformers' ForCausalLMLoss, end to end too."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

from axlora.core.errors import UserError
from axlora.train.chunked_loss import ChunkedCrossEntropy, check_supported, linear_cross_entropy

from conftest import assert_close_final_adapters, logged, run_cli


@pytest.mark.parametrize("num_chunks", [1, 3, 64])
@pytest.mark.parametrize("num_items", [None, 9])
def test_loss_and_gradients_equal_transformers(num_chunks, num_items):
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :3] = -100  # a masked prompt
    labels[1, :] = -100  # a row with nothing to train
    labels[1, 2] = 4

    reference = ForCausalLMLoss(hidden @ weight.t(), labels, 50, num_items_in_batch=num_items)
    reference.backward()
    expected = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
    ours = linear_cross_entropy(hidden.reshape(-1, 16), weight, targets, num_items, num_chunks)
    ours.backward()
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad, expected[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight.grad, expected[1], rtol=1e-5, atol=1e-7)


def _tiny_llama():
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=40))


def test_the_model_switches_between_its_own_logits_and_the_chunked_loss():
    torch.manual_seed(0)
    model = _tiny_llama()
    ids = torch.randint(0, 40, (2, 6))
    own = model(input_ids=ids, labels=ids)
    chunked = ChunkedCrossEntropy(model, num_chunks=2)
    with chunked.active():
        out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, own.loss)
    assert out.logits.shape[-1] == 16  # the hidden states: no logits were made
    assert model(input_ids=ids).logits.shape[-1] == 40  # outside the context (generation) logits are back


def test_refused_where_logits_are_more_than_the_head():
    with pytest.raises(UserError, match="model_type 'gpt2'"):
        check_supported(GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40)))
    peft_model = get_peft_model(_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(UserError, match="lm_head"):
        check_supported(peft_model.get_base_model())


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True])
def test_training_with_chunked_loss_equals_training_without(make_config, tmp_path, packing):
    common = {"max_steps": 3, "sample_packing": packing, "lora_dropout": 0.0}
    for name, chunked in (("own", False), ("chunked", True)):
        result = run_cli("train", str(make_config(f"{name}.yml", output_dir=str(tmp_path / name),
                                                  chunked_cross_entropy=chunked, **common)))
        assert result.returncode == 0, result.stderr[-3000:]
    assert "loss: chunked cross-entropy" in result.stdout
    assert logged(tmp_path / "chunked") == pytest.approx(logged(tmp_path / "own"), rel=1e-5)
    assert_close_final_adapters(tmp_path / "chunked", tmp_path / "own", rtol=1e-4, atol=1e-5)

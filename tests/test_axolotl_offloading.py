"""Activation offloading (``activation_offloading``, ``gradient_checkpointing: offload``): the tensors autograd keeps
for backward wait in CPU memory, through torch's saved-tensor hooks, and training computes the same thing."""

from __future__ import annotations

import pytest
import torch

from axlora.config.load import load_config
from axlora.train.model_setup import choose_loss

from conftest import assert_same_final_adapter, train_ok


def test_offload_checkpointing_is_checkpointing_plus_offloading(make_config):
    config = load_config(make_config(gradient_checkpointing="offload"), log=lambda _n: None)
    assert config.gradient_checkpointing is True and config.activation_offloading is True
    lines: list[str] = []
    context = choose_loss(config, None, lines.append)
    assert isinstance(context(), torch.autograd.graph.save_on_cpu)
    assert lines == ["memory: activations saved for backward wait in CPU memory (activation_offloading)"]


def test_saved_tensors_go_through_the_offload_hooks_and_gradients_match(make_config):
    config = load_config(make_config(activation_offloading=True), log=lambda _n: None)
    weight = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8)
    packed: list[torch.Tensor] = []

    class Counting(torch.autograd.graph.save_on_cpu):
        def __init__(self, pin_memory=False):
            super().__init__(pin_memory)
            pack = self.pack_hook
            self.pack_hook = lambda tensor: packed.append(tensor) or pack(tensor)

    original = torch.autograd.graph.save_on_cpu
    torch.autograd.graph.save_on_cpu = Counting
    try:
        with choose_loss(config, None, lambda _m: None)():
            torch.tanh(x @ weight).sum().backward()
    finally:
        torch.autograd.graph.save_on_cpu = original
    offloaded = weight.grad.clone()
    weight.grad = None
    torch.tanh(x @ weight).sum().backward()
    assert packed and torch.equal(offloaded, weight.grad)


@pytest.mark.slow
def test_offloaded_run_trains_the_same_adapter(make_config, tmp_path):
    train_ok(make_config("plain.yml", output_dir=str(tmp_path / "plain"), gradient_checkpointing=True))
    result = train_ok(make_config("offload.yml", output_dir=str(tmp_path / "offload"), gradient_checkpointing="offload"))
    assert "(activation_offloading)" in result.stdout + result.stderr
    assert_same_final_adapter(tmp_path / "plain", tmp_path / "offload")

"""``unfrozen_parameters``: named base parameters trained in full beside the LoRA, saved with the adapter (peft's
modules_to_save), loaded by plain peft and written into the merged model by merge-lora."""

from __future__ import annotations

import pytest
import torch

from axlora.config.load import load_config
from axlora.core.errors import UserError
from axlora.model.adapter import attach_adapter
from axlora.model.adapter_choice import resolve_adapter
from axlora.model.load import load_base_model

from conftest import run_cli, train_ok

DOWN_1 = r"^model\.layers\.1\.mlp\.down_proj\..*"
KEYS = {"lora_target_linear": None, "lora_target_modules": ["q_proj", "v_proj"]}


def attached(make_config, **keys):
    config = load_config(make_config(**KEYS, **keys), log=lambda _n: None)
    lines: list[str] = []
    model = attach_adapter(load_base_model(config, torch.float32, log=lambda _m: None), config,
                           resolve_adapter(config), log=lines.append)
    return model, lines


def test_named_modules_train_in_full_beside_the_lora(make_config):
    model, lines = attached(make_config, unfrozen_parameters=[DOWN_1])
    assert "adapter: trained in full beside the LoRA (unfrozen_parameters): model.layers.1.mlp.down_proj" in lines
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable == {"base_model.model.model.layers.1.mlp.down_proj.modules_to_save.default.weight"}


def test_patterns_must_match_and_not_overlap_the_lora(make_config):
    with pytest.raises(UserError, match="matches no parameter"):
        attached(make_config, unfrozen_parameters=[r"^model\.vision_tower\..*"])
    with pytest.raises(UserError, match="model.layers.1.self_attn is also adapted by the LoRA"):
        attached(make_config, unfrozen_parameters=[r"^model\.layers\.1\.self_attn\..*"])


@pytest.mark.slow
def test_unfrozen_module_is_saved_loaded_by_peft_and_merged(make_config, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path = make_config(**KEYS, unfrozen_parameters=[DOWN_1], max_steps=2)
    train_ok(path)
    final = tmp_path / "out" / "final"
    saved = load_file(final / "adapter_model.safetensors")
    [key] = [k for k in saved if "down_proj" in k]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = base.model.layers[1].mlp.down_proj.weight.detach().clone()
    assert not torch.equal(saved[key], before)  # it trained
    peft_model = PeftModel.from_pretrained(base, str(final))
    torch.testing.assert_close(peft_model.get_base_model().model.layers[1].mlp.down_proj.modules_to_save["default"]
                               .weight, saved[key])
    assert run_cli("merge-lora", str(path)).returncode == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged")
    torch.testing.assert_close(merged.model.layers[1].mlp.down_proj.weight, saved[key])

"""merge-lora on LoRA of fused MoE expert parameters (peft's target_parameters, axlora's lora_target_parameters):
the merged model computes what peft computes, for the Qwen3-MoE and Mixtral layouts (fused in the model, one
tensor per expert in the checkpoint) and gpt-oss (fused and transposed in both)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from test_axolotl_moe import EXPERTS, build_tiny_moe
from transformers import AutoModelForCausalLM

from axlora.core.errors import UserError
from axlora.merge import MergeVerificationError, merge_lora
from axlora.merge import ops as merge_ops

from conftest import run_cli, train_ok

FAMILIES = ["qwen3_moe", "mixtral", "gpt_oss"]
IDS = torch.tensor([[1, 5, 17, 42, 60, 3, 64, 11, 25, 7, 90, 33]])


@pytest.fixture(scope="module")
def moe_bases(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe_merge")
    return {family: build_tiny_moe(family, root / family, tiny_model_dir) for family in FAMILIES}


def _expert_adapter(base_dir: Path, out: Path, **lora_kwargs) -> Path:
    """A real peft adapter on the experts (and whatever else ``lora_kwargs`` targets) with every lora_B made
    non-zero, as training would leave it (peft starts B at zero, which would make any merge look right)."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(**lora_kwargs))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.2)
    model.save_pretrained(out)
    return out


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits.float()


def _merged_logits(merged_dir: Path) -> torch.Tensor:
    model, info = AutoModelForCausalLM.from_pretrained(merged_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return _logits(model)


def _peft_logits(base_dir: Path, adapter_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the unmerged PeftModel and of peft's own merge_and_unload; the adapter must change them."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    unmerged = _logits(model)
    with model.disable_adapter():
        assert (_logits(model) - unmerged).abs().max() > 1e-2
    return unmerged, _logits(model.merge_and_unload())


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_and_attention_lora_merge_like_peft(moe_bases, tmp_path, family):
    adapter = _expert_adapter(moe_bases[family], tmp_path / "adapter", r=4, lora_alpha=8,
                              target_modules=["q_proj", "o_proj"], target_parameters=EXPERTS)
    report = merge_lora(moe_bases[family], adapter, tmp_path / "merged", log=lambda _: None)
    assert report.merged_modules == 2 * (2 + 2)  # per layer: q_proj, o_proj and both expert parameters
    unmerged, peft_merged = _peft_logits(moe_bases[family], adapter)
    ours = _merged_logits(tmp_path / "merged")
    torch.testing.assert_close(ours, unmerged, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours, peft_merged, rtol=1e-4, atol=1e-4)
    base, merged = load_file(moe_bases[family] / "model.safetensors"), load_file(tmp_path / "merged" /
                                                                                  "model-00001-of-00001.safetensors")
    assert merged.keys() == base.keys()  # the checkpoint's own layout: per-expert tensors stay per expert
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    assert any(".experts." in name for name in changed) and any("q_proj" in name for name in changed)


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match:RuntimeWarning")
def test_only_experts_with_rslora_and_patterns_in_bfloat16(moe_bases, tmp_path):
    base = moe_bases["qwen3_moe"]
    adapter = _expert_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, use_rslora=True,
                              rank_pattern={"down_proj": 2}, alpha_pattern={"layers.1.mlp.experts.gate_up_proj": 32},
                              target_parameters=EXPERTS)
    merge_lora(base, adapter, tmp_path / "merged", log=lambda _: None)
    unmerged, _ = _peft_logits(base, adapter)
    torch.testing.assert_close(_merged_logits(tmp_path / "merged"), unmerged, rtol=1e-4, atol=1e-4)
    lines: list[str] = []
    merge_lora(base, adapter, tmp_path / "bf16", dtype="bfloat16", log=lines.append)
    verified = next(line for line in lines if line.startswith("verified"))
    assert "experts" in verified  # the worst probe error (bf16 rounding) is on an expert tensor: they were probed
    assert (_merged_logits(tmp_path / "bf16") - unmerged).abs().max() < 5e-2


def test_parameter_names_without_a_module_path(moe_bases, tmp_path):
    """peft matches a bare "down_proj" in every module; q_proj's LoRA is still an ordinary one."""
    base = moe_bases["mixtral"]
    adapter = _expert_adapter(base, tmp_path / "adapter", r=4, target_modules=["q_proj"],
                              target_parameters=["gate_up_proj", "down_proj"])
    report = merge_lora(base, adapter, tmp_path / "merged", log=lambda _: None)
    assert report.merged_modules == 2 * 3
    unmerged, _ = _peft_logits(base, adapter)
    torch.testing.assert_close(_merged_logits(tmp_path / "merged"), unmerged, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_bfloat16_base_stays_bfloat16(moe_bases, tmp_path, family):
    """The usual checkpoint: each expert is merged in fp32 and written back into the bf16 tensor."""
    base = tmp_path / "base"
    AutoModelForCausalLM.from_pretrained(moe_bases[family]).to(torch.bfloat16).save_pretrained(base)
    adapter = _expert_adapter(base, tmp_path / "adapter", r=4, target_parameters=EXPERTS)
    report = merge_lora(base, adapter, tmp_path / "merged", log=lambda _: None)
    assert report.dtype == "bfloat16" and report.max_verify_error < 1e-2
    merged = load_file(tmp_path / "merged" / "model-00001-of-00001.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    reference = model.merge_and_unload().state_dict()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).state_dict()
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():  # weights, not logits: bf16 noise can flip a router's top-k choice
        assert (ours[name] - tensor).norm() <= 5e-3 * tensor.norm(), name


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_verification_covers_expert_tensors(moe_bases, tmp_path, monkeypatch, family):
    adapter = _expert_adapter(moe_bases[family], tmp_path / "adapter", r=4, target_parameters=EXPERTS)
    real = merge_ops.add_lora_delta
    monkeypatch.setattr(merge_ops, "add_lora_delta", lambda m, a, b, scale: real(m, a, b, scale * 1.01))
    with pytest.raises(MergeVerificationError, match=r"verification failed for model\.layers\.\d\.mlp\.experts\."):
        merge_lora(moe_bases[family], adapter, tmp_path / "merged", log=lambda _: None)
    assert not (tmp_path / "merged").exists()


def test_expert_lora_that_fits_no_named_parameter_is_refused(moe_bases, tmp_path):
    adapter = _expert_adapter(moe_bases["mixtral"], tmp_path / "adapter", r=4, target_parameters=EXPERTS)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "target_parameters": [EXPERTS[1]]}))
    with pytest.raises(UserError, match=r"base_layer' \(lora_A \[16, 32\], lora_B \[32, 16\]\) fits no parameter "
                                        r"that target_parameters names in module 'model\.layers\.\d\.mlp\.experts'"):
        merge_lora(moe_bases["mixtral"], adapter, tmp_path / "merged", log=lambda _: None)
    assert not (tmp_path / "merged").exists()


@pytest.mark.slow
def test_merge_lora_command_merges_a_trained_expert_run(make_config, moe_bases, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(moe_bases["mixtral"], base)
    path = make_config(base_model=str(base), lora_target_linear=None, lora_dropout=None,
                       lora_target_modules=["q_proj"], lora_target_parameters=EXPERTS, max_steps=2)
    train_ok(path)
    result = run_cli("merge-lora", str(path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "6 LoRA modules" in result.stdout
    unmerged, _ = _peft_logits(base, tmp_path / "out" / "final")
    torch.testing.assert_close(_merged_logits(tmp_path / "out" / "merged"), unmerged, rtol=1e-4, atol=1e-4)

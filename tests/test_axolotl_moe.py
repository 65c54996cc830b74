"""LoRA on fused MoE expert weights (``lora_target_parameters``, peft's target_parameters) for the expert layouts
transformers 5 uses: Qwen3-MoE, Mixtral and gpt-oss, on tiny models built from their real config classes."""

from __future__ import annotations

import shutil

import pytest
import torch

from axlora.config.load import load_config
from axlora.core.errors import ConfigError, UserError
from axlora.model.adapter import attach_adapter
from axlora.model.adapter_choice import resolve_adapter
from axlora.model.load import load_base_model

from conftest import run_cli, train_ok

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             max_position_embeddings=256)


def _moe_config(family: str, vocab_size: int):
    from transformers import GptOssConfig, MixtralConfig, Qwen3MoeConfig

    if family == "qwen3_moe":
        return Qwen3MoeConfig(vocab_size=vocab_size, intermediate_size=32, moe_intermediate_size=16, num_experts=4,
                              num_experts_per_tok=2, decoder_sparse_step=1, **SHAPE)
    if family == "mixtral":
        return MixtralConfig(vocab_size=vocab_size, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                             **SHAPE)
    return GptOssConfig(vocab_size=vocab_size, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                        layer_types=["full_attention"] * 2, **SHAPE)


def build_tiny_moe(family: str, target, tokenizer_dir):
    """A tiny MoE model of ``family`` with the test tokenizer, saved as from_pretrained reads it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_moe_config(family, len(tokenizer)))
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("moe")
    return {family: build_tiny_moe(family, root / family, tiny_model_dir) for family in ("qwen3_moe", "mixtral", "gpt_oss")}


def moe_config(make_config, base, **keys):
    settings = {"base_model": str(base), "lora_target_linear": None, "lora_dropout": None,
                "lora_target_modules": ["q_proj"], "lora_target_parameters": EXPERTS, **keys}
    return load_config(make_config(**settings), log=lambda _n: None)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_expert_lora_gets_gradients_on_every_moe_layout(make_config, moe_dirs, family):
    config = moe_config(make_config, moe_dirs[family])
    assert config.lora_dropout == 0  # peft's LoRA on parameters has no dropout: Axolotl's default here
    model = attach_adapter(load_base_model(config, torch.float32, log=lambda _m: None), config,
                           resolve_adapter(config), log=lambda _m: None)
    ids = torch.arange(1, 33).reshape(2, 16)
    model(input_ids=ids, labels=ids).loss.backward()
    expert_lora = {n: p for n, p in model.named_parameters() if p.requires_grad and ".experts." in n}
    assert len(expert_lora) == 2 * 2 * 2  # two parameters, A and B, two layers
    # lora_B starts at 0, so it is the one with a gradient at the first step
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in expert_lora.items() if "lora_B" in n)


def test_expert_targets_are_checked(make_config, moe_dirs, tmp_path):
    with pytest.raises(ConfigError, match="lora_target_parameters / lora_dropout"):
        moe_config(make_config, moe_dirs["mixtral"], lora_dropout=0.1)
    config = moe_config(make_config, moe_dirs["mixtral"])
    config = config.model_copy(update={"lora_target_parameters": ["mlp.experts.gate_proj"]})
    with pytest.raises(UserError, match="lora_target_parameters: 'mlp.experts.gate_proj' name no parameter"):
        attach_adapter(load_base_model(config, torch.float32, log=lambda _m: None), config, resolve_adapter(config),
                       log=lambda _m: None)


def test_regular_expression_targets_as_in_axolotl(make_config, moe_dirs):
    config = load_config(make_config(lora_target_linear=None,
                                     lora_target_modules=r"model.layers.[\d]+.self_attn.(q|v)_proj"),
                         log=lambda _n: None)
    model = attach_adapter(load_base_model(config, torch.float32, log=lambda _m: None), config,
                           resolve_adapter(config), log=lambda _m: None)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert adapted == {"q_proj", "v_proj"}
    bad = config.model_copy(update={"lora_target_modules": r"layers\.[0-9]+\.attn\.q"})
    with pytest.raises(UserError, match="matches no module path"):
        attach_adapter(load_base_model(bad, torch.float32, log=lambda _m: None), bad, resolve_adapter(bad),
                       log=lambda _m: None)


@pytest.mark.slow
def test_qwen3_moe_expert_lora_trains_loads_in_peft_and_merge_refuses_by_name(make_config, moe_dirs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    shutil.copytree(moe_dirs["qwen3_moe"], base)
    path = make_config(base_model=str(base), lora_target_linear=None, lora_dropout=None,
                       lora_target_modules=["q_proj", "v_proj"], lora_target_parameters=EXPERTS, max_steps=2)
    train_ok(path)
    final = tmp_path / "out" / "final"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(final))
    trained = {n: p for n, p in model.named_parameters() if ".experts." in n and "lora_B" in n}
    assert trained and all(p.abs().sum() > 0 for p in trained.values())  # lora_B starts at 0: it trained
    merged = run_cli("merge-lora", str(path))
    assert merged.returncode == 2 and "Traceback" not in merged.stderr
    assert "target_parameters" in merged.stderr and "lora_target_parameters" in merged.stderr


def test_gpt_oss_loads_through_its_quantization_config_and_trains_experts(make_config, moe_dirs):
    config = moe_config(make_config, moe_dirs["gpt_oss"], model_quantization_config="Mxfp4Config",
                        model_quantization_config_kwargs={"dequantize": True})
    lines: list[str] = []
    base = load_base_model(config, torch.float32, log=lines.append)
    assert "quantization: Mxfp4Config({'dequantize': True})" in lines
    assert type(base.hf_quantizer).__name__ == "Mxfp4HfQuantizer" and base.hf_quantizer.quantization_config.dequantize
    model = attach_adapter(base, config, resolve_adapter(config), log=lambda _m: None)
    ids = torch.arange(1, 33).reshape(2, 16)
    model(input_ids=ids, labels=ids).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if ".experts." in n and "lora_B" in n)


def test_quantization_config_names_are_checked(make_config, moe_dirs):
    config = moe_config(make_config, moe_dirs["gpt_oss"], model_quantization_config="Mxfp9Config")
    with pytest.raises(UserError, match="transformers has no quantization config class 'Mxfp9Config'"):
        load_base_model(config, torch.float32, log=lambda _m: None)
    with pytest.raises(ConfigError, match="model_quantization_config_kwargs: needs model_quantization_config"):
        moe_config(make_config, moe_dirs["gpt_oss"], model_quantization_config_kwargs={"dequantize": True})


@pytest.fixture(scope="module")
def moe_64(tmp_path_factory, tiny_model_dir):
    """A Qwen3-MoE 64 wide: bitsandbytes' CPU kernels quantize blocks of 64."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeConfig

    target = tmp_path_factory.mktemp("moe64") / "qwen3_moe"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    shape = {**SHAPE, "hidden_size": 64, "head_dim": 16}
    AutoModelForCausalLM.from_config(Qwen3MoeConfig(vocab_size=len(tokenizer), intermediate_size=64,
                                                    moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                                                    decoder_sparse_step=1, **shape)).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def test_quantize_moe_experts_packs_experts_in_nf4_and_trains_the_rest(make_config, moe_64):
    pytest.importorskip("bitsandbytes")
    keys = {"base_model": str(moe_64), "adapter": "qlora", "lora_target_linear": None,
            "lora_target_modules": ["q_proj", "v_proj"]}
    plain = load_base_model(load_config(make_config(**keys), log=lambda _n: None), torch.float32,
                            log=lambda _m: None)
    config = load_config(make_config(**keys, quantize_moe_experts=True), log=lambda _n: None)
    lines: list[str] = []
    base = load_base_model(config, torch.float32, log=lines.append)
    assert any(line.startswith("quantization: MoE expert weights in 4-bit NF4") for line in lines)
    experts = base.model.layers[0].mlp.experts
    assert experts.parametrizations.gate_up_proj.original.dtype == torch.uint8
    ids = torch.arange(1, 33).reshape(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids, labels=ids).loss, plain(input_ids=ids, labels=ids).loss,
                                   rtol=0.02, atol=0.02)  # NF4 rounding of the experts only
    model = attach_adapter(base, config, resolve_adapter(config), log=lambda _m: None)
    model(input_ids=ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if "lora_B" in n and p.grad is None]
    assert not missing, missing

    with pytest.raises(ConfigError, match="quantize_moe_experts / lora_target_parameters"):
        moe_config(make_config, moe_64, adapter="qlora", quantize_moe_experts=True)

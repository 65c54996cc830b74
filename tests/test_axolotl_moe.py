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
def test_qwen3_moe_expert_lora_trains_loads_in_peft_and_merges(make_config, moe_dirs, tmp_path):
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
    assert merged.returncode == 0, merged.stderr[-2000:]
    ids = torch.arange(1, 33).reshape(2, 16)
    with torch.no_grad():  # the merged model computes what the base with the adapter computes
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged")(ids).logits,
                                   model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


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
    from axlora.model.expert_quant import PackedExperts

    keys = {"base_model": str(moe_64), "adapter": "qlora", "lora_target_linear": None,
            "lora_target_modules": ["q_proj", "v_proj"]}
    plain = load_base_model(load_config(make_config(**keys), log=lambda _n: None), torch.float32,
                            log=lambda _m: None)
    config = load_config(make_config(**keys, quantize_moe_experts=True), log=lambda _n: None)
    lines: list[str] = []
    base = load_base_model(config, torch.float32, log=lines.append)
    assert any(line.startswith("quantization: MoE expert weights in 4-bit NF4") for line in lines)
    experts = base.model.layers[0].mlp.experts
    assert isinstance(experts.gate_up_proj, PackedExperts) and experts.gate_up_proj.packed.dtype == torch.uint8
    ids = torch.arange(1, 33).reshape(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids, labels=ids).loss, plain(input_ids=ids, labels=ids).loss,
                                   rtol=0.02, atol=0.02)  # NF4 rounding of the experts only
    model = attach_adapter(base, config, resolve_adapter(config), log=lambda _m: None)
    model(input_ids=ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if "lora_B" in n and p.grad is None]
    assert not missing, missing


def _train_steps(model, ids, steps: int) -> list[float]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_expert_lora_on_4bit_experts_trains_only_the_lora_and_loads_in_plain_peft(make_config, moe_64, tmp_path):
    """LoRA on NF4-packed experts: the packed weights stay frozen, the expert LoRA learns, and the saved adapter
    gives the same outputs in plain peft on the unquantized model class holding the same (dequantized) experts."""
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = moe_config(make_config, moe_64, adapter="qlora", quantize_moe_experts=True)
    base = load_base_model(config, torch.float32, log=lambda _m: None)
    packed = {n: p.packed.clone() for n, p in base.named_parameters() if ".experts." in n}
    model = attach_adapter(base, config, resolve_adapter(config), log=lambda _m: None)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(".experts." in n for n in trainable) == 2 * 2 * 2  # gate_up and down, A and B, two layers
    ids = torch.arange(1, 33).reshape(2, 16)
    losses = _train_steps(model, ids, 6)
    assert losses[-1] < losses[0] - 0.1, losses
    expert_b = [p for n, p in model.named_parameters() if ".experts." in n and "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in expert_b)  # lora_B starts at 0: every expert LoRA trained
    now = {n.replace("base_model.model.", "", 1).replace(".base_layer", ""): p.packed
           for n, p in model.named_parameters() if ".experts." in n and not p.requires_grad}
    assert now.keys() == packed.keys() and all(torch.equal(now[n], packed[n]) for n in packed)

    model.save_pretrained(tmp_path / "adapter")
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # the same 4-bit attention layers, experts in full precision holding the very values the packed ones decode to
    unpacked = moe_config(make_config, moe_64, adapter="qlora")
    reference = load_base_model(unpacked, torch.float32, log=lambda _m: None)
    dense = {n.replace("base_model.model.", "", 1).replace(".base_layer", ""): p.dequantized()
             for n, p in model.named_parameters() if ".experts." in n and not p.requires_grad}
    assert not reference.load_state_dict(dense, strict=False).unexpected_keys
    loaded = PeftModel.from_pretrained(reference, str(tmp_path / "adapter"))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    # and on the unquantized model, as a user loads it: every trained tensor lands where it was trained
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moe_64), str(tmp_path / "adapter"))
    for name, value in plain.named_parameters():
        if ".lora_" in name:
            torch.testing.assert_close(value, saved[name])
    assert sum(".lora_" in n for n, _ in plain.named_parameters()) == len(saved)


def test_8bit_base_stores_experts_in_int8_and_trains_their_lora(make_config, moe_64):
    pytest.importorskip("bitsandbytes")
    from axlora.model.expert_quant import PackedExperts

    plain = load_base_model(moe_config(make_config, moe_64, load_in_8bit=True), torch.float32, log=lambda _m: None)
    config = moe_config(make_config, moe_64, load_in_8bit=True, quantize_moe_experts=True)
    lines: list[str] = []
    base = load_base_model(config, torch.float32, log=lines.append)
    assert any(line.startswith("quantization: MoE expert weights in 8-bit (row-wise int8)") for line in lines)
    experts = base.model.layers[0].mlp.experts
    assert isinstance(experts.down_proj, PackedExperts) and experts.down_proj.packed.dtype == torch.int8
    ids = torch.arange(1, 33).reshape(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids, labels=ids).loss, plain(input_ids=ids, labels=ids).loss,
                                   rtol=0.01, atol=0.01)  # int8 rounding of the experts only
    model = attach_adapter(base, config, resolve_adapter(config), log=lambda _m: None)
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    losses = _train_steps(model, ids, 4)
    assert losses[-1] < losses[0], losses


@pytest.mark.slow
def test_axlora_train_runs_expert_lora_on_4bit_experts_in_two_processes(make_config, moe_64, tmp_path):
    """The whole recipe on packed experts, under DDP: its start-up copy of every weight from rank 0 must leave the
    frozen packed experts alone."""
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from conftest import logged

    path = make_config(base_model=str(moe_64), adapter="qlora", quantize_moe_experts=True, lora_target_linear=None,
                       lora_dropout=None, lora_target_modules=["q_proj"], lora_target_parameters=EXPERTS,
                       max_steps=3, save_steps=2, micro_batch_size=2, num_processes=2)
    result = train_ok(path)
    assert "quantization: MoE expert weights in 4-bit NF4" in result.stdout
    assert all(loss == loss for loss in logged(tmp_path / "out"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moe_64), str(tmp_path / "out" / "final"))
    trained = [p for n, p in model.named_parameters() if ".experts." in n and "lora_B" in n]
    assert len(trained) == 4 and all(p.abs().sum() > 0 for p in trained)

"""``llama4_linearized_experts``: Llama 4's fused routed experts as per-expert linear layers (Axolotl's meaning), on a
tiny Llama 4 text model built from transformers' own config class; its expert LoRA is saved in the fused layout, so
plain peft loads it on the standard model."""

from __future__ import annotations

import json

import pytest
import torch

from axlora.config.load import load_config
from axlora.core.errors import ConfigError, UserError
from axlora.model.adapter import attach_adapter
from axlora.model.adapter_choice import resolve_adapter
from axlora.model.load import load_base_model

from conftest import assert_close_final_adapters, logged, run_cli, train_ok

EXPERT_LORA = r"model\.layers\.\d+\.(self_attn\.q_proj|feed_forward\.experts\.(gate_projs|up_projs|down_projs)\.\d+)"


@pytest.fixture(scope="module")
def llama4_dir(tmp_path_factory, tiny_model_dir):
    """Two MoE layers of four experts; 64 wide, as bitsandbytes' CPU kernels quantize blocks of 64."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Llama4TextConfig

    target = tmp_path_factory.mktemp("llama4") / "llama4"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    config = Llama4TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=32,
                              intermediate_size_mlp=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
                              interleave_moe_layer_step=1, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config)
    _give_experts_weights(model.model)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def _give_experts_weights(text_model) -> None:
    """transformers initialises gate_up_proj to zeros: give the experts something to compute."""
    with torch.no_grad():
        for layer in text_model.layers:
            layer.feed_forward.experts.gate_up_proj.normal_(0, 0.2)


@pytest.fixture(scope="module")
def multimodal_dir(tmp_path_factory, llama4_dir):
    """The same tiny language model inside transformers' multimodal Llama 4 class, with a tiny vision tower."""
    from transformers import AutoTokenizer, Llama4Config, Llama4ForConditionalGeneration, Llama4TextConfig

    target = tmp_path_factory.mktemp("llama4") / "multimodal"
    text = Llama4TextConfig.from_pretrained(llama4_dir).to_dict()
    vision = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
              "image_size": 28, "patch_size": 14, "vision_output_dim": 64, "projector_input_dim": 64,
              "projector_output_dim": 64, "pixel_shuffle_ratio": 0.5}
    torch.manual_seed(0)
    model = Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=vision))
    _give_experts_weights(model.language_model.model)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(llama4_dir).save_pretrained(target)
    return target


def _config(make_config, base, **keys):
    settings = {"base_model": str(base), "lora_target_linear": None, "llama4_linearized_experts": True,
                "lora_target_modules": EXPERT_LORA, **keys}
    return load_config(make_config(**settings), log=lambda _n: None)


IDS = torch.arange(1, 33).reshape(2, 16)


def test_linearized_experts_compute_what_the_fused_ones_do(make_config, llama4_dir):
    from transformers import AutoModelForCausalLM

    lines: list[str] = []
    model = load_base_model(_config(make_config, llama4_dir), torch.float32, log=lines.append)
    experts = model.model.layers[1].feed_forward.experts
    assert type(experts).__name__ == "LinearizedLlama4Experts" and len(experts.down_projs) == 4
    assert "model: Llama 4 experts linearized (2 layers x 4 experts x 3 linear layers" in "\n".join(lines)
    standard = AutoModelForCausalLM.from_pretrained(llama4_dir)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, standard(input_ids=IDS).logits)


def _train(model, steps: int = 5) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_expert_lora_saves_in_the_fused_layout_and_loads_in_plain_peft(make_config, llama4_dir, tmp_path):
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    config = _config(make_config, llama4_dir, lora_dropout=0.1)
    lines: list[str] = []
    model = attach_adapter(load_base_model(config, torch.float32, log=lambda _m: None), config,
                           resolve_adapter(config), log=lines.append)
    assert "saved on the fused gate_up_proj and down_proj of the standard Llama 4 model" in "\n".join(lines)
    assert sum(".experts." in n and "lora_A" in n for n, _ in model.named_parameters()) == 2 * 3 * 4
    losses = _train(model)
    assert losses[-1] < losses[0], losses

    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert not any("_projs" in key for key in saved)  # the fused layout of the standard model only
    assert "base_model.model.model.layers.0.feed_forward.experts.base_layer.lora_A.weight" in saved
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_parameters"] == [
        "feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.zero_()
    set_peft_model_state_dict(model, saved)  # what a resume does: back to the very same per-expert weights
    for name, value in model.named_parameters():
        if value.requires_grad:
            torch.testing.assert_close(value, before[name], rtol=0, atol=0)

    model.eval()
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama4_dir), str(tmp_path / "adapter"))
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
        torch.testing.assert_close(plain(input_ids=IDS).logits, expected, rtol=1e-4, atol=1e-4)
        with plain.disable_adapter():
            assert not torch.allclose(plain(input_ids=IDS).logits, expected, atol=1e-3)  # the LoRA changed it

    again = _config(make_config, llama4_dir, lora_model_dir=str(tmp_path / "adapter"))
    with pytest.raises(UserError, match=r"lora_model_dir / llama4_linearized_experts: .*\(target_parameters\)"):
        attach_adapter(load_base_model(again, torch.float32, log=lambda _m: None), again, resolve_adapter(again),
                       log=lambda _m: None)


def test_4bit_base_quantizes_the_linearized_experts_and_trains_them(make_config, llama4_dir):
    pytest.importorskip("bitsandbytes")
    config = _config(make_config, llama4_dir, adapter="qlora")
    lines: list[str] = []
    model = attach_adapter(load_base_model(config, torch.float32, log=lines.append), config,
                           resolve_adapter(config), log=lambda _m: None)
    assert any("4-bit NF4; llama4_linearized_experts" in line for line in lines)
    gate = model.get_base_model().model.layers[0].feed_forward.experts.gate_projs[0]
    assert type(gate.base_layer).__name__ == "Linear4bit"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".lora_" in n for n in trainable)
    losses = _train(model)
    assert losses[-1] < losses[0], losses


def _save(model, target, llama4_dir) -> None:
    """A checkpoint as Axolotl's Llama 4 copies are: the model's weights as loaded (linearized), its tokenizer."""
    from transformers import AutoTokenizer

    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(llama4_dir).save_pretrained(target)


def test_a_checkpoint_saved_linearized_loads_every_expert(make_config, llama4_dir, tmp_path):
    """Axolotl's Llama 4 copies store the per-expert layers: built linearized, every weight comes from the file."""
    from safetensors.torch import load_file

    model = load_base_model(_config(make_config, llama4_dir), torch.float32, log=lambda _m: None)
    _save(model, tmp_path / "linearized", llama4_dir)
    saved = load_file(tmp_path / "linearized" / "model.safetensors")
    assert "model.layers.1.feed_forward.experts.down_projs.3.weight" in saved
    lines: list[str] = []
    torch.manual_seed(1234)  # another random init than the one saved: any weight left unloaded would differ
    loaded = load_base_model(_config(make_config, tmp_path / "linearized"), torch.float32, log=lines.append)
    assert "Llama 4 experts loaded linearized as the checkpoint stores them (2 layers x 4 experts" in "\n".join(lines)
    state = loaded.state_dict()
    assert set(saved) <= set(state)
    for name, value in saved.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=0, atol=0)


def test_a_4bit_checkpoint_saved_linearized_loads_quantized(make_config, llama4_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    config = _config(make_config, llama4_dir, adapter="qlora")
    model = load_base_model(config, torch.float32, log=lambda _m: None)
    _save(model, tmp_path / "nf4", llama4_dir)
    quantized = _config(make_config, tmp_path / "nf4", adapter="qlora")
    loaded = load_base_model(quantized, torch.float32, log=lambda _m: None)
    gate = loaded.model.layers[0].feed_forward.experts.gate_projs[2]
    assert type(gate).__name__ == "Linear4bit"
    torch.testing.assert_close(gate.weight, model.model.layers[0].feed_forward.experts.gate_projs[2].weight,
                               rtol=0, atol=0)  # the packed NF4 bytes of the file, not a fresh quantization
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_a_linearized_checkpoint_missing_experts_is_refused(make_config, llama4_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    model = load_base_model(_config(make_config, llama4_dir), torch.float32, log=lambda _m: None)
    _save(model, tmp_path / "partial", llama4_dir)
    weights = tmp_path / "partial" / "model.safetensors"
    kept = {k: v for k, v in load_file(weights).items() if "experts.up_projs.1." not in k}
    save_file(kept, str(weights), metadata={"format": "pt"})
    with pytest.raises(UserError, match="stores linearized experts but not all of them"):
        load_base_model(_config(make_config, tmp_path / "partial"), torch.float32, log=lambda _m: None)


def test_linearized_experts_refuse_what_they_replace(make_config, llama4_dir, tmp_path):
    with pytest.raises(ConfigError, match="llama4_linearized_experts / lora_target_parameters"):
        _config(make_config, llama4_dir, lora_target_parameters=["feed_forward.experts.gate_up_proj"],
                lora_dropout=0.0)
    with pytest.raises(ConfigError, match="llama4_linearized_experts / quantize_moe_experts"):
        _config(make_config, llama4_dir, adapter="qlora", quantize_moe_experts=True)
    with pytest.raises(ConfigError, match="llama4_linearized_experts / deepspeed: ZeRO-3"):
        _config(make_config, llama4_dir, deepspeed="zero3", num_processes=2)


@pytest.mark.slow
def test_axlora_train_on_linearized_experts_saves_an_adapter_for_the_standard_model(make_config, llama4_dir,
                                                                                   tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = make_config(base_model=str(llama4_dir), lora_target_linear=None, llama4_linearized_experts=True,
                       lora_target_modules=EXPERT_LORA, max_steps=3, save_steps=2)
    result = train_ok(path)
    assert "Llama 4 experts linearized" in result.stdout
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama4_dir), str(tmp_path / "out" / "final"))
    experts = [p for n, p in model.named_parameters() if ".experts." in n and "lora_B" in n]
    assert len(experts) == 4 and all(p.abs().sum() > 0 for p in experts)
    merged = run_cli("merge-lora", str(path))  # the standard layout merges like any expert LoRA
    assert merged.returncode == 0, merged.stderr[-2000:]
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged")(IDS).logits,
                                   model(input_ids=IDS).logits, rtol=1e-4, atol=1e-4)


AXOLOTL_TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"]
"""The LoRA targets of Axolotl's Llama 4 examples: suffixes the vision tower's attention has too."""


def _multimodal_config(make_config, base, **keys):
    return _config(make_config, base, model_type="Llama4ForConditionalGeneration", lora_target_modules=AXOLOTL_TARGETS,
                   **keys)


def test_multimodal_class_trains_its_language_model_on_text(make_config, multimodal_dir, tmp_path):
    from peft import PeftModel
    from transformers import Llama4ForConditionalGeneration

    config = _multimodal_config(make_config, multimodal_dir)
    lines: list[str] = []
    model = attach_adapter(load_base_model(config, torch.float32, log=lines.append), config, resolve_adapter(config),
                           log=lambda _m: None)
    assert "training its language model on text; vision_model and multi_modal_projector stay frozen" in "\n".join(lines)
    adapted = [name for name, _ in model.named_parameters() if "lora_A" in name]
    assert adapted and all(".language_model." in name for name in adapted)
    assert len(adapted) == 2 * 7  # two layers x the seven targets; none in the vision tower's own self_attn
    vision = {n: p.detach().clone() for n, p in model.named_parameters() if ".vision_model." in n}
    losses = _train(model)
    assert losses[-1] < losses[0], losses
    assert all(torch.equal(p, vision[n]) for n, p in model.named_parameters() if n in vision)

    model.save_pretrained(tmp_path / "adapter")
    model.eval()
    plain = PeftModel.from_pretrained(Llama4ForConditionalGeneration.from_pretrained(multimodal_dir),
                                      str(tmp_path / "adapter"))
    with torch.no_grad():  # the class's own forward fails in transformers 5.2x: compare through its language model
        torch.testing.assert_close(plain.base_model.model.language_model(input_ids=IDS).logits,
                                   model(input_ids=IDS).logits, rtol=1e-4, atol=1e-4)


def test_multimodal_class_from_a_4bit_linearized_checkpoint(make_config, multimodal_dir, tmp_path):
    """Axolotl's Llama 4 examples as written: the multimodal class, linearized experts, a pre-quantized checkpoint."""
    pytest.importorskip("bitsandbytes")
    quantizing = _multimodal_config(make_config, multimodal_dir, adapter="qlora")
    _save(load_base_model(quantizing, torch.float32, log=lambda _m: None), tmp_path / "nf4", multimodal_dir)
    config = _multimodal_config(make_config, tmp_path / "nf4", adapter="qlora")
    lines: list[str] = []
    model = attach_adapter(load_base_model(config, torch.float32, log=lines.append), config, resolve_adapter(config),
                           log=lambda _m: None)
    assert "loaded linearized as the checkpoint stores them (2 layers x 4 experts x 3 linear layers, 4-bit NF4" \
        in "\n".join(lines)
    experts = model.get_base_model().language_model.model.layers[1].feed_forward.experts
    assert type(experts.down_projs[3]).__name__ == "Linear4bit"
    losses = _train(model)
    assert losses[-1] < losses[0], losses


@pytest.mark.slow
def test_axlora_train_runs_axolotls_llama4_example_shape(make_config, multimodal_dir, tmp_path):
    """axlora train with the keys of Axolotl's scout-qlora examples on a tiny pre-quantized linearized checkpoint."""
    from peft import PeftModel
    from transformers import Llama4ForConditionalGeneration

    quantizing = _multimodal_config(make_config, multimodal_dir, adapter="qlora")
    _save(load_base_model(quantizing, torch.float32, log=lambda _m: None), tmp_path / "nf4", multimodal_dir)
    path = make_config(base_model=str(tmp_path / "nf4"), model_type="Llama4ForConditionalGeneration",
                       llama4_linearized_experts=True, load_in_4bit=True, adapter="qlora", lora_target_linear=None,
                       lora_target_modules=AXOLOTL_TARGETS, max_steps=2, sample_prompts=["What is 2 + 3?"],
                       sample_max_new_tokens=3)
    result = train_ok(path)
    assert "loaded linearized as the checkpoint stores them" in result.stdout
    summary = json.loads((tmp_path / "out" / "final" / "train_summary.json").read_text())
    assert isinstance(summary["samples"][0]["after"], str)  # generation runs through the text-only forward
    model = PeftModel.from_pretrained(Llama4ForConditionalGeneration.from_pretrained(multimodal_dir),
                                      str(tmp_path / "out" / "final"))
    trained = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(trained) == 2 * 7 and all(p.abs().sum() > 0 for p in trained)


@pytest.mark.slow
def test_fsdp_shards_linearized_experts_and_trains_what_one_process_does(make_config, llama4_dir, tmp_path):
    """Axolotl's Llama 4 FSDP examples: the per-layer units hold the per-expert layers. Rank 1 builds its model
    empty (cpu_ram_efficient_loading) and linearizes it on the meta device; rank 0 sends the weights after sharding."""
    common = {"base_model": str(llama4_dir), "lora_target_linear": None, "llama4_linearized_experts": True,
              "lora_target_modules": EXPERT_LORA, "max_steps": 2, "seed": 7}
    train_ok(make_config("one.yml", micro_batch_size=4, output_dir=str(tmp_path / "one"), **common))
    fsdp = {"fsdp": ["full_shard", "auto_wrap"],
            "fsdp_config": {"fsdp_transformer_layer_cls_to_wrap": "Llama4TextDecoderLayer",
                            "fsdp_cpu_ram_efficient_loading": True}}
    result = train_ok(make_config(micro_batch_size=2, num_processes=2, **fsdp, **common))
    assert "launch: 2 processes" in result.stdout and "Llama 4 experts linearized" in result.stdout
    figures = json.loads((tmp_path / "out" / "final" / "train_summary.json").read_text())["fsdp"]
    assert figures["layers_sharded"] == 2 and 0.45 < figures["sharded_parameters_on_this_rank"] / \
        figures["sharded_parameters"] < 0.55
    assert logged(tmp_path / "out") == pytest.approx(logged(tmp_path / "one"), rel=1e-4)
    assert_close_final_adapters(tmp_path / "out", tmp_path / "one", rtol=1e-4, atol=1e-6)


def test_a_checkpoint_without_safetensors_is_refused_by_name(make_config, llama4_dir, tmp_path):
    import shutil

    target = tmp_path / "no-weights"
    target.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (llama4_dir / name).exists():
            shutil.copy(llama4_dir / name, target / name)
    with pytest.raises(UserError, match=r"llama4_linearized_experts: found no safetensors weights .* of base_model"):
        load_base_model(_config(make_config, target), torch.float32, log=lambda _m: None)

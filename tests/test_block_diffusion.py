"""Block-diffusion fine-tuning of DiffusionGemma (``block_diffusion``, Axolotl's DiffusionGemmaPlugin), on a tiny
DiffusionGemma built from its real config class with the test tokenizer."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from axlora.config.block_diffusion_keys import IMAGE_ONLY_PARTS
from axlora.config.load import load_config
from axlora.core.errors import UserError
from axlora.train.block_diffusion_canvas import CanvasShape, canvas_batch, split_row
from axlora.train.block_diffusion_loss import Corruption, corrupt_canvas, row_losses, sample_timesteps

from conftest import logged, main_in_process, train_ok

PLUGIN = "axolotl.integrations.diffusion_gemma.DiffusionGemmaPlugin"
AXOLOTL_KEYS = {
    "plugins": [PLUGIN, "axolotl.integrations.kernels.KernelsPlugin"],
    "type_of_model": "DiffusionGemmaForBlockDiffusion",
    "use_kernels": True, "use_scattermoe": True, "lora_qkv_kernel": False, "lora_o_kernel": False,
    "block_diffusion": {"canvas_length": 8, "corruption": "uniform", "loss_weighting": "elbo",
                        "self_conditioning_prob": 0.5},
    "sample_packing": False, "gradient_checkpointing": False, "flash_attention": False,
    "lora_target_linear": None, "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "lora_target_parameters": ["experts.gate_up_proj", "experts.down_proj"],
}


@pytest.fixture(scope="module")
def diffusion_gemma_dir(tmp_path_factory, tiny_model_dir):
    """A 2-layer DiffusionGemma (4 experts, a 1-layer vision tower) with the test tokenizer, saved for from_pretrained."""
    from transformers import AutoTokenizer, DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, global_head_dim=16, num_experts=4,
                top_k_experts=2, moe_intermediate_size=16, sliding_window=16, max_position_embeddings=512,
                initializer_range=0.2,
                layer_types=["sliding_attention", "full_attention"], pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=8, position_embedding_size=64)
    torch.manual_seed(0)  # weights wide enough that a few LoRA steps move the logits of a 32-wide model
    model = DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(text_config=text, vision_config=vision,
                                                                 canvas_length=16, initializer_range=0.2))
    target = tmp_path_factory.mktemp("diffusion-gemma") / "model"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def test_corruption_touches_only_response_tokens_at_rate_t():
    generator = torch.Generator().manual_seed(0)
    canvas = torch.randint(0, 50, (4, 4000), generator=generator)
    eligible = torch.ones_like(canvas, dtype=torch.bool)
    eligible[:, 3000:] = False  # padding after the response
    t = torch.tensor([0.1, 0.3, 0.6, 1.0])
    uniform = Corruption("uniform", vocab_size=50)
    noised, corrupted = corrupt_canvas(canvas, eligible, t, uniform, generator)
    assert not corrupted[:, 3000:].any() and torch.equal(noised[:, 3000:], canvas[:, 3000:])
    assert torch.equal(noised[~corrupted], canvas[~corrupted])
    rates = corrupted[:, :3000].float().mean(dim=1)
    assert torch.allclose(rates, t, atol=0.03), rates
    changed = (noised != canvas)[corrupted].float().mean()
    assert abs(float(changed) - 49 / 50) < 0.01  # a uniform draw keeps the token 1 time in 50
    masked, corrupted = corrupt_canvas(canvas, eligible, t, Corruption("mask", 50, mask_token_id=7), generator)
    assert (masked[corrupted] == 7).all() and torch.equal(masked[~corrupted], canvas[~corrupted])
    times = sample_timesteps(10_000, 0.2, generator)
    assert times.min() >= 0.2 and times.max() <= 1.0 and abs(float(times.mean()) - 0.6) < 0.01


def test_row_loss_is_mean_cross_entropy_of_corrupted_tokens_over_t():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]],
                           [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.0, 0.0]]])
    canvas = torch.tensor([[0, 2, 2], [1, 0, 0]])
    corrupted = torch.tensor([[True, True, False], [False, False, False]])
    t = torch.tensor([0.25, 0.5])

    def ce(row, position):
        values = logits[row, position].tolist()
        return math.log(sum(math.exp(v) for v in values)) - values[canvas[row, position]]

    expected_first = (ce(0, 0) + ce(0, 1)) / 2
    elbo, sums = row_losses(logits, canvas, corrupted, t, "elbo")
    assert elbo[0].item() == pytest.approx(expected_first / 0.25, rel=1e-5)
    assert elbo[1].item() == 0.0  # nothing corrupted: the row adds nothing
    assert sums[0].item() == pytest.approx(ce(0, 0) + ce(0, 1), rel=1e-5)
    uniform, _ = row_losses(logits, canvas, corrupted, t, "uniform")
    assert uniform[0].item() == pytest.approx(expected_first, rel=1e-5)


def test_a_long_response_trains_one_block_with_the_blocks_before_it_in_the_prefix():
    shape = CanvasShape(canvas_length=4, pad_token_id=0, bos_token_id=1)
    prompt, response = [10, 11, 12], list(range(20, 30))  # 10 response tokens: blocks of 4, 4 and 2
    labels = [-100] * 3 + response
    starts = set()
    for seed in range(40):
        prefix, canvas, trained = split_row(prompt + response, labels, shape, torch.Generator().manual_seed(seed))
        start = len(prefix) - len(prompt)
        assert prefix == prompt + response[:start] and canvas == response[start:start + 4]
        assert trained == [True] * len(canvas)
        starts.add(start)
    assert starts == {0, 4, 8}
    no_prompt = split_row([5, 6], [5, 6], shape, torch.Generator())
    assert no_prompt == ([1], [5, 6], [True, True])
    batch = canvas_batch([{"input_ids": prompt + [20, 21], "labels": [-100] * 3 + [20, 21]},
                          {"input_ids": [9, 20], "labels": [-100, 20]}], shape, torch.Generator())
    assert batch["input_ids"].tolist() == [[10, 11, 12], [9, 0, 0]]
    assert batch["canvas"].tolist() == [[20, 21, 0, 0], [20, 0, 0, 0]]
    assert batch["eligible"].tolist() == [[True, True, False, False], [True, False, False, False]]
    assert batch["canvas_positions"].tolist() == [[3, 4, 5, 6], [1, 2, 3, 4]]  # right after each row's own prefix


def test_axolotl_diffusion_gemma_keys_validate_and_read_as_block_diffusion(make_config, capsys):
    config = load_config(make_config(**AXOLOTL_KEYS), log=lambda _note: None)
    assert config.block_diffusion is not None and config.block_diffusion.canvas_length == 8
    assert config.model_type is None  # block_diffusion loads DiffusionGemmaForBlockDiffusion itself
    pattern = config.lora_target_modules
    assert re.fullmatch(pattern, "model.decoder.layers.0.self_attn.q_proj")
    assert re.fullmatch(pattern, "model.encoder.language_model.layers.1.self_attn.o_proj")
    assert not any(re.fullmatch(pattern, f"{part}.encoder.layers.0.self_attn.q_proj") for part in IMAGE_ONLY_PARTS)
    plugin_only = load_config(make_config(plugins=[PLUGIN]), log=lambda _note: None)
    assert plugin_only.block_diffusion is not None and plugin_only.block_diffusion.loss_weighting == "elbo"
    nvfp4 = {**AXOLOTL_KEYS, "block_diffusion": {**AXOLOTL_KEYS["block_diffusion"], "frozen_fp4_experts": "nvfp4"}}
    assert main_in_process(capsys, "validate", str(make_config(**nvfp4))).returncode == 0
    for bad, key in (({"sample_packing": True}, "sample_packing"), ({"type_of_model": "LlamaForCausalLM"}, "model_type"),
                     ({"block_diffusion": {"corruption": "mask"}}, "mask_token_id")):
        result = main_in_process(capsys, "validate", str(make_config(**{**AXOLOTL_KEYS, **bad})))
        assert result.returncode == 2 and key in result.stderr, result.stderr


def test_frozen_fp4_experts_stop_naming_what_is_missing(make_config):
    from axlora.model.diffusion_gemma import require_fp4_experts_support

    keys = {**AXOLOTL_KEYS, "block_diffusion": {"frozen_fp4_experts": "nvfp4"}}
    config = load_config(make_config(**keys), log=lambda _note: None)
    with pytest.raises(UserError, match="frozen_fp4_experts: nvfp4 experts need .*ScatterMoE") as error:
        require_fp4_experts_support(config)
    assert ("a CUDA GPU" in str(error.value)) == (not torch.cuda.is_available())


@pytest.mark.slow
def test_block_diffusion_trains_saves_a_plain_peft_adapter_and_refuses_merge(make_config, diffusion_gemma_dir,
                                                                             tmp_path, capsys):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import DiffusionGemmaForBlockDiffusion

    data = tmp_path / "one.jsonl"  # one row repeated: the validation rows are the training rows
    row = json.dumps({"instruction": "Add the two numbers.", "input": "15+37", "output": "52"})
    data.write_text((row + "\n") * 10)
    config = make_config(**{**AXOLOTL_KEYS, "block_diffusion": {"canvas_length": 8}},
                         base_model=str(diffusion_gemma_dir), datasets=[{"path": str(data), "type": "alpaca"}],
                         val_set_size=2, eval_on_start=True, eval_steps=8, max_steps=8, micro_batch_size=4,
                         learning_rate=0.05)
    result = train_ok(config)
    assert "block diffusion on canvases of 8 tokens" in result.stdout
    out = tmp_path / "out"
    losses, evals = logged(out), logged(out, "eval_loss")
    assert len(losses) == 8 and all(math.isfinite(loss) for loss in losses)
    assert evals[-1] < 0.85 * evals[0], evals  # the same draws at each evaluation: the model restores more
    saved = load_file(out / "final" / "adapter_model.safetensors")
    assert any("decoder.layers.0.experts" in name for name in saved)
    assert not any("vision" in name for name in saved)
    base = DiffusionGemmaForBlockDiffusion.from_pretrained(diffusion_gemma_dir)
    ids, canvas = torch.tensor([[2, 40, 41, 42]]), torch.tensor([[50, 51, 52, 53, 54, 55, 56, 57]])
    with torch.no_grad():
        before = base(input_ids=ids, decoder_input_ids=canvas).logits
        peft_model = PeftModel.from_pretrained(base, out / "final")
        after = peft_model(input_ids=ids, decoder_input_ids=canvas).logits
    loaded = {name: tensor for name, tensor in peft_model.state_dict().items() if "lora_B" in name}
    assert len(loaded) == sum("lora_B" in name for name in saved) and not torch.allclose(before, after)
    merge = main_in_process(capsys, "merge-lora", str(config))
    assert merge.returncode == 2 and "encoder and decoder share their weights" in merge.stderr

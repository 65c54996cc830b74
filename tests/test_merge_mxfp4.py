"""merge-lora on a gpt-oss base whose checkpoint stores the experts MXFP4-packed (the Hub's openai/gpt-oss-*): the
experts are decoded as they stream, take their LoRA, and the merged model is a plain one transformers loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from test_axolotl_moe import EXPERTS
from test_merge_experts import _expert_adapter
from transformers import AutoModelForCausalLM, AutoTokenizer, GptOssConfig
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from axlora.core.errors import UserError
from axlora.core.safetensors_header import read_header
from axlora.merge import merge_lora
from axlora.merge.base import load_base
from axlora.merge.mxfp4 import FP4_E2M1_VALUES, Mxfp4Tensor, decoded_tensors, read_decoded
from axlora.merge.safetensors_io import TensorReader

from conftest import run_cli

IDS = torch.tensor([[1, 5, 17, 42, 60, 3, 64, 11, 25, 7, 90, 33]])
MXFP4_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
# Non-square expert matrices whose columns span one and three groups of 32 values: a transposed or regrouped
# decode cannot pass for the right one.
SHAPE = dict(hidden_size=96, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
             layer_types=["full_attention"] * 2)


def _packed_experts(model, gen: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Set every expert parameter to random values on the MXFP4 grid; returns its (blocks, scales).

    The values are built from random 4-bit codes and exponents, so encoding them is exact by construction.
    """
    table = torch.tensor(FP4_E2M1_VALUES)
    packed = {}
    for name, param in model.named_parameters():
        if not name.endswith(tuple(f".{parameter}" for parameter in EXPERTS)):
            continue
        experts, columns, rows = param.shape  # the model's (experts x in x out); stored as rows of out
        codes = torch.randint(0, 16, (experts, rows, columns // 32, 32), generator=gen, dtype=torch.uint8)
        scales = torch.randint(121, 127, codes.shape[:3], generator=gen, dtype=torch.uint8)
        values = table[codes.long()] * torch.pow(2.0, scales.float() - 127).unsqueeze(-1)
        with torch.no_grad():
            param.copy_(values.reshape(experts, rows, columns).transpose(1, 2))
        packed[name] = (codes[..., 0::2] | (codes[..., 1::2] << 4), scales)
    return packed


def _write_packed(model, packed: dict, target: Path, tokenizer) -> None:
    """The checkpoint as the Hub ships gpt-oss: experts as *_blocks/*_scales, quantization_config in config.json,
    in two shards with one layer's scales apart from its blocks."""
    target.mkdir()
    state = {}
    for name, tensor in model.state_dict().items():
        if name in packed:
            state[name + "_blocks"], state[name + "_scales"] = packed[name]
        else:
            state[name] = tensor.contiguous()
    second = {n for n in state if n.startswith("model.layers.1.") and n.endswith("_scales")} | {"lm_head.weight"}
    shards = {"model-00001-of-00002.safetensors": {n: t for n, t in state.items() if n not in second},
              "model-00002-of-00002.safetensors": {n: state[n] for n in second}}
    for filename, tensors in shards.items():
        save_file(tensors, target / filename, metadata={"format": "pt"})
    weight_map = {n: f for f, tensors in shards.items() for n in tensors}
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model.config.save_pretrained(target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "quantization_config": MXFP4_CONFIG}))
    tokenizer.save_pretrained(target)


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """``packed``: the MXFP4 checkpoint; ``plain``: the same model decoded (fp32), to train an adapter on."""
    root = tmp_path_factory.mktemp("mxfp4")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GptOssConfig(vocab_size=len(tokenizer), **SHAPE))
    packed = _packed_experts(model, torch.Generator().manual_seed(1))
    model.save_pretrained(root / "plain")
    tokenizer.save_pretrained(root / "plain")
    _write_packed(model, packed, root / "packed", tokenizer)
    return {"plain": root / "plain", "packed": root / "packed"}


def _stored(directory: Path) -> dict[str, torch.Tensor]:
    return {n: t for shard in sorted(directory.glob("model-*.safetensors")) for n, t in load_file(shard).items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_decoding_is_bitwise_transformers(tmp_path, dtype):
    """Every code and every finite exponent (e8m0 255 is NaN), decoded as transformers decodes them."""
    gen = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(0, 255, (3, 40, 4), generator=gen, dtype=torch.uint8)
    save_file({"w_blocks": blocks, "w_scales": scales}, tmp_path / "m.safetensors")
    infos, _ = read_header(tmp_path / "m.safetensors")
    info = decoded_tensors(tmp_path, {i.name: i for i in infos})["w"]
    assert isinstance(info, Mxfp4Tensor) and info.shape == (3, 128, 40)
    with TensorReader(tmp_path / "m.safetensors") as reader:
        ours = read_decoded(info, lambda _path: reader, dtype)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    assert ours.dtype == theirs.dtype == dtype and ours.shape == theirs.shape
    assert torch.equal(ours.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       theirs.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_unadapted_experts_are_written_decoded_in_bfloat16(bases, tmp_path):
    adapter = _expert_adapter(bases["plain"], tmp_path / "adapter", r=4, target_modules=["q_proj"])
    report = merge_lora(bases["packed"], adapter, tmp_path / "merged", log=lambda _: None)
    assert report.merged_modules == 2
    merged = load_file(tmp_path / "merged" / "model-00001-of-00001.safetensors")
    stored = _stored(bases["packed"])
    packed = [n.removesuffix("_blocks") for n in stored if n.endswith("_blocks")]
    assert len(packed) == 4 and set(merged) == (set(stored) - {f"{n}_{s}" for n in packed for s in ("blocks", "scales")}
                                                | set(packed))
    for name in packed:
        expected = convert_moe_packed_tensors(stored[name + "_blocks"], stored[name + "_scales"], dtype=torch.bfloat16)
        assert merged[name].dtype == torch.bfloat16 and torch.equal(merged[name], expected), name
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_a_broken_pair_is_refused(bases, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(bases["packed"] / "config.json", broken)
    stored = _stored(bases["packed"])
    save_file({n: t for n, t in stored.items() if n != "model.layers.1.mlp.experts.down_proj_scales"},
              broken / "model.safetensors")
    with pytest.raises(UserError, match=r"'model\.layers\.1\.mlp\.experts\.down_proj_blocks' has no "
                                        r"'model\.layers\.1\.mlp\.experts\.down_proj_scales' beside it"):
        load_base(broken)
    stored["model.layers.1.mlp.experts.down_proj_scales"] = torch.zeros(4, 96, 2, dtype=torch.uint8)
    save_file(stored, broken / "model.safetensors")
    with pytest.raises(UserError, match=r"down_proj_blocks' \(U8 \[4, 96, 1, 16\]\) and .* are not MXFP4 experts"):
        load_base(broken)


@pytest.mark.slow
def test_merge_lora_command_merges_experts_and_attention_into_a_packed_base(make_config, bases, tmp_path):
    adapter = _expert_adapter(bases["plain"], tmp_path / "adapter", r=4, lora_alpha=8,
                              target_modules=["q_proj", "o_proj"], target_parameters=EXPERTS)
    path = make_config(base_model=str(bases["packed"]), lora_target_linear=None, lora_target_modules=["q_proj"])
    result = run_cli("merge-lora", str(path), "--lora-model-dir", str(adapter), "--output", str(tmp_path / "merged"),
                     "--dtype", "float32")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "8 LoRA modules" in result.stdout  # per layer: q_proj, o_proj and both expert parameters
    assert "(4 MXFP4 expert tensors decoded)" in result.stdout
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    # the reference is peft on the base as transformers itself decodes the packed checkpoint
    decoded = AutoModelForCausalLM.from_pretrained(bases["packed"], dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(decoded, adapter).eval()
    merged, info = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        expected = peft_model(IDS).logits
        with peft_model.disable_adapter():
            assert (peft_model(IDS).logits - expected).abs().max() > 1e-2
        torch.testing.assert_close(merged.eval()(IDS).logits, expected, rtol=1e-4, atol=1e-4)

"""Tests for the streamed LoRA merge: merged models must reproduce PeftModel(base + adapter) exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from fs_faults import read_only_dir, small_disk
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from axlora.core.errors import UserError
from axlora.core.names import MERGE_MARKER
from axlora.merge import MergeVerificationError, merge_lora
from axlora.merge import ops as merge_ops
from axlora.merge.safetensors_io import ShardWriter
from axlora.merge.tensor_map import _with_vocab_size

from conftest import main_in_process

ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.tensor([[1, 5, 17, 99, 200, 3, 64, 128, 255, 7]])


def _llama(tie: bool = False, hidden: int = 64, layers: int = 2) -> LlamaConfig:
    return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, vocab_size=256, tie_word_embeddings=tie, max_position_embeddings=64)


def _save_base(config, path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A random tiny model saved in several shards, like a real sharded checkpoint."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(path, max_shard_size="60KB")
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    return path


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices: thread-pool synchronisation costs more than it saves, badly so on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return _save_base(_llama(), tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory) -> Path:
    return _save_base(_llama(tie=True), tmp_path_factory.mktemp("tied"))


def _make_adapter(base_dir: Path, out: Path, seed: int = 1, vocab: int | None = None,
                  save_embedding_layers: bool | str = "auto", **lora_kwargs) -> Path:
    """A real peft adapter with non-zero B (peft initialises it to zero) and perturbed saved modules;
    ``vocab`` resizes the embeddings first, as training after adding tokens does."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if vocab is not None:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name or "lora_magnitude_vector" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
            elif "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(out, save_embedding_layers=save_embedding_layers)
    return out


def _peft_logits(base_dir: Path, adapter_dir: Path, vocab: int | None = None, ids: torch.Tensor = IDS) -> torch.Tensor:
    """Logits of PeftModel(base + adapter); also checks the adapter really changes them (else tests prove nothing)."""
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    if vocab is not None:
        base.resize_token_embeddings(vocab, mean_resizing=False)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        logits = model(ids).logits.float()
        with model.disable_adapter():
            assert (model(ids).logits.float() - logits).abs().max() > 1e-2
    return logits


def _merged_logits(merged_dir: Path, ids: torch.Tensor = IDS) -> torch.Tensor:
    model, info = AutoModelForCausalLM.from_pretrained(merged_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        return model.eval()(ids).logits.float()


def _tensors(merged_dir: Path) -> dict[str, torch.Tensor]:
    index = json.loads((merged_dir / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(merged_dir / shard, "pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    assert set(out) == set(index["weight_map"])
    return out


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _assert_matches_peft(base_dir: Path, adapter_dir: Path, merged_dir: Path, atol: float = 1e-4) -> None:
    diff = (_merged_logits(merged_dir) - _peft_logits(base_dir, adapter_dir)).abs().max().item()
    assert diff <= atol, diff


def test_all_attention_and_mlp_targets_match_peft(base, tmp_path):
    adapter = _make_adapter(base, tmp_path / "ad", r=8, lora_alpha=16, target_modules=ATTN_MLP)
    out = tmp_path / "merged"
    logs: list[str] = []
    report = merge_lora(base, adapter, out, max_shard_size=64 * 1024, log=logs.append)

    _assert_matches_peft(base, adapter, out)
    assert report.merged_modules == 14 and report.output_dir == out
    assert report.max_verify_error is not None and report.max_verify_error < 1e-5
    assert any("largest relative error" in line for line in logs)
    tensors = _tensors(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == report.total_size
    assert all(t.dtype == torch.float32 for t in tensors.values())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) == report.shards > 2
    largest = max(t.numel() * t.element_size() for t in tensors.values())
    assert all(p.stat().st_size <= max(64 * 1024, largest) + 4096 for p in shards)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert (out / "generation_config.json").exists() and (out / "tokenizer_config.json").exists()
    marker = json.loads((out / MERGE_MARKER).read_text())
    assert marker["merged_modules"] == 14 and marker["dtype"] == "float32"
    assert _leftovers(tmp_path) == []


def test_rslora_rank_and_alpha_patterns(base, tmp_path):
    adapter = _make_adapter(base, tmp_path / "ad", r=8, lora_alpha=16, use_rslora=True, target_modules=ATTN_MLP,
                            rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 2},
                            alpha_pattern={"v_proj": 40, "model.layers.0.mlp.up_proj": 3})
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["use_rslora"] and cfg["rank_pattern"] and cfg["alpha_pattern"]
    merge_lora(base, adapter, tmp_path / "merged", log=lambda _: None)
    _assert_matches_peft(base, adapter, tmp_path / "merged")


def test_modules_to_save_lm_head_replaces_the_base_tensor(base, tmp_path):
    adapter = _make_adapter(base, tmp_path / "ad", r=4, target_modules=["q_proj", "v_proj"],
                            modules_to_save=["lm_head"])
    report = merge_lora(base, adapter, tmp_path / "merged", log=lambda _: None)
    assert report.replaced_tensors == 1 and report.merged_modules == 4
    _assert_matches_peft(base, adapter, tmp_path / "merged")


def test_tied_embeddings_stay_tied_when_untouched(tied_base, tmp_path):
    adapter = _make_adapter(tied_base, tmp_path / "ad", r=4, target_modules=["q_proj", "v_proj"])
    merge_lora(tied_base, adapter, tmp_path / "merged", log=lambda _: None)
    assert "lm_head.weight" not in _tensors(tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is True
    _assert_matches_peft(tied_base, adapter, tmp_path / "merged")


@pytest.mark.parametrize("kwargs", [
    {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    {"target_modules": ["q_proj", "embed_tokens"]},
], ids=["lm_head_saved", "embedding_lora"])
def test_tied_embeddings_untied_like_peft_forward(tied_base, tmp_path, kwargs):
    adapter = _make_adapter(tied_base, tmp_path / "ad", r=4, **kwargs)
    merge_lora(tied_base, adapter, tmp_path / "merged", log=lambda _: None)
    assert "lm_head.weight" in _tensors(tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    _assert_matches_peft(tied_base, adapter, tmp_path / "merged")


NEW_IDS = torch.tensor([[1, 5, 257, 99, 259, 3, 256]])  # ids past the base's 256 rows


@pytest.mark.parametrize(("tied", "kwargs"), [
    (False, {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens", "lm_head"]}),
    (True, {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens", "lm_head"]}),
    (True, {"target_modules": ["q_proj", "embed_tokens"]}),
    (False, {"target_modules": ["q_proj", "v_proj"]}),
], ids=["modules_to_save", "tied_modules_to_save", "tied_embedding_lora", "untrained_new_rows"])
def test_resized_vocabulary_matches_peft(base, tied_base, tmp_path, tied, kwargs):
    """After adding tokens peft saves the embeddings whole with more rows (and modules_to_save twice, plus the
    untrained original): the merge takes the trained ones and announces the new vocab_size."""
    base_dir = tied_base if tied else base
    adapter = _make_adapter(base_dir, tmp_path / "ad", vocab=260, r=4, **kwargs)
    merge_lora(base_dir, adapter, tmp_path / "merged", log=lambda _: None)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["vocab_size"] == 260
    assert {t.shape[0] for n, t in _tensors(tmp_path / "merged").items() if "embed" in n or "lm_head" in n} == {260}
    diff = (_merged_logits(tmp_path / "merged", NEW_IDS) - _peft_logits(base_dir, adapter, 260, NEW_IDS)).abs().max()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"target_modules": ["q_proj", "embed_tokens"], "save_embedding_layers": False},
     "LoRA for 'model.embed_tokens' was trained on a vocabulary of 260 rows.*save_embedding_layers"),
    ({"target_modules": ["q_proj", "embed_tokens"]},  # untied: peft saves no resized lm_head
     "disagree on its size: model.embed_tokens.weight has 260 rows.*lm_head.weight has 256 rows"),
], ids=["lora_only", "head_missing"])
def test_resized_vocabulary_without_its_weights_is_refused(base, tmp_path, kwargs, message):
    adapter = _make_adapter(base, tmp_path / "ad", vocab=260, r=4, **kwargs)
    with pytest.raises(UserError, match=message):
        merge_lora(base, adapter, tmp_path / "merged", log=lambda _: None)
    assert not (tmp_path / "merged").exists()


def test_modules_to_save_copies_must_agree(base, tmp_path):
    adapter = _make_adapter(base, tmp_path / "ad", vocab=260, r=4, target_modules=["q_proj"],
                            modules_to_save=["embed_tokens", "lm_head"])
    path = adapter / "adapter_model.safetensors"
    weights = load_file(path)
    assert "base_model.model.lm_head.original_module.weight" in weights
    weights["base_model.model.lm_head.modules_to_save.weight"][7, 3] += 1.0
    save_file(weights, path, metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"'base_model.model.lm_head.weight' and "
                                        r"'base_model.model.lm_head.modules_to_save.weight'.*different values"):
        merge_lora(base, adapter, tmp_path / "merged", log=lambda _: None)


def test_resized_vocab_size_goes_where_the_config_keeps_it():
    assert _with_vocab_size({"vocab_size": 8}, 9) == {"vocab_size": 9}
    nested = _with_vocab_size({"model_type": "gemma3", "text_config": {"vocab_size": 8, "hidden_size": 4}}, 9)
    assert nested == {"model_type": "gemma3", "text_config": {"vocab_size": 9, "hidden_size": 4}}


def test_dora_matches_peft(base, tmp_path):
    adapter = _make_adapter(base, tmp_path / "ad", r=4, lora_alpha=8, use_dora=True,
                            target_modules=["q_proj", "v_proj", "down_proj"])
    merge_lora(base, adapter, tmp_path / "merged", log=lambda _: None)
    _assert_matches_peft(base, adapter, tmp_path / "merged")


def test_gpt2_conv1d_fan_in_fan_out_with_lora_bias(tmp_path):
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)
    base = _save_base(config, tmp_path / "gpt2")
    adapter = _make_adapter(base, tmp_path / "ad", r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                            lora_bias=True)
    with torch.no_grad():  # lora_B.bias is initialised to zero as well; make it count
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter, is_trainable=True)
        for name, param in model.named_parameters():
            if name.endswith("lora_B.default.bias"):
                param.normal_(std=0.1)
        model.save_pretrained(adapter)
    report = merge_lora(base, adapter, tmp_path / "merged", log=lambda _: None)
    assert report.merged_modules == 6
    _assert_matches_peft(base, adapter, tmp_path / "merged")


def test_bfloat16_output_and_default_keeps_base_dtype(base, tmp_path):
    adapter = _make_adapter(base, tmp_path / "ad", r=8, target_modules=ATTN_MLP)
    report = merge_lora(base, adapter, tmp_path / "bf16", dtype="bfloat16", log=lambda _: None)
    assert {t.dtype for t in _tensors(tmp_path / "bf16").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert report.dtype == "bfloat16" and 0 < report.max_verify_error < 1e-2
    report = merge_lora(base, adapter, tmp_path / "fp16", dtype="float16", log=lambda _: None)
    assert {t.dtype for t in _tensors(tmp_path / "fp16").values()} == {torch.float16}
    assert 0 < report.max_verify_error < 2e-3

    bf16_base = tmp_path / "bf16_base"
    AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(bf16_base)
    report = merge_lora(bf16_base, adapter, tmp_path / "from_bf16", log=lambda _: None)
    assert {t.dtype for t in _tensors(tmp_path / "from_bf16").values()} == {torch.bfloat16}
    assert report.dtype == "bfloat16"


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_verification_catches_a_wrong_delta(base, tmp_path, monkeypatch, dtype):
    adapter = _make_adapter(base, tmp_path / "ad", r=8, target_modules=ATTN_MLP)
    real = merge_ops.add_lora_delta

    def slightly_wrong(matrix, lora_a, lora_b, scale):  # 1% off: below bf16 rounding noise of the output
        real(matrix, lora_a, lora_b, scale * 1.01)

    monkeypatch.setattr(merge_ops, "add_lora_delta", slightly_wrong)
    with pytest.raises(MergeVerificationError, match="verification failed"):
        merge_lora(base, adapter, tmp_path / "merged", dtype=dtype, log=lambda _: None)
    assert not (tmp_path / "merged").exists() and _leftovers(tmp_path) == []


def test_nan_in_adapter_is_refused(base, tmp_path):
    adapter = _make_adapter(base, tmp_path / "ad", r=4, target_modules=["q_proj"])
    weights = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in weights if k.endswith("layers.1.self_attn.q_proj.lora_B.weight"))
    weights[key][3, 1] = float("nan")
    save_file(weights, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"adapter_model.safetensors: tensor \S+layers.1.self_attn.q_proj.lora_B.weight "
                       "holds NaN/inf; the adapter is broken"):
        merge_lora(base, adapter, tmp_path / "merged", verify=False, log=lambda _: None)
    assert not (tmp_path / "merged").exists() and _leftovers(tmp_path) == []


def test_interrupted_merge_leaves_no_output(base, tmp_path, monkeypatch):
    adapter = _make_adapter(base, tmp_path / "ad", r=4, target_modules=ATTN_MLP)
    real, calls = ShardWriter.write_tensor, []

    def failing(self, name, tensor):
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        real(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "write_tensor", failing)
    with pytest.raises(KeyboardInterrupt):
        merge_lora(base, adapter, tmp_path / "merged", max_shard_size=32 * 1024, log=lambda _: None)
    assert not (tmp_path / "merged").exists() and _leftovers(tmp_path) == []


def test_refuses_base_dir_and_unrelated_nonempty_dir(base, tmp_path):
    adapter = _make_adapter(base, tmp_path / "ad", r=4, target_modules=["q_proj"])
    with pytest.raises(UserError, match="base model directory"):
        merge_lora(base, adapter, base, log=lambda _: None)
    with pytest.raises(UserError, match="adapter"):
        merge_lora(base, adapter, adapter, log=lambda _: None)
    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an earlier merge output"):
        merge_lora(base, adapter, unrelated, log=lambda _: None)
    assert (unrelated / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    merge_lora(base, adapter, tmp_path / "empty", log=lambda _: None)
    assert (tmp_path / "empty" / MERGE_MARKER).exists()


def test_replaces_an_earlier_merge_output(base, tmp_path):
    first = _make_adapter(base, tmp_path / "a1", seed=1, r=4, target_modules=["q_proj"])
    second = _make_adapter(base, tmp_path / "a2", seed=2, r=4, target_modules=["v_proj", "o_proj"])
    out = tmp_path / "merged"
    merge_lora(base, first, out, log=lambda _: None)
    report = merge_lora(base, second, out, log=lambda _: None)
    assert report.merged_modules == 4
    assert json.loads((out / MERGE_MARKER).read_text())["adapter_dir"] == str(second.resolve())
    _assert_matches_peft(base, second, out)
    assert _leftovers(tmp_path) == []


def test_adapter_for_another_base_is_refused(base, tmp_path):
    other = _save_base(_llama(hidden=32), tmp_path / "other")
    adapter = _make_adapter(other, tmp_path / "ad", r=4, target_modules=["q_proj"])
    with pytest.raises(UserError, match=r"shape \[32, 32\].*\[64, 64\]"):
        merge_lora(base, adapter, tmp_path / "merged", log=lambda _: None)
    deeper = _save_base(_llama(layers=3), tmp_path / "deeper")
    adapter = _make_adapter(deeper, tmp_path / "ad3", r=4, target_modules=["q_proj"])
    with pytest.raises(UserError, match="layers.2.*another base model"):
        merge_lora(base, adapter, tmp_path / "merged", log=lambda _: None)
    assert not (tmp_path / "merged").exists() and _leftovers(tmp_path) == []


def test_bad_inputs_are_user_errors(base, tmp_path):
    with pytest.raises(UserError, match="adapter directory not found"):
        merge_lora(base, tmp_path / "missing", tmp_path / "merged", log=lambda _: None)
    adapter = _make_adapter(base, tmp_path / "ad", r=4, target_modules=["q_proj"])
    with pytest.raises(UserError, match="dtype"):
        merge_lora(base, adapter, tmp_path / "merged", dtype="int8", log=lambda _: None)
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="full-precision"):
        merge_lora(quantized, adapter, tmp_path / "merged", log=lambda _: None)
    with pytest.raises(UserError, match="tokenizer directory not found"):
        merge_lora(base, adapter, tmp_path / "merged", tokenizer_dir=tmp_path / "nope", log=lambda _: None)


def test_tokenizer_files_come_from_tokenizer_dir(base, tmp_path):
    adapter = _make_adapter(base, tmp_path / "ad", r=4, target_modules=["q_proj"])
    final = tmp_path / "final"
    final.mkdir()
    (final / "tokenizer_config.json").write_text('{"from": "run"}')
    (final / "chat_template.jinja").write_text("{{ messages }}")
    (final / "added_tokens.json").write_text('{"<tool>": 256}')
    merge_lora(base, adapter, tmp_path / "merged", tokenizer_dir=final, log=lambda _: None)
    out = tmp_path / "merged"
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"from": "run"}
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}" and (out / "added_tokens.json").exists()


def test_probe_reference_is_independent_of_the_merge():
    """The checker itself: a correct in-place merge matches, a transposed delta does not."""
    gen = torch.Generator().manual_seed(0)
    w0, a, b = (torch.randn(s, generator=gen) for s in [(6, 5), (2, 5), (6, 2)])
    x = merge_ops.probe_columns("w", 5, torch.float32)
    ref = merge_ops.reference_output(w0 @ x, x, a, b, 0.5)
    merged = w0.clone()
    merge_ops.add_lora_delta(merged, a, b, 0.5)
    assert merge_ops.compare(merged @ x, ref).relative < 1e-6
    assert merge_ops.compare((w0 + 0.5 * (b @ a) * 1.1) @ x, ref).relative > 1e-3


def test_marker_lists_the_files_the_merge_wrote(base, tmp_path):
    adapter = _make_adapter(base, tmp_path / "ad", r=4, target_modules=["q_proj"])
    out = tmp_path / "merged"
    merge_lora(base, adapter, out, max_shard_size=64 * 1024, log=lambda _: None)
    listed = json.loads((out / MERGE_MARKER).read_text())["files"]
    assert listed == sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in listed and MERGE_MARKER in listed


def test_files_the_merge_did_not_write_are_never_deleted(base, tmp_path):
    first = _make_adapter(base, tmp_path / "a1", seed=1, r=4, target_modules=["q_proj"])
    second = _make_adapter(base, tmp_path / "a2", seed=2, r=4, target_modules=["v_proj"])
    out = tmp_path / "merged"
    merge_lora(base, first, out, log=lambda _: None)
    (out / "model-q4.gguf").write_bytes(b"GGUF export")
    (out / "eval").mkdir()
    (out / "eval" / "results.json").write_text("{}")
    with pytest.raises(UserError, match=r"holds files merge-lora did not write \(eval, model-q4.gguf\)"):
        merge_lora(base, second, out, log=lambda _: None)
    assert (out / "model-q4.gguf").read_bytes() == b"GGUF export" and (out / "eval" / "results.json").is_file()
    _assert_matches_peft(base, first, out)  # the earlier merge is untouched
    assert _leftovers(tmp_path) == []


def test_marker_without_a_file_list_is_recognised_by_name(base, tmp_path):
    """Merges from before the marker listed its files are still replaced; unknown files still stop it."""
    adapter = _make_adapter(base, tmp_path / "ad", r=4, target_modules=["q_proj"])
    out = tmp_path / "merged"
    merge_lora(base, adapter, out, log=lambda _: None)
    marker = json.loads((out / MERGE_MARKER).read_text())
    del marker["files"]
    (out / MERGE_MARKER).write_text(json.dumps(marker))
    merge_lora(base, adapter, out, log=lambda _: None)
    (out / "notes.md").write_text("mine")
    marker = json.loads((out / MERGE_MARKER).read_text())
    del marker["files"]
    (out / MERGE_MARKER).write_text(json.dumps(marker))
    with pytest.raises(UserError, match=r"did not write \(notes.md\)"):
        merge_lora(base, adapter, out, log=lambda _: None)


def test_output_under_a_regular_file_is_a_user_error(base, tmp_path):
    adapter = _make_adapter(base, tmp_path / "ad", r=4, target_modules=["q_proj"])
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"file: is a file, not a directory"):
        merge_lora(base, adapter, tmp_path / "file" / "merged", log=lambda _: None)


def test_read_only_output_is_a_user_error(base, tmp_path):
    adapter = _make_adapter(base, tmp_path / "ad", r=4, target_modules=["q_proj"])
    with read_only_dir(tmp_path / "ro") as ro:
        with pytest.raises(UserError, match=f"{ro}.*(Read-only file system|Permission denied)"):
            merge_lora(base, adapter, ro / "merged", log=lambda _: None)
        assert list(ro.iterdir()) == []


def test_merge_lora_command_reports_unwritable_output(base, tmp_path, capsys):
    """Through the command line: exit 2 and one line naming the path, no traceback."""
    adapter = _make_adapter(base, tmp_path / "ad", r=4, target_modules=["q_proj"])
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({"base_model": str(base), "datasets": [{"path": str(data), "type": "alpaca"}],
                                      "lora_target_linear": True, "max_steps": 1, "output_dir": str(tmp_path / "run")}))
    (tmp_path / "file").write_text("")
    result = main_in_process(capsys, "merge-lora", str(config), "--lora-model-dir", str(adapter),
                             "--output", str(tmp_path / "file" / "merged"))
    assert result.returncode == 2
    assert f"{tmp_path / 'file'}: is a file, not a directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_full_disk_is_a_user_error_and_leaves_nothing(base, tmp_path):
    adapter = _make_adapter(base, tmp_path / "ad", r=4, target_modules=["q_proj"])
    with small_disk(tmp_path / "small", "64k") as disk:
        with pytest.raises(UserError, match=f"{disk}.*No space left on device"):
            merge_lora(base, adapter, disk / "merged", log=lambda _: None)
        assert list(disk.iterdir()) == []

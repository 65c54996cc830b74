"""FSDP (fully_shard) on CPU (gloo) through `axlora train`: really sharded, same model as one process, exact resume.

axlora shards with PyTorch's ``fully_shard`` itself, which runs over gloo, so these runs shard for real (the
figures each run reports are read from the DTensor shards); accelerate's own FSDP path would silently run
DDP on a CPU-only machine.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from axlora.config.fsdp import fsdp_settings
from axlora.config.schema import Config
from axlora.core.names import ADAPTER_WEIGHTS
from axlora.validate import describe_plan

from conftest import (
    assert_close_final_adapters,
    assert_same_final_adapter,
    logged,
    resumed_against_uninterrupted,
    run_cli,
    train_ok,
)

pytestmark = pytest.mark.slow
WEIGHTS = ADAPTER_WEIGHTS

# 93 train rows, 4 rows a step: the epoch's last step has one row, so rank 1 has no micro batch in it; 3
# validation rows: rank 0 evaluates two batches, rank 1 one. Every rank must still run the same forwards.
UNEVEN = {"num_epochs": 1, "max_steps": None, "val_set_size": 3, "eval_steps": 6, "gradient_accumulation_steps": 2, "seed": 7,
          "save_steps": 12}


def test_fsdp_on_two_processes_shards_and_trains_the_same_adapter_as_one_process(make_config, tmp_path):
    train_ok(make_config("one.yml", micro_batch_size=2, output_dir=str(tmp_path / "one"), **UNEVEN))
    # Axolotl's FSDP1 spelling, mapped onto FSDP2
    fsdp = {"fsdp": ["full_shard", "auto_wrap"],
            "fsdp_config": {"fsdp_activation_checkpointing": True, "fsdp_use_orig_params": False,
                            "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}}
    result = train_ok(make_config("fsdp.yml", micro_batch_size=1, num_processes=2, output_dir=str(tmp_path / "fsdp"),
                                sample_prompts=["What is 2 + 3?"], sample_max_new_tokens=3, **fsdp, **UNEVEN))
    out = tmp_path / "fsdp"
    assert "launch: 2 processes" in result.stdout
    assert "use_orig_params: FSDP1 settings with no FSDP2 counterpart" in result.stdout

    summary = json.loads((out / "final" / "train_summary.json").read_text())
    figures = summary["fsdp"]
    # rank 0 holds about half of every sharded base weight, read from its DTensor shards
    assert figures["layers_sharded"] == 2 and figures["sharded_parameters"] > 0
    assert 0.45 < figures["sharded_parameters_on_this_rank"] / figures["sharded_parameters"] < 0.55
    assert summary["world_size"] == 2 and isinstance(summary["samples"][0]["after"], str)  # all ranks generated
    assert (out / "final" / "axlora.yml").read_text().count("gradient_checkpointing: true") == 1

    assert logged(out) == pytest.approx(logged(tmp_path / "one"), rel=1e-5)
    assert logged(out, "eval_loss") == pytest.approx(logged(tmp_path / "one", "eval_loss"), rel=1e-6)
    assert_close_final_adapters(out, tmp_path / "one", rtol=1e-4, atol=1e-6)
    # the adapter and its optimizer state are whole on every rank: saved once, as without sharding
    checkpoint = out / "checkpoints" / "step-12"
    assert (checkpoint / "optimizer.pt").is_file()
    assert {p.name for p in checkpoint.glob("rank-*.pt")} == {"rank-0.pt", "rank-1.pt"}


def test_fsdp_resume_is_exact_and_keeps_trained_embeddings(make_config, tmp_path):
    """Dropout (every rank's RNG must come back) and embeddings trained after adding a token (kept whole)."""
    settings = {"micro_batch_size": 2, "num_processes": 2, "fsdp_version": 2,
                "fsdp_config": {"cpu_ram_efficient_loading": True},  # resized embeddings built on meta, sent by rank 0
                "lora_dropout": 0.1, "tokens": ["<|x|>"], "lora_modules_to_save": ["embed_tokens", "lm_head"],
                "max_steps": 4, "gradient_accumulation_steps": 2, "seed": 7, "save_steps": 2}
    runs = resumed_against_uninterrupted(make_config, tmp_path, settings)
    assert any("embed_tokens.modules_to_save" in name for name in load_file(runs.full / "final" / WEIGHTS))
    assert_same_final_adapter(runs.full, runs.resumed)
    assert logged(runs.resumed) == logged(runs.full)[2:]

def test_cpu_ram_efficient_loading_reads_the_weights_on_rank_0_only(make_config, tmp_path):
    common = {"max_steps": 3, "gradient_accumulation_steps": 2, "seed": 5}
    train_ok(make_config("one.yml", micro_batch_size=4, output_dir=str(tmp_path / "one"), **common))
    result = train_ok(make_config("fsdp.yml", micro_batch_size=2, num_processes=2, output_dir=str(tmp_path / "fsdp"),
                                  fsdp_config={"fsdp_cpu_ram_efficient_loading": True}, **common))
    assert "FULL_SHARD, base loaded by rank 0 only over 2 process(es)" in result.stdout
    assert result.stderr.count("Loading weights: 100%") == 1  # rank 1 built the model on meta, read nothing
    # rank 1's shards came from rank 0: uninitialized memory would train something else
    assert logged(tmp_path / "fsdp") == pytest.approx(logged(tmp_path / "one"), rel=1e-5)
    assert_close_final_adapters(tmp_path / "fsdp", tmp_path / "one", rtol=1e-4, atol=1e-6)


def test_fsdp_on_one_process_runs_here_as_a_world_of_one(make_config, tmp_path):
    common = {"micro_batch_size": 4, "max_steps": 3, "seed": 5}
    train_ok(make_config("one.yml", output_dir=str(tmp_path / "one"), **common))
    result = train_ok(make_config("fsdp.yml", fsdp_config={"reshard_after_forward": False},
                                output_dir=str(tmp_path / "fsdp"), **common))
    assert "launch:" not in result.stdout and "fsdp: SHARD_GRAD_OP over 1 process(es)" in result.stdout
    assert logged(tmp_path / "fsdp") == pytest.approx(logged(tmp_path / "one"), rel=1e-6)
    assert_close_final_adapters(tmp_path / "fsdp", tmp_path / "one", rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"fsdp": ["hybrid_shard"]}, "hybrid sharding across machines is not supported"),
        ({"fsdp": ["full_shard", "shard_grad_op"]}, "keep one"),
        ({"fsdp_config": {}, "deepspeed": "zero2"}, "fsdp / deepspeed: choose one"),
        ({"fsdp_config": {}, "chunked_cross_entropy": True}, "chunked_cross_entropy: not with FSDP"),
        ({"fsdp_version": 2}, "fsdp_version: FSDP is on only with fsdp_config"),
        ({"fsdp_config": {"sharding_strategy": "HYBRID_SHARD"}}, "sharding_strategy"),
        pytest.param({"fsdp_config": {"offload_params": True}}, "offload_params",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="refused on CPU-only machines")),
    ],
)
def test_bad_fsdp_settings_exit_2_before_any_worker(make_config, overrides, message):
    result = run_cli("train", str(make_config(num_processes=2, **overrides)))
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "launch:" not in result.stdout


def test_an_unknown_layer_class_names_the_model_s_layers(make_config):
    result = run_cli("train", str(make_config(fsdp_config={"transformer_layer_cls_to_wrap": ["BertLayer"]})))
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "LlamaForCausalLM has no layer of class BertLayer" in result.stderr
    assert "LlamaDecoderLayer" in result.stderr and "Traceback" not in result.stderr


def _config(**overrides) -> Config:
    return Config(base_model="m", datasets=[{"path": "d.jsonl", "type": "alpaca"}], lora_target_linear=True,
                  max_steps=1, **overrides)


def test_axolotl_fsdp1_and_fsdp2_configs_map_onto_fully_shard():
    fsdp1 = fsdp_settings(_config(fsdp="full_shard auto_wrap offload", fsdp_config={
        "fsdp_sharding_strategy": 2, "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer,MistralDecoderLayer",
        "fsdp_state_dict_type": "SHARDED_STATE_DICT", "fsdp_limit_all_gathers": True}))
    assert fsdp1.reshard_after_forward is False and fsdp1.offload_params is True
    assert fsdp1.layer_classes == ("LlamaDecoderLayer", "MistralDecoderLayer")
    assert any("limit_all_gathers" in note for note in fsdp1.notes)
    assert any("never sharded" in note for note in fsdp1.notes)

    fsdp2 = fsdp_settings(_config(fsdp_version=2, fsdp_config={
        "reshard_after_forward": True, "cpu_ram_efficient_loading": True, "activation_checkpointing": True}))
    assert fsdp2.reshard_after_forward is True and fsdp2.layer_classes is None
    assert fsdp2.load_on_main_only is True and not fsdp2.notes
    assert fsdp_settings(_config()) is None
    assert _config(fsdp_config={"activation_checkpointing": True}).gradient_checkpointing is True
    assert _config(fsdp_config={"fsdp_activation_checkpointing": True}).gradient_checkpointing is True
    plan = describe_plan(_config(fsdp="shard_grad_op", fsdp_config={"fsdp_sync_module_states": True}))
    assert "FSDP2 SHARD_GRAD_OP per decoder layer" in plan and "note: fsdp_config: sync_module_states" in plan
    with pytest.raises(ValueError, match="same setting"):
        _config(fsdp_config={"offload_params": True, "fsdp_offload_params": False})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fsdp_bf16_on_gpu(make_config, tmp_path):
    result = train_ok(make_config(fsdp_config={}, bf16=True, num_processes=1, output_dir=str(tmp_path / "out")))
    summary = json.loads((tmp_path / "out" / "final" / "train_summary.json").read_text())
    assert "fsdp: FULL_SHARD over 1 process(es)" in result.stdout
    assert summary["precision"] == "bf16" and summary["peak_memory_bytes"]["gpu_allocated_bytes"] > 0

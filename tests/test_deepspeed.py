"""DeepSpeed ZeRO on CPU (gloo) through `axlora train`: same model as one process, exact resume, bad settings.

DeepSpeed's CPU accelerator runs ZeRO stages 1-3 with the gloo backend, so the sharded paths (partitioned
optimizer state, ZeRO-3 partitioned weights gathered for saving and generation) are tested here for real.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from axlora.config.schema import Config
from axlora.core.errors import UserError
from axlora.train.deepspeed import load_deepspeed_setup

from conftest import (
    assert_close_final_adapters,
    assert_same_final_adapter,
    logged,
    resumed_against_uninterrupted,
    run_cli,
    train_ok,
)

pytestmark = pytest.mark.slow

COMMON = {"max_steps": 4, "gradient_accumulation_steps": 2, "seed": 7, "save_steps": 2}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir, alpaca_file):
    """The reference: one plain process with micro batch 4 (= 2 processes x micro batch 2)."""
    root = tmp_path_factory.mktemp("one")
    config = _write(root / "one.yml", tiny_model_dir, alpaca_file, micro_batch_size=4, output_dir=str(root / "out"),
                    **COMMON)
    train_ok(config)
    return root / "out"


def _write(path, model, data, **overrides):
    config = {
        "base_model": str(model), "datasets": [{"path": str(data), "type": "alpaca"}], "sequence_len": 96,
        "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_target_linear": True, "learning_rate": 1e-2,
        "logging_steps": 1, **overrides,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.parametrize("preset", ["zero2", "zero3"])
def test_zero_on_two_processes_trains_the_same_adapter_as_one_process(preset, one_process, make_config, tmp_path):
    config = make_config(micro_batch_size=2, num_processes=2, deepspeed=preset, output_dir=str(tmp_path / "ds"),
                         sample_prompts=["What is 2 + 3?"], sample_max_new_tokens=3, **COMMON)
    result = train_ok(config)
    out = tmp_path / "ds"
    assert "launch: 2 processes" in result.stdout
    assert f"deepspeed: ZeRO stage {preset[-1]} (preset {preset}) on 2 process(es)" in result.stdout

    assert logged(out) == pytest.approx(logged(one_process), rel=1e-5)
    # ZeRO-3 partitions every tensor: the helper also checks that none was saved empty
    assert_close_final_adapters(out, one_process, rtol=1e-4, atol=1e-6)

    summary = json.loads((out / "final" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["deepspeed"]["zero_stage"] == int(preset[-1])
    assert summary["samples"][0]["after"]  # generation ran on the (ZeRO-3: partitioned) model
    # each rank's partition of the optimizer state is in the checkpoint, next to its RNG state
    checkpoint = out / "checkpoints" / "step-2"
    assert {p.name for p in checkpoint.glob("rank-*.pt")} == {"rank-0.pt", "rank-1.pt"}
    assert not (checkpoint / "optimizer.pt").exists()
    assert not list((out / "checkpoints").glob(".step-*"))  # no staging left behind


def test_zero3_resume_is_exact(make_config, tmp_path):
    """With dropout, so every rank's RNG state must come back too."""
    settings = {"micro_batch_size": 2, "num_processes": 2, "deepspeed": "zero3", "lora_dropout": 0.1, **COMMON}
    runs = resumed_against_uninterrupted(make_config, tmp_path, settings)
    assert_same_final_adapter(runs.full, runs.resumed)
    assert logged(runs.resumed) == logged(runs.full)[2:]

def test_resume_with_another_zero_stage_is_refused(make_config, tmp_path):
    out = tmp_path / "run"
    settings = {"micro_batch_size": 2, "num_processes": 2, "max_steps": 2, "save_steps": 1, "output_dir": str(out)}
    train_ok(make_config("zero2.yml", deepspeed="zero2", **settings))
    result = run_cli("train", str(make_config("zero3.yml", deepspeed="zero3", resume_from_checkpoint=str(
        out / "checkpoints" / "step-1"), **settings)))
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "DeepSpeed ZeRO stage: checkpoint has 2, this run has 3" in result.stderr


@pytest.mark.parametrize(
    ("overrides", "json_config", "message"),
    [
        ({"deepspeed": "zero4"}, None, "did you mean"),
        ({"deepspeed": "missing/ds.json"}, None, "not found"),
        ({}, {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}, "'optimizer' section"),
        ({}, {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 8}, "micro_batch_size gives 4"),
        ({}, {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 3}, "gradient_accumulation_steps"),
        ({"deepspeed": "zero3", "load_in_8bit": True}, None, "ZeRO-3"),
        ({"deepspeed": "zero3", "chunked_cross_entropy": True}, None, "chunked_cross_entropy: not with ZeRO-3"),
        pytest.param({"deepspeed": "zero3_offload"}, None, "offloads the optimizer",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="refused on CPU-only machines")),
    ],
)
def test_bad_deepspeed_settings_exit_2_before_any_worker(make_config, tmp_path, overrides, json_config, message):
    if json_config is not None:
        (tmp_path / "ds.json").write_text(json.dumps(json_config))
        overrides = {**overrides, "deepspeed": str(tmp_path / "ds.json")}
    result = run_cli("train", str(make_config(num_processes=2, **overrides)))
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "launch:" not in result.stdout


def _config(**overrides) -> Config:
    return Config(base_model="m", datasets=[{"path": "d.jsonl", "type": "alpaca"}], lora_target_linear=True,
                  max_steps=1, **overrides)


def test_presets_take_batch_clipping_and_precision_from_the_yaml():
    setup = load_deepspeed_setup(_config(deepspeed="zero3", micro_batch_size=3, gradient_accumulation_steps=5,
                                         max_grad_norm=0.5), world_size=4, precision="bf16")
    ds = setup.config
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, 5, 60)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert setup.stage == 3 and not setup.offloads_optimizer
    assert load_deepspeed_setup(_config(deepspeed="zero3_offload"), 1, "bf16").offloads_optimizer


def test_axolotl_deepspeed_paths_map_to_the_shipped_presets(tmp_path):
    setup = load_deepspeed_setup(_config(deepspeed=str(tmp_path / "deepspeed_configs" / "zero3_bf16.json")), 2, "bf16")
    assert setup.source == "preset zero3" and "Axolotl's zero3_bf16.json" in setup.notes[0]
    with pytest.raises(UserError, match="not found"):
        load_deepspeed_setup(_config(deepspeed=str(tmp_path / "my_zero.json")), 2, "bf16")


def test_zero_on_one_process_trains_here_as_a_world_of_one(one_process, make_config, tmp_path):
    config = make_config(micro_batch_size=4, deepspeed="zero2", output_dir=str(tmp_path / "ds"), **COMMON)
    result = train_ok(config)
    assert "launch:" not in result.stdout and "ZeRO stage 2 (preset zero2) on 1 process(es)" in result.stdout
    assert logged(tmp_path / "ds") == pytest.approx(logged(one_process), rel=1e-5)


def test_zero3_continues_an_adapter_like_one_process(one_process, make_config, tmp_path):
    """lora_model_dir under ZeRO-3: the adapter loads into a base loaded partitioned, and trains on the same."""
    settings = {"lora_model_dir": str(one_process / "final"), "max_steps": 2, "gradient_accumulation_steps": 2,
                "seed": 11}
    train_ok(make_config("one.yml", micro_batch_size=4, output_dir=str(tmp_path / "one"), **settings))
    result = train_ok(make_config("zero3.yml", micro_batch_size=2, num_processes=2, deepspeed="zero3",
                                output_dir=str(tmp_path / "zero3"), **settings))
    assert "adapter: continue" in result.stdout
    assert logged(tmp_path / "zero3") == pytest.approx(logged(tmp_path / "one"), rel=1e-5)
    assert_close_final_adapters(tmp_path / "zero3", tmp_path / "one", rtol=1e-4, atol=1e-6)

"""The launcher's GPU variants: NCCL, bf16, DeepSpeed and FSDP on real GPUs (skipped without them).

The CPU suite proves the same code paths over gloo in fp32; these check what only a GPU has: NCCL, bf16
autocast with sharded weights, ZeRO-3 and FSDP moving shards to the device, and offloading to CPU RAM.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import logged, run_cli

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
one_gpu = pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU")
two_gpus = pytest.mark.skipif(GPUS < 2, reason="needs two CUDA GPUs")
COMMON = {"bf16": True, "max_steps": 4, "gradient_accumulation_steps": 2, "seed": 7, "lora_dropout": 0.0}


def _train(make_config, name: str, **overrides):
    config = make_config(f"{name}.yml", **{**COMMON, **overrides})
    result = run_cli("train", str(config))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def _check_adapter(out, reference) -> None:
    ours = load_file(out / "final" / "adapter_model.safetensors")
    theirs = load_file(reference / "final" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].shape == tensor.shape and ours[name].numel() > 0


@one_gpu
@pytest.mark.parametrize("sharding", [{"deepspeed": "zero3"}, {"deepspeed": "zero3_offload"},
                                      {"fsdp_config": {"offload_params": True}}], ids=["zero3", "zero3_offload",
                                                                                     "fsdp_offload"])
def test_sharded_bf16_on_one_gpu_trains_like_plain(make_config, tmp_path, sharding):
    _train(make_config, "plain", micro_batch_size=4, output_dir=str(tmp_path / "plain"))
    _train(make_config, "sharded", micro_batch_size=4, output_dir=str(tmp_path / "sharded"), **sharding)
    assert logged(tmp_path / "sharded") == pytest.approx(logged(tmp_path / "plain"), rel=2e-2)
    _check_adapter(tmp_path / "sharded", tmp_path / "plain")


@two_gpus
@pytest.mark.parametrize("sharding", [{}, {"deepspeed": "zero2"}, {"deepspeed": "zero3"}, {"fsdp_config": {}},
                                      {"fsdp_config": {"cpu_ram_efficient_loading": True}}],
                         ids=["ddp", "zero2", "zero3", "fsdp", "fsdp_rank0_loads"])
def test_two_gpus_over_nccl_train_like_one(make_config, tmp_path, sharding):
    _train(make_config, "one", micro_batch_size=4, num_processes=1, output_dir=str(tmp_path / "one"))
    result = _train(make_config, "two", micro_batch_size=2, num_processes=2, output_dir=str(tmp_path / "two"),
                    **sharding)
    assert "launch: 2 processes" in result.stdout
    assert logged(tmp_path / "two") == pytest.approx(logged(tmp_path / "one"), rel=2e-2)
    _check_adapter(tmp_path / "two", tmp_path / "one")

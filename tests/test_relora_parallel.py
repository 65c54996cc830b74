"""ReLoRA under DDP: both processes restart alike, and 2 processes train what 1 process trains."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import assert_close_final_adapters, assert_same_final_adapter, logged, train_ok

# restarts after steps 2 and 4 of 5; a checkpoint every 2 steps, each written right after its restart
COMMON = {"max_steps": 5, "relora_steps": 2, "relora_warmup_steps": 1, "save_steps": 2, "optimizer": "adamw_torch"}


@pytest.mark.slow
def test_two_processes_restart_alike_train_as_one_and_resume_exactly(make_config, tmp_path):
    """micro batch 1 x 2 processes = 2 x 1: the same losses and final adapter, so both processes merged the same
    LoRA into the same base, drew the same fresh LoRA and pruned the same optimizer state (a process that did
    otherwise would compute other losses and gradients). A 2-process resume replays the merges on both."""
    from axlora.train.relora import read_merges

    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    train_ok(make_config("one.yml", output_dir=str(one), micro_batch_size=2, num_processes=1, **COMMON))
    result = train_ok(make_config("two.yml", output_dir=str(two), micro_batch_size=1, num_processes=2, **COMMON))
    assert "launch: 2 processes" in result.stdout
    assert "relora: restart 1 after step 2" in result.stdout and "relora: restart 2 after step 4" in result.stdout
    assert logged(two) == pytest.approx(logged(one), abs=1e-5)
    assert_close_final_adapters(two, one, rtol=0, atol=1e-5)
    assert json.loads((two / "final" / "adapter_config.json").read_text())["r"] == 4 * 3
    checkpoint = two / "checkpoints" / "step-4"
    assert [merge.step for merge in read_merges(checkpoint, 2)] == [2, 4]
    assert {p.name for p in checkpoint.glob("rank-*.pt")} == {"rank-0.pt", "rank-1.pt"}

    shutil.copytree(two / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    result = train_ok(make_config("resume.yml", output_dir=str(resumed), micro_batch_size=1, num_processes=2,
                                  resume_from_checkpoint="auto", **COMMON))
    assert "relora: replayed the checkpoint's 1 merge(s) into the base weights" in result.stdout
    assert "relora: restart 2 after step 4" in result.stdout
    assert logged(resumed) == logged(two)[2:]
    assert_same_final_adapter(resumed, two)

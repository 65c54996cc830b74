"""A diverged run stops at the step it diverged, exit status 1, and nothing non-finite reaches the disk."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from axlora.core.layout import RunLayout
from axlora.train.divergence import Diverged, check_step, require_finite

from conftest import run_cli, train_ok


@pytest.mark.slow
def test_a_diverging_run_stops_and_keeps_the_earlier_final(make_config, tmp_path):
    out = tmp_path / "out"
    train_ok(make_config("good.yml", max_steps=2))
    earlier = {p.name: p.read_bytes() for p in (out / "final").iterdir()}
    result = run_cli("train", str(make_config("wild.yml", max_steps=8, learning_rate=10.0, save_steps=1)))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "training diverged at step" in result.stderr and "learning rate is too high" in result.stderr
    assert {p.name: p.read_bytes() for p in (out / "final").iterdir()} == earlier
    saved = RunLayout(out).complete_checkpoints()
    assert saved, "the steps before the divergence were checkpointed"
    for checkpoint in saved:
        for name, tensor in load_file(checkpoint / "adapter_model.safetensors").items():
            assert torch.isfinite(tensor).all(), (checkpoint.name, name)
    stopped_at = int(result.stderr.split("diverged at step ")[1].split(":")[0])
    assert max(int(p.name[5:]) for p in saved) < stopped_at  # the diverged step itself never saved


def test_each_kind_of_non_finite_step_is_named():
    check_step(1.5, 2.0, 3, True, "fp32", 1e-4)  # all finite
    check_step(1.5, None, 3, True, "fp32", 1e-4)  # no clipping: no gradient norm measured
    check_step(1.5, math.inf, 3, True, "fp16", 1e-4)  # the fp16 loss scaler skips such a step
    with pytest.raises(Diverged, match="at step 7: the loss is nan") as stopped:
        check_step(math.nan, 1.0, 7, True, "fp16", 10.0)
    assert "learning_rate: 10" in str(stopped.value) and "fp16 overflow" in str(stopped.value)
    with pytest.raises(Diverged, match="at step 2: the gradient norm is inf"):
        check_step(1.0, math.inf, 2, True, "bf16", 1e-4)
    with pytest.raises(Diverged, match="weights became non-finite"):
        check_step(1.0, 1.0, 2, False, "fp32", 1e-4)


def test_saving_refuses_non_finite_tensors(tmp_path):
    require_finite({"a": torch.ones(2), "ids": torch.arange(3)}, "checkpoints/step-1")
    with pytest.raises(Diverged, match="step-1: refusing to save an adapter with non-finite weights \\(b\\)"):
        require_finite({"a": torch.ones(2), "b": torch.tensor([1.0, math.inf])}, "checkpoints/step-1")

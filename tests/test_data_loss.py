"""What is optimized does not depend on how a step's rows are batched: exact, through the real CLI.

One optimizer step over the same four samples, with dropout 0 and plain SGD (an update proportional to
the gradient, so a loss scaled per micro batch or per packed row would show; Adam's first step would hide
it): micro batch 4 x accumulation 1, micro batch 1 x accumulation 4, and the four samples packed into one
row. The step's loss and the adapter it produces must agree to float rounding, and the evaluation loss
over the same validation rows must agree for micro batch 1 and 4.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from axlora.data.demo_rows import addition_rows, write_jsonl

from conftest import run_cli

pytestmark = pytest.mark.slow

ATOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("loss")
    data = root / "rows.jsonl"
    rows = addition_rows(8, seed=11)
    rows[1]["output"] = "1234567"  # samples of different lengths: padding and packing both matter
    rows[6]["input"] = "12+35, then add 40"
    write_jsonl(rows, data)
    base = {
        "base_model": str(tiny_model_dir), "datasets": [{"path": str(data), "type": "alpaca"}],
        "val_set_size": 4, "sequence_len": 256, "dataset_prepared_path": str(root / "prepared"),
        "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_target_linear": True,
        "optimizer": "sgd", "learning_rate": 0.5, "max_grad_norm": 0.0, "max_steps": 1, "logging_steps": 1,
    }
    layouts = {
        "micro4": {"micro_batch_size": 4, "gradient_accumulation_steps": 1},
        "micro1_accum4": {"micro_batch_size": 1, "gradient_accumulation_steps": 4},
        "packed": {"micro_batch_size": 4, "gradient_accumulation_steps": 1, "sample_packing": True},
    }
    results = {}
    for name, layout in layouts.items():
        out = root / name
        path = root / f"{name}.yml"
        path.write_text(json.dumps({**base, **layout, "output_dir": str(out)}))
        result = run_cli("train", str(path))
        assert result.returncode == 0, result.stdout + result.stderr
        [metrics] = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
        adapter = load_file(str(out / "final" / "adapter_model.safetensors"))
        results[name] = {"metrics": metrics, "adapter": adapter, "stdout": result.stdout}
    return results


def test_packed_run_really_packed_the_step(runs):
    assert "packing: 4 samples -> 1 rows" in runs["packed"]["stdout"]


@pytest.mark.parametrize("other", ["micro1_accum4", "packed"])
def test_step_loss_and_adapter_do_not_depend_on_batching(runs, other):
    reference, candidate = runs["micro4"], runs[other]
    assert candidate["metrics"]["loss"] == pytest.approx(reference["metrics"]["loss"], abs=ATOL)
    assert candidate["adapter"].keys() == reference["adapter"].keys()
    moved = 0.0
    for key, weight in reference["adapter"].items():
        torch.testing.assert_close(candidate["adapter"][key], weight, atol=ATOL, rtol=0)
        moved = max(moved, float(weight.abs().max())) if "lora_B" in key else moved
    assert moved > 1e-3, "the step must have changed the adapter for the comparison to mean anything"


def test_eval_loss_does_not_depend_on_micro_batch(runs):
    assert runs["micro1_accum4"]["metrics"]["eval_loss"] == pytest.approx(
        runs["micro4"]["metrics"]["eval_loss"], abs=ATOL)

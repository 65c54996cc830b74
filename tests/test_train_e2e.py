"""End to end through the real CLI: a LoRA trains on a tiny local model and writes the documented outputs."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, alpaca_file):
    out = tmp_path_factory.mktemp("run") / "out"
    config = {
        "base_model": str(tiny_model_dir),
        "datasets": [{"path": str(alpaca_file), "type": "alpaca"}],
        "val_set_size": 8,
        "sequence_len": 96,
        "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_target_modules": ["q_proj", "v_proj", "down_proj"],
        "micro_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 6, "learning_rate": 1e-2,
        "logging_steps": 2, "eval_steps": 3, "warmup_steps": 1,
        "sample_prompts": [{"instruction": "Add the two numbers.", "input": "1+2"}], "sample_max_new_tokens": 4,
        "output_dir": str(out),
    }
    path = out.parent / "run.yml"
    path.write_text(yaml.safe_dump(config))
    result = run_cli("train", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result


def test_writes_the_documented_layout(trained_run):
    out, _ = trained_run
    final = out / "final"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                 "axlora.yml", "train_summary.json"):
        assert (final / name).is_file(), name
    assert (out / "logs" / "loss.png").stat().st_size > 1000
    assert list((out / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary directories left behind"


def test_metrics_and_summary(trained_run):
    out, result = trained_run
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3, 4, 6]
    for row in rows:
        if "loss" in row:
            assert {"loss", "lr", "grad_norm", "tokens_per_second", "epoch"} <= row.keys()
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]
    summary = json.loads((out / "final" / "train_summary.json").read_text())
    assert summary["steps"] == 6 and summary["world_size"] == 1 and summary["val_rows"] == 8
    assert summary["tokens"] > 0 and summary["tokens_per_second"] > 0
    assert summary["final_eval_loss"] == pytest.approx(rows[-1]["eval_loss"])
    assert summary["samples"][0]["prompt"].endswith("### Response:\n")
    assert summary["versions"]["torch"] == torch.__version__
    assert "step 6/6" in result.stdout and "adapter: fresh" in result.stdout
    resolved = yaml.safe_load((out / "final" / "axlora.yml").read_text())
    assert resolved["lora_r"] == 4 and resolved["output_dir"] == str(out)


def test_adapter_loads_in_plain_peft_and_changes_outputs(trained_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _ = trained_run
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[5, 9, 30, 31, 40, 7]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
    tuned = PeftModel.from_pretrained(base, out / "final")
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    with torch.no_grad():
        after = tuned(input_ids=ids).logits
    assert (after - before).abs().max() > 1e-4


def test_bad_data_row_exits_2_naming_file_and_line(make_config, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    result = run_cli("train", str(make_config(datasets=[{"path": str(bad), "type": "alpaca"}])))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{bad}:2: not valid JSON" in result.stderr
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    result = run_cli("preprocess", str(make_config(datasets=[{"path": str(bad), "type": "alpaca"}])))
    assert result.returncode == 2 and "row 2: missing field 'output'" in result.stderr

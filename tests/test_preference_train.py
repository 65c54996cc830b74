"""Preference tuning end to end on the tiny model: a DPO round 2 continuing an SFT round-1 run dir starts at
loss ln 2 with the starting adapter as the reference, logs the rewards, resumes exactly, and merges; a fresh
LoRA (adapter disabled as the reference) and ORPO train from an Axolotl-style config; KTO trains on labelled
completions, resumes exactly and merges."""

from __future__ import annotations

import math

import pytest
import yaml

from axlora.data.demo_rows import write_jsonl
from axlora.data.preference_demo import addition_judgements, alpaca_addition_pairs

from conftest import (
    assert_close_final_adapters,
    assert_same_final_adapter,
    logged,
    resumed_against_uninterrupted,
    run_cli,
    train_ok,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(alpaca_addition_pairs(40, seed=5), path)
    return path


def test_dpo_round_two_from_an_sft_run_dir(make_config, tmp_path, pairs_file):
    train_ok(make_config("sft.yml", output_dir=str(tmp_path / "sft"), max_steps=3))
    settings = {"rl": "dpo", "lora_model_dir": str(tmp_path / "sft"), "lora_target_linear": None,
                "datasets": [{"path": str(pairs_file), "type": "user_defined.default"}], "val_set_size": 8,
                "eval_on_start": True, "save_steps": 2, "micro_batch_size": 4, "learning_rate": 5e-2}
    runs = resumed_against_uninterrupted(make_config, tmp_path, settings)
    full = runs.full
    rows = [row for row in map(yaml.safe_load, (full / "logs" / "metrics.jsonl").read_text().splitlines())]
    # the reference is the SFT adapter as the round starts: policy == reference, whatever that adapter is
    assert rows[0]["step"] == 0 and abs(rows[0]["eval_loss"] - math.log(2)) < 1e-6
    assert abs(logged(full)[0] - math.log(2)) < 1e-6 and rows[1]["rewards/margins"] == 0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert key in rows[1] and f"eval_{key}" in rows[-1]
    assert logged(full, "logps/chosen")[0] > -60  # the SFT adapter, not the base model: the sums are learnt
    assert_same_final_adapter(full, runs.resumed)
    assert logged(runs.resumed) == logged(full)[2:]
    merged = run_cli("merge-lora", str(tmp_path / "full.yml"))
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert (full / "merged" / "config.json").exists()


def test_fresh_dpo_and_orpo_from_axolotl_style_configs(make_config, tmp_path, pairs_file):
    common = {"datasets": [{"path": str(pairs_file), "type": "user_defined.default"}], "max_steps": 6,
              "micro_batch_size": 8, "learning_rate": 5e-2}
    dpo = train_ok(make_config("dpo.yml", rl="dpo", rl_beta=0.5, dpo_beta=None, output_dir=str(tmp_path / "dpo"),
                               **common))
    assert "reference: the base model (adapter disabled)" in dpo.stdout
    assert abs(logged(tmp_path / "dpo")[0] - math.log(2)) < 1e-6
    margins = logged(tmp_path / "dpo", "rewards/margins")
    assert margins[-1] > margins[0] and "margin " in dpo.stdout and "acc " in dpo.stdout
    orpo = train_ok(make_config("orpo.yml", rl="orpo", orpo_alpha=0.2, output_dir=str(tmp_path / "orpo"), **common))
    assert "no reference model" in orpo.stdout
    losses = logged(tmp_path / "orpo")
    assert losses[-1] < losses[0]


def test_micro_batches_and_accumulation_optimize_the_same_loss(make_config, tmp_path, pairs_file):
    """The step's loss is the sum over its pairs / the step's pair count, however they are split into forwards."""
    common = {"rl": "dpo", "datasets": [{"path": str(pairs_file), "type": "user_defined.default"}], "max_steps": 2,
              "learning_rate": 5e-2, "optimizer": "sgd"}
    train_ok(make_config("one.yml", micro_batch_size=4, output_dir=str(tmp_path / "one"), **common))
    train_ok(make_config("two.yml", micro_batch_size=2, gradient_accumulation_steps=2,
                         output_dir=str(tmp_path / "two"), **common))
    assert logged(tmp_path / "one") == pytest.approx(logged(tmp_path / "two"), abs=1e-6)
    assert logged(tmp_path / "one", "rewards/margins") == pytest.approx(logged(tmp_path / "two", "rewards/margins"),
                                                                         abs=1e-6)
    assert_close_final_adapters(tmp_path / "one", tmp_path / "two", rtol=1e-4, atol=1e-6)


def test_kto_trains_resumes_exactly_and_merges(make_config, tmp_path):
    judged = tmp_path / "judged.jsonl"
    write_jsonl(addition_judgements(40, seed=5), judged)
    settings = {"rl": "kto", "rl_beta": 0.5, "precompute_ref_log_probs": True, "val_set_size": 8, "eval_on_start": True,
                "datasets": [{"path": str(judged), "type": "chatml.ultra"}], "save_steps": 2, "micro_batch_size": 4,
                "learning_rate": 5e-2}
    runs = resumed_against_uninterrupted(make_config, tmp_path, settings)
    full = runs.full
    rows = [row for row in map(yaml.safe_load, (full / "logs" / "metrics.jsonl").read_text().splitlines())]
    # a fresh LoRA equals its reference at step 0: every reward and z0 is 0, every loss 1 - sigmoid(0)
    assert rows[0]["step"] == 0 and abs(rows[0]["eval_loss"] - 0.5) < 1e-6 and rows[0]["eval_kl"] == 0
    assert abs(logged(full)[0] - 0.5) < 1e-6 and "desirable / " in runs.result.stdout
    assert all("kl" in row for row in rows[1:]) and "eval_rewards/rejected" in rows[-1]
    assert rows[-1]["eval_loss"] != rows[0]["eval_loss"] and rows[-1]["eval_rewards/chosen"] != 0
    assert_same_final_adapter(full, runs.resumed)
    assert logged(runs.resumed) == logged(full)[2:]
    merged = run_cli("merge-lora", str(tmp_path / "full.yml"))
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert (full / "merged" / "config.json").exists()


def test_kto_on_two_processes_optimizes_what_one_process_does(make_config, tmp_path):
    """z0 and the figures are reduced over processes: 2 processes x 2 rows a step train 1 process x 4 rows."""
    judged = tmp_path / "judged.jsonl"
    rows = addition_judgements(32, seed=3)
    for index, row in enumerate(rows):  # mostly desirable: learning them lifts other rows' answers too, so z0 > 0
        row["label"] = index % 4 != 0
    write_jsonl(rows, judged)
    common = {"rl": "kto", "datasets": [{"path": str(judged), "type": "chatml.ultra"}], "max_steps": 4,
              "learning_rate": 5e-2, "kto_undesirable_weight": 2.0}
    train_ok(make_config("one.yml", micro_batch_size=4, output_dir=str(tmp_path / "one"), **common))
    two = train_ok(make_config("two.yml", micro_batch_size=2, num_processes=2, output_dir=str(tmp_path / "two"),
                               **common))
    assert "launch: 2 processes" in two.stdout
    one_kl, two_kl = logged(tmp_path / "one", "kl"), logged(tmp_path / "two", "kl")
    assert max(one_kl) > 0 and two_kl == pytest.approx(one_kl, abs=1e-5)
    assert logged(tmp_path / "two") == pytest.approx(logged(tmp_path / "one"), abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected"):
        assert logged(tmp_path / "two", key) == pytest.approx(logged(tmp_path / "one", key), abs=1e-5)
    assert_close_final_adapters(tmp_path / "two", tmp_path / "one", rtol=1e-4, atol=1e-6)


def test_fsdp_continues_an_adapter_with_its_reference_and_resumes_exactly(make_config, tmp_path, pairs_file):
    """Under FSDP the reference pass runs on the sharded model (rank 1 holds no whole base before sharding with
    cpu_ram_efficient_loading), before a resumed run loads its checkpoint's adapter."""
    train_ok(make_config("sft.yml", output_dir=str(tmp_path / "sft"), max_steps=3))
    settings = {"rl": "dpo", "lora_model_dir": str(tmp_path / "sft"), "lora_target_linear": None,
                "datasets": [{"path": str(pairs_file), "type": "user_defined.default"}], "val_set_size": 4,
                "eval_on_start": True, "save_steps": 2, "micro_batch_size": 2, "learning_rate": 5e-2,
                "num_processes": 2, "fsdp_version": 2, "fsdp_config": {"cpu_ram_efficient_loading": True}}
    runs = resumed_against_uninterrupted(make_config, tmp_path, settings)
    full = runs.full
    assert "reference: the adapter this round starts from" in runs.result.stdout
    assert abs(logged(full, "eval_loss")[0] - math.log(2)) < 1e-6 and abs(logged(full)[0] - math.log(2)) < 1e-6
    assert logged(full, "logps/chosen")[0] > -60  # the SFT adapter as the reference, not the base model
    assert_same_final_adapter(full, runs.resumed)
    assert logged(runs.resumed) == logged(full)[2:]


def test_zero3_continues_an_adapter_with_its_reference_and_resumes_exactly(make_config, tmp_path, pairs_file):
    """Under ZeRO-3 the reference pass runs once the engine has started (the weights load partitioned); a resumed
    run's engine starts with the checkpoint's adapter and reads the reference log-probs its checkpoint saved."""
    train_ok(make_config("sft.yml", output_dir=str(tmp_path / "sft"), max_steps=3))
    settings = {"rl": "dpo", "lora_model_dir": str(tmp_path / "sft"), "lora_target_linear": None,
                "datasets": [{"path": str(pairs_file), "type": "user_defined.default"}], "val_set_size": 4,
                "eval_on_start": True, "save_steps": 2, "micro_batch_size": 2, "learning_rate": 5e-2,
                "num_processes": 2, "deepspeed": "zero3"}
    runs = resumed_against_uninterrupted(make_config, tmp_path, settings)
    full = runs.full
    assert abs(logged(full, "eval_loss")[0] - math.log(2)) < 1e-6 and abs(logged(full)[0] - math.log(2)) < 1e-6
    assert logged(full, "logps/chosen")[0] > -60  # the SFT adapter as the reference, not the base model
    assert logged(full, "rewards/margins")[-1] != 0  # the policy moved away from the reference
    assert_same_final_adapter(full, runs.resumed)
    assert logged(runs.resumed) == logged(full)[2:]
    assert "reference: the adapter this round starts from, log-probs of 40 rows read from checkpoints/step-2" \
        in runs.result.stdout


def test_zero3_precomputes_the_base_reference_like_one_process(make_config, tmp_path, pairs_file):
    """precompute_ref_log_probs on a fresh LoRA: the pass with the adapter disabled runs on the started engine."""
    common = {"rl": "dpo", "precompute_ref_log_probs": True, "max_steps": 2, "learning_rate": 5e-2, "optimizer": "sgd",
              "datasets": [{"path": str(pairs_file), "type": "user_defined.default"}]}
    train_ok(make_config("one.yml", micro_batch_size=4, output_dir=str(tmp_path / "one"), **common))
    zero3 = train_ok(make_config("zero3.yml", micro_batch_size=2, num_processes=2, deepspeed="zero3",
                                 output_dir=str(tmp_path / "zero3"), **common))
    assert "reference: the base model (adapter disabled), log-probs of 40 rows computed before training" in zero3.stdout
    assert logged(tmp_path / "zero3") == pytest.approx(logged(tmp_path / "one"), abs=1e-5)
    assert logged(tmp_path / "zero3", "rewards/margins")[-1] != 0
    assert_close_final_adapters(tmp_path / "zero3", tmp_path / "one", rtol=1e-4, atol=1e-6)

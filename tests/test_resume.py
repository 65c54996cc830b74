"""Exact resume through the real CLI: SIGKILL after a checkpoint (or Ctrl-C, which saves the step in flight),
resume, compare bitwise with a clean run.

Also: a killed save is never trusted, ``save_total_limit`` prunes, ``auto`` with nothing to resume starts
fresh and says so, a changed dataset or batch shape is refused with the two ways forward, and early
stopping keeps the best adapter in ``final/``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from axlora.core.layout import RunLayout
from axlora.train.checkpoint import ResumeKey

from conftest import REPO, main_in_process, run_cli

WEIGHTS = "adapter_model.safetensors"


def write_config(path: Path, tiny_model_dir: Path, alpaca_file: Path, **overrides) -> Path:
    """40 steps of 2 rows, a checkpoint every 5; dropout > 0 so a resume must restore the RNG to be exact."""
    data = {
        "base_model": str(tiny_model_dir),
        "datasets": [{"path": str(alpaca_file), "type": "alpaca"}],
        "sequence_len": 96, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "lora_target_linear": True,
        "micro_batch_size": 2, "max_steps": 40, "learning_rate": 1e-2, "logging_steps": 1,
        "save_steps": 5, "save_total_limit": 2, "output_dir": str(path.parent / "out"),
    }
    data.update(overrides)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def kill_after_first_checkpoint(config: Path, out: Path, log: Path, timeout: float = 300) -> list[str]:
    """Start ``axlora train``, SIGKILL it as soon as checkpoints/step-5 appears; the checkpoints left."""
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "axlora", "train", str(config)], cwd=REPO,
                                   stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        try:
            while not (out / "checkpoints" / "step-5").is_dir():
                assert process.poll() is None, f"train exited early: {log.read_text()[-2000:]}"
                assert time.monotonic() < deadline, "no checkpoint appeared"
                time.sleep(0.02)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    return [p.name for p in RunLayout(out).complete_checkpoints()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir, alpaca_file) -> Path:
    work = tmp_path_factory.mktemp("clean")
    result = run_cli("train", str(write_config(work / "config.yml", tiny_model_dir, alpaca_file)))
    assert result.returncode == 0, result.stdout + result.stderr
    return work / "out"


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, tiny_model_dir, alpaca_file):
    """The same run with ``resume_from_checkpoint: auto``: killed after step 5, then started again."""
    work = tmp_path_factory.mktemp("killed")
    out = work / "out"
    config = write_config(work / "config.yml", tiny_model_dir, alpaca_file, resume_from_checkpoint="auto")
    first_log = work / "first.log"
    left = kill_after_first_checkpoint(config, out, first_log)
    # what a save killed half way leaves: a complete-looking temporary dir, which must never be trusted
    leftover = out / "checkpoints" / ".step-10.tmp-123"
    shutil.copytree(out / "checkpoints" / left[-1], leftover, dirs_exist_ok=True)
    (leftover / "trainer_state.json").write_text('{"step": 10}')
    result = run_cli("train", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    return SimpleNamespace(out=out, result=result, left=left, first_output=first_log.read_text(), leftover=leftover)


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_the_uninterrupted_run(uninterrupted, resumed):
    clean = load_file(uninterrupted / "final" / WEIGHTS)
    again = load_file(resumed.out / "final" / WEIGHTS)
    assert clean.keys() == again.keys() and len(clean) == 28
    for key, tensor in clean.items():
        assert torch.equal(tensor, again[key]), key


@pytest.mark.slow
def test_resume_names_its_checkpoint_and_ignores_the_killed_save(resumed):
    assert resumed.left and resumed.left[0] == "step-5"
    newest = resumed.left[-1]
    assert f"resume: resumed from checkpoints/{newest} at step {newest[5:]}/40" in resumed.result.stdout
    assert ".step-10.tmp" not in resumed.result.stdout  # the killed save's leftover did not count
    assert not resumed.leftover.exists()  # and it was swept away


@pytest.mark.slow
def test_auto_without_a_checkpoint_starts_fresh_and_says_so(resumed):
    assert "auto found no complete checkpoint" in resumed.first_output and "starting fresh" in resumed.first_output


@pytest.mark.slow
def test_metrics_continue_without_duplicates(uninterrupted, resumed):
    clean, again = metrics(uninterrupted), metrics(resumed.out)
    assert [r["step"] for r in again] == list(range(1, 41))
    assert [r["loss"] for r in again] == [r["loss"] for r in clean]
    summary = json.loads((resumed.out / "final" / "train_summary.json").read_text())
    assert summary["resumed_from_step"] == int(resumed.left[-1][5:]) and summary["steps"] == 40


@pytest.mark.slow
def test_save_total_limit_prunes(uninterrupted, resumed):
    for out in (uninterrupted, resumed.out):
        assert [p.name for p in RunLayout(out).complete_checkpoints()] == ["step-30", "step-35"]
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-30", "step-35"]


@pytest.mark.slow
def test_changed_data_or_batch_shape_is_refused_with_two_ways_forward(tmp_path, uninterrupted, tiny_model_dir):
    from axlora.data.demo_rows import addition_rows, write_jsonl

    other = tmp_path / "other.jsonl"
    write_jsonl(addition_rows(50, seed=5), other)
    checkpoint = uninterrupted / "checkpoints" / "step-35"
    config = write_config(tmp_path / "config.yml", tiny_model_dir, other, resume_from_checkpoint=str(checkpoint),
                          micro_batch_size=1, gradient_accumulation_steps=2, sequence_len=128)
    result = run_cli("train", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    err = result.stderr
    assert f"cannot resume {checkpoint} exactly" in err
    assert "micro_batch_size: checkpoint has 2, this run has 1" in err
    assert "gradient_accumulation_steps: checkpoint has 1, this run has 2" in err
    assert "sequence_len: checkpoint has 96, this run has 128" in err
    assert f"{other}" in err and "datasets:" in err
    assert "Two ways forward" in err and "restore the settings" in err and f"lora_model_dir: {checkpoint}" in err
    assert not (tmp_path / "out" / "final").exists()


def test_a_changed_process_count_is_named():
    key = ResumeKey(data_fingerprint="f", datasets=["d"], val_set_size=0.0, train_on_inputs=False,
                    sequence_len=96, micro_batch_size=2, gradient_accumulation_steps=1, world_size=1,
                    sample_packing=False, seed=42)
    earlier = {**key.__dict__, "world_size": 2}
    assert key.differences(earlier) == ["number of processes (world size): checkpoint has 2, this run has 1"]
    assert key.differences({**key.__dict__, "data_fingerprint": "g"})[0].startswith("the prepared data")


def test_only_complete_checkpoints_are_trusted(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in (("step-3", True), ("step-12", True), ("step-4", False), (".step-20.tmp-99", True),
                           (".step-7.old-99", True), ("step-x", True)):
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "trainer_state.json").write_text("{}")
    assert [p.name for p in RunLayout(tmp_path).complete_checkpoints()] == ["step-3", "step-12"]


# ---- early stopping ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def early_stopped(tmp_path_factory, tiny_model_dir, alpaca_file) -> Path:
    """eval every step from step 0, patience 2, a checkpoint every step: the best one is on disk to compare."""
    work = tmp_path_factory.mktemp("early")
    config = write_config(work / "config.yml", tiny_model_dir, alpaca_file, val_set_size=16, lora_dropout=0.0,
                          micro_batch_size=4, max_steps=30, eval_steps=1, eval_on_start=True,
                          early_stopping_patience=2, save_steps=1, save_total_limit=None, learning_rate=5e-2,
                          lr_scheduler="constant")
    result = run_cli("train", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    return work / "out"


@pytest.mark.slow
def test_early_stopping_keeps_the_best_adapter(early_stopped):
    summary = json.loads((early_stopped / "final" / "train_summary.json").read_text())
    stop = summary["early_stopping"]
    evals = {r["step"]: r["eval_loss"] for r in metrics(early_stopped) if "eval_loss" in r}
    assert min(evals) == 0  # eval_on_start: the baseline, logged as step 0
    best = min(evals, key=evals.get)
    assert 0 < best < 28, "pick a config whose best eval is mid-run"
    assert stop["best_step"] == best and stop["best_eval_loss"] == pytest.approx(evals[best])
    assert stop["stopped_early_at_step"] == best + 2 == summary["steps"] == max(evals)
    assert stop["load_best_model_at_end"] is True and summary["planned_steps"] == 30
    final = load_file(early_stopped / "final" / WEIGHTS)
    at_best = load_file(early_stopped / "checkpoints" / f"step-{best}" / WEIGHTS)
    after = load_file(early_stopped / "checkpoints" / f"step-{best + 1}" / WEIGHTS)
    assert all(torch.equal(final[k], at_best[k]) for k in final)
    assert not all(torch.equal(final[k], after[k]) for k in final)


@pytest.mark.slow
def test_early_stopping_survives_a_resume(tmp_path, early_stopped):
    """Resumed after the best step, the run still ends with the best adapter (checkpoints carry it)."""
    copy = tmp_path / "out"
    shutil.copytree(early_stopped, copy, ignore=shutil.ignore_patterns("final"))
    newest = RunLayout(copy).complete_checkpoints()[-1].name
    config = yaml.safe_load((early_stopped / "final" / "axlora.yml").read_text())
    config.update(output_dir=str(copy), resume_from_checkpoint="auto")
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    result = run_cli("train", str(tmp_path / "c.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resumed from checkpoints/{newest}" in result.stdout and "early stopping" in result.stdout
    final = load_file(copy / "final" / WEIGHTS)
    expected = load_file(early_stopped / "final" / WEIGHTS)
    assert all(torch.equal(final[k], expected[k]) for k in final)


def test_early_stopping_needs_evaluations(make_config, capsys):
    result = main_in_process(capsys, "train", str(make_config(early_stopping_patience=2, val_set_size=8)))
    assert result.returncode == 2 and "early_stopping_patience: needs eval_steps" in result.stderr


@pytest.mark.parametrize("key", ["eval_on_start", "early_stopping_patience"])
def test_evaluation_features_need_validation_rows(make_config, key, capsys):
    value = 2 if key == "early_stopping_patience" else True
    result = main_in_process(capsys, "train", str(make_config(**{key: value}, eval_steps=1)))
    assert result.returncode == 2 and f"{key}: needs validation rows" in result.stderr


def test_a_changed_lora_is_refused(tmp_path, tiny_model_dir):
    """Rank, alpha, dropout and targets shape what a step trains: a resume with other values is refused."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from axlora.core.errors import UserError
    from axlora.train.checkpoint import check_adapter_unchanged

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    saved = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.1, "use_rslora": False, "target_modules": ["v_proj", "q_proj"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.raises(UserError, match="lora_r: checkpoint has 8, this run has 4") as refused:
        check_adapter_unchanged(tmp_path, model)
    assert "Two ways forward" in str(refused.value) and "lora_target_modules" not in str(refused.value)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**saved, "r": 4}))
    check_adapter_unchanged(tmp_path, model)  # unchanged: no complaint


@pytest.mark.slow
def test_a_fresh_run_sets_an_earlier_run_s_checkpoints_aside(make_config, tmp_path):
    """Never deleted (a run started without `auto` by mistake), never resumed by a later `auto` either."""
    out = tmp_path / "out"
    first = make_config("first.yml", max_steps=4, save_steps=2, seed=1)
    assert run_cli("train", str(first)).returncode == 0
    earlier = (out / "checkpoints" / "step-2" / WEIGHTS).read_bytes()
    result = run_cli("train", str(make_config("second.yml", max_steps=4, save_steps=2, seed=2)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"are moved to {out / 'checkpoints-earlier-1'}" in result.stdout
    assert (out / "checkpoints-earlier-1" / "step-2" / WEIGHTS).read_bytes() == earlier
    assert [p.name for p in RunLayout(out).complete_checkpoints()] == ["step-2"]
    assert (out / "checkpoints" / "step-2" / WEIGHTS).read_bytes() != earlier  # the second run's own


@pytest.mark.slow
def test_ctrl_c_saves_the_step_in_flight_and_the_resume_is_exact(tmp_path, uninterrupted, tiny_model_dir,
                                                                 alpaca_file):
    from test_run_signals import TrainingProcess, stopped_step

    config = write_config(tmp_path / "config.yml", tiny_model_dir, alpaca_file)
    run = TrainingProcess(str(config))
    run.wait_for("step 7/40")
    run.send(signal.SIGINT)
    assert run.finish() == 130, run.output[-3000:]
    step = stopped_step(run.output)
    assert 7 <= step < 40 and f"saved {tmp_path / 'out' / 'checkpoints' / f'step-{step}'}" in run.output
    result = run_cli("train", str(config), "--resume_from_checkpoint", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from checkpoints/step-{step} at step {step}/40" in result.stdout
    clean, again = load_file(uninterrupted / "final" / WEIGHTS), load_file(tmp_path / "out" / "final" / WEIGHTS)
    assert all(torch.equal(tensor, again[key]) for key, tensor in clean.items())

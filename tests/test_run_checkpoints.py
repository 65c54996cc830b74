"""Checkpoints are verified before a resume trusts them: ``auto`` falls back to the newest intact one and says
why; a damaged checkpoint named by path is exit status 2 naming the file; a set-aside complete copy is restored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from axlora.core.layout import RunLayout
from axlora.train.checkpoint import remove_unfinished_saves
from axlora.train.checkpoint_verify import FILES_KEY, checkpoint_problem, file_record

from conftest import assert_same_final_adapter, run_cli, train_ok

FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pt", "adapter_config.json")


def fake_checkpoint(path: Path, record: bool = True) -> Path:
    """A checkpoint's files with made-up content; the state records their sizes and hashes like a save does."""
    path.mkdir(parents=True)
    for index, name in enumerate(FILES):
        (path / name).write_bytes(bytes([index]) * (100 + index))
    state = {"step": 3, **({FILES_KEY: file_record(path)} if record else {})}
    (path / "trainer_state.json").write_text(json.dumps(state))
    return path


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:10])


def rewrite_same_size(file: Path) -> None:
    file.write_bytes(b"x" * file.stat().st_size)


def drop_step(file: Path) -> None:
    file.write_text(json.dumps({k: v for k, v in json.loads(file.read_text()).items() if k != "step"}))


DAMAGE = {
    "truncated adapter": ("adapter_model.safetensors", truncate, "bytes, the save wrote"),
    "empty optimizer": ("optimizer.pt", lambda f: f.write_bytes(b""), "0 bytes, the save wrote 101"),
    "truncated RNG state": ("rng_state.pt", truncate, "10 bytes"),
    "overwritten scheduler": ("scheduler.pt", rewrite_same_size, "SHA-256 mismatch"),
    "missing file": ("adapter_config.json", Path.unlink, "missing"),
    "state without step": ("trainer_state.json", drop_step, 'has no "step"'),
    "state not JSON": ("trainer_state.json", lambda f: f.write_text('{"step": 3, "fil'), "unreadable"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_each_kind_of_damage_is_found_naming_the_file(tmp_path, case):
    checkpoint = fake_checkpoint(tmp_path / "step-3")
    assert checkpoint_problem(checkpoint) is None
    name, damage, expected = DAMAGE[case]
    damage(checkpoint / name)
    problem = checkpoint_problem(checkpoint)
    assert problem is not None and problem.startswith(f"{checkpoint / name}:") and expected in problem, problem


def test_a_checkpoint_without_a_file_record_gets_the_basic_checks(tmp_path):
    checkpoint = fake_checkpoint(tmp_path / "step-3", record=False)
    assert checkpoint_problem(checkpoint) is None
    (checkpoint / "optimizer.pt").unlink()
    assert checkpoint_problem(checkpoint) == f"{checkpoint / 'optimizer.pt'}: missing"
    (checkpoint / "rng_state.pt").write_bytes(b"")
    assert checkpoint_problem(checkpoint) == f"{checkpoint / 'rng_state.pt'}: empty"


def test_a_killed_replacement_s_complete_copy_is_restored(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    fake_checkpoint(root / ".step-4.old-999999999")  # set aside by a replacement killed before the new one landed
    fake_checkpoint(root / ".step-5.tmp-999999999")  # a save killed half way
    remove_unfinished_saves(tmp_path, print)
    assert sorted(p.name for p in root.iterdir()) == ["step-4"]
    assert checkpoint_problem(root / "step-4") is None
    assert "restored the complete copy .step-4.old-999999999" in capsys.readouterr().out


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, tiny_model_dir, alpaca_file):
    """A 3-step run with a checkpoint after steps 1 and 2 (the files the resumes below start from)."""
    import yaml

    work = tmp_path_factory.mktemp("saved")
    settings = {"base_model": str(tiny_model_dir), "datasets": [{"path": str(alpaca_file), "type": "alpaca"}],
                "sequence_len": 96, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "lora_target_linear": True,
                "micro_batch_size": 4, "max_steps": 3, "learning_rate": 1e-2, "save_steps": 1,
                "output_dir": str(work / "out")}
    (work / "config.yml").write_text(yaml.safe_dump(settings))
    train_ok(work / "config.yml")
    return settings, work / "out"


def copy_run(two_checkpoints, tmp_path: Path, **overrides) -> tuple[Path, Path]:
    import yaml

    settings, out = two_checkpoints
    shutil.copytree(out / "checkpoints", tmp_path / "out" / "checkpoints")
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({**settings, "output_dir": str(tmp_path / "out"), **overrides}))
    return config, tmp_path / "out"


@pytest.mark.slow
def test_auto_skips_a_damaged_newest_checkpoint_and_resumes_exactly(two_checkpoints, tmp_path):
    config, out = copy_run(two_checkpoints, tmp_path, resume_from_checkpoint="auto")
    damaged = out / "checkpoints" / "step-2" / "optimizer.pt"
    truncate(damaged)
    result = train_ok(config)
    assert f"resume: skipped checkpoints/step-2: {damaged}: 10 bytes" in result.stdout
    assert "resumed from checkpoints/step-1 at step 1/3" in result.stdout
    assert_same_final_adapter(out, two_checkpoints[1])  # steps 2 and 3 trained again, exactly as the first time
    assert checkpoint_problem(RunLayout(out).checkpoint(2)) is None  # and step 2 saved again, whole


@pytest.mark.slow
def test_a_damaged_checkpoint_named_by_path_is_exit_2_naming_the_file(two_checkpoints, tmp_path):
    checkpoint = tmp_path / "out" / "checkpoints" / "step-2"
    config, out = copy_run(two_checkpoints, tmp_path, resume_from_checkpoint=str(checkpoint))
    (checkpoint / "adapter_model.safetensors").write_bytes(b"")
    result = run_cli("train", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"{checkpoint} is damaged: {checkpoint / 'adapter_model.safetensors'}: 0 bytes" in result.stderr
    assert not (out / "final").exists()

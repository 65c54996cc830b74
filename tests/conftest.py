"""Shared fixtures: a tiny local Llama with its tokenizer, generated alpaca data, and config files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Built-in models are built into a per-session cache, never the user's."""
    os.environ["AXLORA_CACHE"] = str(tmp_path_factory.mktemp("axlora-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # tiny models run fastest on one thread; more threads only contend on a small CI machine
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide Llama with the demo tokenizer: fast enough for end-to-end runs."""
    from axlora.model.builtin import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny", hidden_size=32, num_layers=2)


@pytest.fixture(scope="session")
def alpaca_file(tmp_path_factory) -> Path:
    from axlora.data.demo_rows import addition_rows, write_jsonl

    path = tmp_path_factory.mktemp("data") / "addition.jsonl"
    write_jsonl(addition_rows(96, seed=3), path)
    return path


@pytest.fixture
def make_config(tmp_path, tiny_model_dir, alpaca_file):
    """Write a YAML config for the tiny model; keyword arguments override the defaults."""

    def make(name: str = "config.yml", **overrides) -> Path:
        data = {
            "base_model": str(tiny_model_dir),
            "datasets": [{"path": str(alpaca_file), "type": "alpaca"}],
            "sequence_len": 96,
            "lora_r": 4,
            "lora_alpha": 8,
            "lora_dropout": 0.0,
            "lora_target_linear": True,
            "micro_batch_size": 4,
            "max_steps": 4,
            "learning_rate": 1e-2,
            "logging_steps": 1,
            "output_dir": str(tmp_path / "out"),
        }
        data.update(overrides)
        data = {k: v for k, v in data.items() if v is not None}
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return make


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real ``axlora`` command line in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "axlora", *args], capture_output=True, text=True, cwd=cwd or REPO,
        timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def main_in_process(capsys, *args: str) -> SimpleNamespace:
    """The CLI's own ``main`` in this process: for runs refused before any model loads, without the
    seconds a subprocess spends importing torch and transformers. Same exit status and messages."""
    from axlora.cli import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def logged(out: Path, key: str = "loss") -> list[float]:
    """The values of ``key`` in a run's logs/metrics.jsonl, in step order."""
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [row[key] for row in rows if key in row]


def train_ok(config_path: Path) -> subprocess.CompletedProcess:
    """``axlora train`` that must succeed; on failure the assertion shows the end of its output."""
    result = run_cli("train", str(config_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def resumed_against_uninterrupted(make_config, tmp_path: Path, settings: dict) -> SimpleNamespace:
    """Train 4 steps (checkpoints every 2), then resume a copy of its checkpoints with ``auto``: both runs."""
    train_ok(make_config("full.yml", output_dir=str(tmp_path / "full"), **settings))
    shutil.copytree(tmp_path / "full" / "checkpoints", tmp_path / "resumed" / "checkpoints")
    result = train_ok(make_config("resume.yml", output_dir=str(tmp_path / "resumed"), resume_from_checkpoint="auto",
                                  **settings))
    assert "resumed from checkpoints/step-2 at step 2/4" in result.stdout
    return SimpleNamespace(full=tmp_path / "full", resumed=tmp_path / "resumed", result=result)


def assert_same_final_adapter(one: Path, other: Path) -> None:
    """Bitwise the same tensors in both runs' final adapters."""
    import torch
    from safetensors.torch import load_file

    first = load_file(one / "final" / "adapter_model.safetensors")
    second = load_file(other / "final" / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(second[name], tensor), name


def assert_close_final_adapters(ours: Path, reference: Path, **tolerance) -> None:
    """Both runs' final adapters hold the same tensors (names, shapes, none empty) with close values."""
    import torch
    from safetensors.torch import load_file

    mine = load_file(ours / "final" / "adapter_model.safetensors")
    theirs = load_file(reference / "final" / "adapter_model.safetensors")
    assert mine.keys() == theirs.keys()
    for name, tensor in theirs.items():
        # a sharded save without gathering would write empty tensors
        assert mine[name].shape == tensor.shape and mine[name].numel() > 0, name
        torch.testing.assert_close(mine[name], tensor, **tolerance)

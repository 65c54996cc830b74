"""Launching: several CPU processes (gloo) through `axlora train`, equivalent to one process with the same global batch."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_close_final_adapters, logged, run_cli

pytestmark = pytest.mark.slow


def test_two_processes_train_the_same_model_as_one(make_config, tmp_path):
    common = {"lora_dropout": 0.0, "max_steps": 3, "gradient_accumulation_steps": 2, "seed": 7}
    single = make_config("one.yml", micro_batch_size=4, output_dir=str(tmp_path / "one"), **common)
    double = make_config("two.yml", micro_batch_size=2, num_processes=2, output_dir=str(tmp_path / "two"), **common)
    result_one = run_cli("train", str(single))
    assert result_one.returncode == 0, result_one.stderr
    result_two = run_cli("train", str(double))
    assert result_two.returncode == 0, result_two.stdout + result_two.stderr
    assert "launch: 2 processes" in result_two.stdout and "accelerate.commands.launch" in result_two.stdout
    # the data was prepared once, by the launcher: both workers report a cache hit
    assert result_two.stdout.count("data: prepared") == 1

    assert logged(tmp_path / "two") == pytest.approx(logged(tmp_path / "one"), rel=1e-5)
    assert_close_final_adapters(tmp_path / "two", tmp_path / "one", rtol=1e-4, atol=1e-6)
    summary = json.loads((tmp_path / "two" / "final" / "train_summary.json").read_text())
    assert summary["world_size"] == 2
    # only the main process writes logs: one row per logged step
    steps = [json.loads(line)["step"] for line in (tmp_path / "two" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_machines": 2}, "main_process_ip"),
        ({"num_machines": 2, "machine_rank": 2, "main_process_ip": "10.0.0.1"}, "machine_rank"),
    ],
)
def test_bad_hardware_settings_exit_2_before_any_worker(make_config, overrides, message):
    result = run_cli("train", str(make_config(**overrides)))
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "launch:" not in result.stdout


def test_more_processes_than_gpus_is_refused(monkeypatch, tmp_path):
    from axlora.config.schema import Config
    from axlora.core.errors import UserError
    from axlora.launch import process_layout

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    config = Config(base_model="m", datasets=[{"path": "d.jsonl", "type": "alpaca"}], lora_target_linear=True,
                    max_steps=1, num_processes=4)
    with pytest.raises(UserError, match="4 processes asked for, but this machine has 2 GPU"):
        process_layout(config)
    assert process_layout(config.model_copy(update={"num_processes": None})).num_processes == 2


def test_one_machine_rendezvous_on_a_free_port_unless_one_is_set():
    """Two runs on one machine must not both wait on accelerate's default port 29500."""
    import socket

    from axlora.config.schema import Config
    from axlora.launch import process_layout

    config = Config(base_model="m", datasets=[{"path": "d.jsonl", "type": "alpaca"}], lora_target_linear=True,
                    max_steps=1, num_processes=2)
    port = process_layout(config).main_process_port
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # it was free a moment ago
    explicit = Config(**{**config.model_dump(exclude_unset=True), "main_process_port": 29511})
    assert process_layout(explicit).main_process_port == 29511
    several = Config(**{**config.model_dump(exclude_unset=True), "num_machines": 2, "main_process_ip": "10.0.0.1"})
    assert process_layout(several).main_process_port == 29500


def test_bad_input_found_by_the_workers_still_exits_2(make_config):
    """accelerate exits 1 for any failed worker; the launcher reports the workers' own status 2."""
    result = run_cli("train", str(make_config(num_processes=2, eval_on_start=True)))
    assert "launch: 2 processes" in result.stdout
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    # each rank refused it; the launcher prints it once
    assert result.stderr.count("eval_on_start: needs validation rows") == 1 and "Traceback" not in result.stderr

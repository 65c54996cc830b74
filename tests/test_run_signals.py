"""SIGINT / SIGTERM sent to a real training process: the step in flight finishes, a checkpoint of it is saved,
the resume command is printed, exit 130 / 143; a second Ctrl-C aborts at once; multi-process runs alike."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from axlora.core.layout import RunLayout
from axlora.train.checkpoint_verify import checkpoint_problem

from conftest import REPO, run_cli


class TrainingProcess:
    """``axlora train`` in a subprocess whose output is collected as it comes, so a test can wait for a line."""

    def __init__(self, *args: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "axlora", "train", *args], cwd=REPO, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if self.process.poll() is not None:
                self._reader.join(timeout)  # what it printed before exiting may still be in the pipe
                assert text in self.output, f"train exited before {text!r}:\n{self.output[-3000:]}"
                return
            assert time.monotonic() < deadline, f"no {text!r} in time:\n{self.output[-3000:]}"
            time.sleep(0.01)

    def send(self, signum: int) -> None:
        self.process.send_signal(signum)

    def finish(self, timeout: float = 300) -> int:
        code = self.process.wait(timeout)
        self._reader.join(timeout)
        return code


def stopped_step(output: str) -> int:
    return int(output.split("after step ")[1].split("/")[0])


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_prints_the_resume_command(make_config, tmp_path):
    out = tmp_path / "out"
    config = make_config(max_steps=300, logging_steps=1)
    run = TrainingProcess(str(config), "--learning_rate", "0.02")
    run.wait_for("step 3/300")
    run.send(signal.SIGTERM)
    assert run.finish() == 143, run.output[-3000:]
    assert "Traceback" not in run.output
    step = stopped_step(run.output)
    assert f"stopped by SIGTERM after step {step}/300; saved {RunLayout(out).checkpoint(step)}" in run.output
    command = f"axlora train {config} --resume_from_checkpoint auto --learning_rate 0.02"
    assert f"Resume with:\n  {command}\n" in run.output
    assert checkpoint_problem(RunLayout(out).checkpoint(step)) is None
    assert not (out / "final").exists() and not RunLayout(out).lock.exists()
    resumed = run_cli(*command.split()[1:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from checkpoints/step-{step} at step {step}/300" in resumed.stdout


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once(make_config):
    # long steps (24 micro batches each), so the second Ctrl-C lands while the first one's step still runs
    run = TrainingProcess(str(make_config(max_steps=100, micro_batch_size=1, gradient_accumulation_steps=24)))
    run.wait_for("step 1/100")
    run.send(signal.SIGINT)
    run.wait_for("SIGINT: stopping after the current step")
    run.send(signal.SIGINT)
    assert run.finish() == 130
    assert "aborted: interrupted at once" in run.output and "Traceback" not in run.output
    assert "stopped by SIGINT" not in run.output


def test_the_first_signal_only_asks_and_a_second_ctrl_c_aborts():
    from axlora.core.interrupt import RunInterrupted
    from axlora.train.stop_requests import StopRequests

    said = []
    with StopRequests(said.append) as stop:
        with pytest.raises(RunInterrupted, match="before the first step"):
            os.kill(os.getpid(), signal.SIGTERM)  # nothing trained yet: stops at once
    with StopRequests(said.append) as stop:
        stop.armed = True
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # repeated: changes nothing
        assert stop.signum == signal.SIGTERM and said[-1].startswith("SIGTERM: stopping after the current step")
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.slow
def test_two_processes_stop_together_on_sigterm(make_config, tmp_path):
    """The launcher passes the signal on; both ranks finish the same step, save one checkpoint and stop."""
    out = tmp_path / "out"
    run = TrainingProcess(str(make_config(max_steps=300, micro_batch_size=2, num_processes=2)))
    run.wait_for("step 2/300")
    run.send(signal.SIGTERM)
    assert run.finish() == 143, run.output[-3000:]
    assert "Traceback" not in run.output and "worker process failed" not in run.output
    step = stopped_step(run.output)
    checkpoint = RunLayout(out).checkpoint(step)
    assert run.output.count(f"stopped by SIGTERM after step {step}/300") == 1
    assert checkpoint_problem(checkpoint) is None
    assert sorted(p.name for p in Path(checkpoint).glob("rank-*.pt")) == ["rank-0.pt", "rank-1.pt"]
    assert "--resume_from_checkpoint auto" in run.output and not RunLayout(out).lock.exists()


def test_the_resume_command_keeps_the_user_s_overrides():
    from axlora.launch import resume_command

    overrides = ["--learning_rate", "1e-4", "--resume_from_checkpoint", "out/checkpoints/step-4", "--seed=3",
                 "--resume_from_checkpoint=auto", "--sample_prompts", "a b"]
    assert resume_command(Path("my run.yml"), overrides) == (
        "axlora train 'my run.yml' --resume_from_checkpoint auto --learning_rate 1e-4 --seed=3 --sample_prompts 'a b'")

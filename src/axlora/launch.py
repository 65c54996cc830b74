"""Run training in this process, or re-execute ``axlora train`` under ``accelerate launch``.

More than one process (``num_processes`` > 1 or ``num_machines`` > 1) makes the launching process
prepare the dataset once, then start the workers, which find it in the cache: preparing once per rank
wastes CPU and, on large datasets, makes the ranks that finish first time out waiting for the others.
Under an existing launcher (accelerate, torchrun, SLURM with torchrun) the run happens in-process as is.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from axlora.config.schema import Config
from axlora.core.atomic import recover_directory
from axlora.core.errors import RunFailed, UserError
from axlora.core.interrupt import RunInterrupted
from axlora.core.layout import RunLayout
from axlora.core.run_lock import run_lock
from axlora.core.write_errors import reported_write_errors

_LAUNCHER_ENV = ("LOCAL_RANK", "WORLD_SIZE", "ACCELERATE_PROCESS_ID")
# where workers leave their exit status and error: the launcher prints each error once (not once per rank)
# and reports 2 when a worker refused bad input, although accelerate/torchrun exit 1 for any failed worker
_STATUS_DIR_ENV = "AXLORA_WORKER_STATUS_DIR"
# set by the launching ``axlora train``, which holds the output_dir lock for its workers
_LOCK_HELD_ENV = "AXLORA_RUN_LOCK_HELD_BY"


def under_launcher() -> bool:
    """True inside a worker started by accelerate, torchrun or a compatible launcher."""
    return any(name in os.environ for name in _LAUNCHER_ENV)


@dataclass(frozen=True)
class ProcessLayout:
    num_processes: int
    num_machines: int
    machine_rank: int
    main_process_ip: str | None
    main_process_port: int
    use_gpus: bool
    deepspeed: str | None = None
    zero_stage: int | None = None  # from the DeepSpeed config, checked before any worker starts
    fsdp: bool = False

    @property
    def needs_process_group(self) -> bool:
        """DeepSpeed and FSDP need a process group even for one process."""
        return bool(self.deepspeed) or self.fsdp

    @property
    def world_size(self) -> int:
        return self.num_processes * self.num_machines


def process_layout(config: Config) -> ProcessLayout:
    """Process layout from the config and the GPUs present; bad settings fail here, before any worker."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    num_processes = config.num_processes or max(gpus, 1)
    if gpus and num_processes > gpus:
        raise UserError(
            f"num_processes: {num_processes} processes asked for, but this machine has {gpus} GPU(s); "
            f"set num_processes to at most {gpus}."
        )
    if config.num_machines > 1 and not config.main_process_ip:
        raise UserError("main_process_ip: a multi-machine run (num_machines > 1) needs the rank-0 machine's address.")
    if config.machine_rank >= config.num_machines:
        raise UserError(
            f"machine_rank: {config.machine_rank} is out of range for num_machines {config.num_machines} "
            f"(ranks are 0..{config.num_machines - 1})."
        )
    layout = ProcessLayout(
        num_processes=num_processes,
        num_machines=config.num_machines,
        machine_rank=config.machine_rank,
        main_process_ip=config.main_process_ip,
        main_process_port=_rendezvous_port(config),
        use_gpus=gpus > 0,
        deepspeed=config.deepspeed,
        fsdp=config.uses_fsdp(),
    )
    if config.deepspeed:
        layout = replace(layout, zero_stage=_check_deepspeed(config, layout))
    if layout.fsdp:
        _check_fsdp(config, layout)
    return layout


def _rendezvous_port(config: Config) -> int:
    """The configured port; on one machine, unless it is set, a free one: two runs on one machine do not collide."""
    if config.num_machines > 1 or "main_process_port" in config.model_fields_set:
        return config.main_process_port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _check_fsdp(config: Config, layout: ProcessLayout) -> None:
    """What the config alone cannot tell about ``fsdp``: whether this machine can do it."""
    from axlora.config.fsdp import fsdp_settings

    settings = fsdp_settings(config)
    if settings and settings.offload_params and not layout.use_gpus:
        raise UserError("fsdp_config.offload_params: offloading the sharded weights to the CPU only means something "
                        "with GPUs; on this CPU-only machine turn it off.")


def _check_deepspeed(config: Config, layout: ProcessLayout) -> int:
    """Everything about the ``deepspeed`` key that can fail, checked before a worker starts; the ZeRO stage."""
    from axlora.train.deepspeed import load_deepspeed_setup, require_deepspeed
    from axlora.train.precision import choose_precision

    require_deepspeed()
    setup = load_deepspeed_setup(config, layout.world_size, choose_precision(config).name)
    if setup.offloads_optimizer and not layout.use_gpus:
        raise UserError(f"deepspeed: {setup.source} offloads the optimizer to the CPU, which only means something "
                        "with GPUs; on this CPU-only machine use zero2 or zero3.")
    if setup.stage == 3 and config.chunked_cross_entropy:
        raise UserError("chunked_cross_entropy: not with ZeRO-3, which partitions the output head's weight; "
                        "use zero2 or turn chunked_cross_entropy off.")
    return setup.stage


def accelerate_arguments(layout: ProcessLayout, config_path: Path, overrides: list[str]) -> list[str]:
    """``accelerate launch`` arguments re-running this same ``axlora train`` in every worker.

    ``--multi_gpu`` also drives several CPU processes (accelerate then uses gloo); ``--cpu`` would start
    only one.
    """
    command = [
        "--num_processes", str(layout.world_size),
        "--num_machines", str(layout.num_machines),
        "--machine_rank", str(layout.machine_rank),
        "--main_process_port", str(layout.main_process_port),
        "--mixed_precision", "no",  # the run chooses its precision itself (bf16/fp16 keys)
        "--dynamo_backend", "no",
        "--multi_gpu",
    ]
    if layout.main_process_ip:
        command += ["--main_process_ip", layout.main_process_ip]
    return [*command, "-m", "axlora", "train", str(config_path), *overrides]


def train(config: Config, config_path: Path, overrides: list[str], log=print) -> int:
    """Train in-process, or prepare the data once and launch the workers; returns the exit status.

    The process that starts the run holds the ``output_dir`` lock for all of it (workers it launches do not
    lock again), taken before anything is written there. A write the disk refuses, at any stage, is bad input.
    """
    resume = resume_command(config_path, overrides)
    try:
        if under_launcher():
            return _train_as_worker(config, log)
        layout = process_layout(config)
        with reported_write_errors(Path(config.output_dir)), _output_dir_lock(config, layout.machine_rank == 0, log):
            if layout.world_size == 1:
                from axlora.train.recipe import run_training

                if layout.needs_process_group:
                    _become_single_worker(layout)
                run_training(config)
                return 0
            return _launch_workers(config, layout, config_path, overrides, log)
    except RunInterrupted as exc:
        raise RunInterrupted(exc.signum, f"{exc}\nResume with:\n  {resume}") from None


def resume_command(config_path: Path, overrides: list[str]) -> str:
    """``axlora train CONFIG --resume_from_checkpoint auto`` with the user's other overrides, ready to paste."""
    kept, skip = [], False
    for argument in overrides:
        if skip:
            skip = False
        elif argument == "--resume_from_checkpoint":
            skip = True
        elif not argument.startswith("--resume_from_checkpoint="):
            kept.append(argument)
    return shlex.join(["axlora", "train", str(config_path), "--resume_from_checkpoint", "auto", *kept])


def _train_as_worker(config: Config, log) -> int:
    """A worker: rank 0 locks ``output_dir`` unless the launching ``axlora train`` holds the lock already."""
    from axlora.train.recipe import run_training

    holds_lock = _LOCK_HELD_ENV not in os.environ and os.environ.get("RANK", "0") == "0"
    try:
        with reported_write_errors(Path(config.output_dir)), _output_dir_lock(config, holds_lock, log):
            run_training(config)
    except (UserError, RunFailed, RunInterrupted) as exc:
        if _leave_status(exc.exit_code, str(exc)):
            return exc.exit_code  # the launcher prints it, once for all ranks
        raise
    finally:
        _end_process_group()
    return 0


def _end_process_group() -> None:
    """Tear the process group down before the worker exits: left to interpreter shutdown, a gloo or DeepSpeed
    communication thread can still be running and abort the process ("terminate called without an active
    exception") after the run has finished and saved."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def _output_dir_lock(config: Config, holds: bool, log) -> Iterator[None]:
    """Hold ``output_dir``'s run lock (when ``holds``); then restore a ``final/`` a killed replacement hid."""
    if not holds:
        yield
        return
    layout = RunLayout(Path(config.output_dir))
    with run_lock(layout.lock, log):
        recover_directory(layout.final, log)
        yield


def _launch_workers(config: Config, layout: ProcessLayout, config_path: Path, overrides: list[str], log) -> int:
    """Prepare the data once, start the workers under accelerate, and report their outcome once."""
    # preference rows are prepared in memory by each worker; a pretraining_dataset is streamed by each worker
    if layout.machine_rank == 0 and not config.rl and not config.pretraining_dataset:
        prepared = prepare_once(config, log)
        check_resume(config, layout, prepared.fingerprint)
    arguments = accelerate_arguments(layout, config_path, overrides)
    # printed as the plain accelerate command (rerunnable by hand); run through axlora.launch_workers, which is
    # the same launch without accelerate's own traceback when a worker fails
    log(f"launch: {layout.world_size} processes ({layout.num_processes} x {layout.num_machines} machine(s)): "
        + shlex.join([sys.executable, "-m", "accelerate.commands.launch", *arguments]))
    command = [sys.executable, "-m", "axlora.launch_workers", *arguments]
    with tempfile.TemporaryDirectory(prefix="axlora-workers-") as status_dir:
        env = {**os.environ, _STATUS_DIR_ENV: status_dir, _LOCK_HELD_ENV: str(os.getpid())}
        returncode = run_forwarding_signals(command, env)
        statuses = [json.loads(path.read_text()) for path in sorted(Path(status_dir).glob("rank-*"))]
    messages = list(dict.fromkeys(status["message"] for status in statuses))
    codes = {status["exit_code"] for status in statuses}
    stopped = sorted(code for code in codes if code > 128)
    if stopped:
        raise RunInterrupted(stopped[-1] - 128, "\n".join(messages))
    for message in messages:
        print(f"error: {message}", file=sys.stderr)
    if returncode and UserError.exit_code in codes:
        return UserError.exit_code
    return returncode


def run_forwarding_signals(command: list[str], env: dict[str, str]) -> int:
    """Run the workers' launcher in its own session and pass it each SIGINT / SIGTERM this process gets.

    A terminal's Ctrl-C then reaches the workers once (through ``launch_workers``), and so does a SIGTERM sent
    to this process alone (Kubernetes signals only a container's first process).
    """
    process = subprocess.Popen(command, env=env, start_new_session=True)

    def forward(signum, _frame):
        process.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        return process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _leave_status(exit_code: int, message: str) -> bool:
    """Hand a worker's error to the launcher; False where there is none to take it (other machines)."""
    status_dir = os.environ.get(_STATUS_DIR_ENV)
    if not (status_dir and Path(status_dir).is_dir()):
        return False
    status = json.dumps({"exit_code": exit_code, "message": message})
    (Path(status_dir) / f"rank-{os.environ.get('RANK', '0')}").write_text(status)
    return True


def _become_single_worker(layout: ProcessLayout) -> None:
    """DeepSpeed and FSDP need a process group even for one process: this process becomes a world of one."""
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(layout.main_process_port))


def prepare_once(config: Config, log=print):
    """Tokenize and cache the datasets here, so the workers only read the cache."""
    from axlora.data.prepare import prepare_data
    from axlora.model.tokenizer import load_tokenizer, tokenizer_fingerprint

    tokenizer = load_tokenizer(config)
    return prepare_data(config, tokenizer, tokenizer_fingerprint(tokenizer), log)


def check_resume(config: Config, layout: ProcessLayout, data_fingerprint: str) -> None:
    """A resume the workers would refuse (changed data, batch, process count, ZeRO stage) fails here, first."""
    from axlora.train import checkpoint as ckpt

    resume_from = ckpt.resolve_resume(config, lambda *_: None)
    if resume_from is None:
        return
    ckpt.read_checkpoint_state(resume_from, ckpt.ResumeKey.for_run(config, data_fingerprint, layout.world_size,
                                                                   layout.zero_stage))

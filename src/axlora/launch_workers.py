"""``python -m axlora.launch_workers ARGS``: ``accelerate launch ARGS``, without a traceback when a worker fails.

A worker's traceback is its own; a bad-input message goes to ``axlora train``, which prints it once for
all ranks. accelerate's launcher would add a ChildFailedError traceback and torchrun log lines that tell
the user nothing more than the one line printed here. SIGINT and SIGTERM are passed on to the workers.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    # its "failed (exitcode ...)" / "Sending ... SIGTERM" lines repeat what the one line below says
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    forward_stop_signals_to_workers()
    args.signals_to_handle = _AGENT_SIGNALS  # torch's launcher sets the variable from its own argument
    try:
        launch_command(args)
    except ChildFailedError as exc:
        codes = {failure.exitcode for failure in exc.failures.values()}
        # the workers stopped on SIGINT / SIGTERM and said so themselves; once the first has exited, the agent
        # ends the others with SIGTERM (-15), all past the checkpoint's last barrier by then
        if codes & _STOPPED_BY_SIGNAL and codes <= _STOPPED_BY_SIGNAL | _ENDED_BY_AGENT:
            return max(codes)
        failed = ", ".join(f"rank {rank} (exit status {failure.exitcode})"
                           for rank, failure in sorted(exc.failures.items()))
        print(f"error: worker process failed: {failed}", file=sys.stderr)
        return 1
    return 0


_STOPPED_BY_SIGNAL = {128 + signal.SIGINT, 128 + signal.SIGTERM}
_ENDED_BY_AGENT = {-signal.SIGTERM, -signal.SIGINT}
_AGENT_SIGNALS = "SIGHUP,SIGQUIT"


def forward_stop_signals_to_workers() -> None:
    """SIGINT and SIGTERM go to every worker, which finish their step, save and stop together.

    torch's elastic agent would instead answer them by terminating the workers (SIGKILL after 30 s, which a
    checkpoint of a large model may need), so it is told to handle only SIGHUP and SIGQUIT.
    """
    import psutil

    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = _AGENT_SIGNALS

    def forward(signum, _frame):
        for worker in psutil.Process().children():
            try:
                worker.send_signal(signum)
            except psutil.Error:
                pass  # already gone

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)


if __name__ == "__main__":
    sys.exit(main())

"""``python -m axlora.launch_workers ARGS``: ``accelerate launch ARGS``, without a traceback when a worker fails.

A worker's traceback is its own; a bad-input message goes to ``axlora train``, which prints it once for
all ranks. accelerate's launcher would add a ChildFailedError traceback and torchrun log lines that tell
the user nothing more than the one line printed here.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    # its "failed (exitcode ...)" / "Sending ... SIGTERM" lines repeat what the one line below says
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        launch_command(args)
    except ChildFailedError as exc:
        failed = ", ".join(f"rank {rank} (exit status {failure.exitcode})"
                           for rank, failure in sorted(exc.failures.items()))
        print(f"error: worker process failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m axlora.workers ARGS``: ``accelerate launch ARGS``, without a traceback when a worker fails.

Every worker reports its own error (a bad-input message, or its traceback); accelerate's launcher would
then add a ChildFailedError traceback of its own that tells the user nothing more.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except ChildFailedError as exc:
        failed = ", ".join(f"rank {rank} (exit status {failure.exitcode})"
                           for rank, failure in sorted(exc.failures.items()))
        print(f"error: worker process failed: {failed}; its messages are above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

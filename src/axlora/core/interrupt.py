"""A run stopped by a signal (Ctrl-C, or a scheduler's SIGTERM before preemption), after saving what it could."""

from __future__ import annotations

import signal


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class RunInterrupted(Exception):
    """Exit status 128 + the signal's number (130 for SIGINT, 143 for SIGTERM), as a shell reports a signal.

    ``message`` says where the run stopped and what it saved; the command layer adds how to resume.
    """

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum

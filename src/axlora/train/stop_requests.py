"""SIGINT and SIGTERM during training: finish the current optimizer step, save a checkpoint, then stop.

The first signal only sets a flag: the step in flight completes (a step cut in half would leave weights and
optimizer state out of step), the loop saves a checkpoint of it and raises ``RunInterrupted``. A second
Ctrl-C aborts at once (``KeyboardInterrupt``), losing the work since the last checkpoint; a repeated SIGTERM
changes nothing (launchers and schedulers may send it more than once). Before the first step (``armed``
not yet set) there is nothing to save, so a signal stops the run right away.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from axlora.core.interrupt import RunInterrupted, signal_name

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """Installed for the duration of a run (main thread); ``signum`` is the first signal received."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self.signum: int | None = None
        self.armed = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # only there can Python handle signals
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, _frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C: abort now
            return
        self.signum = signum
        if not self.armed:
            raise RunInterrupted(signum, f"stopped by {signal_name(signum)} before the first step; nothing to save.")
        self.say(f"{signal_name(signum)}: stopping after the current step and saving a checkpoint "
                 "(Ctrl-C again aborts at once, losing the work since the last checkpoint)")

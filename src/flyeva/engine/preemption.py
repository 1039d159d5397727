"""SIGTERM / SIGINT: finish the current optimizer step, checkpoint, stop (docs/reliability.md).

SLURM and Kubernetes send SIGTERM before they kill a job; Ctrl-C sends SIGINT. The first signal
sets a flag the loop reads at the end of each optimizer step (all-reduced, so every rank stops at
the same step); a second signal exits at once. DataLoader workers ignore both, so a signal sent
to the whole process group does not kill them mid-batch; the loop shuts them down itself.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType

HANDLED = (signal.SIGTERM, signal.SIGINT)


class Interrupted(RuntimeError):
    """The run stopped on a signal after writing a checkpoint; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    """Installs the handlers for the duration of a run (main thread only) and remembers the signal."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second signal: no more waiting
            print(f"flyeva: second {signal.Signals(signum).name}, exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(
            f"flyeva: {signal.Signals(signum).name} received; finishing this step and writing a checkpoint "
            "(send it again to exit at once)",
            file=sys.stderr,
            flush=True,
        )

    @property
    def requested(self) -> bool:
        return self.signum is not None


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: workers leave SIGTERM/SIGINT to the main process."""
    for signum in HANDLED:
        signal.signal(signum, signal.SIG_IGN)

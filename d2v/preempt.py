"""Graceful stops: SIGTERM (what Slurm and Kubernetes send before killing a job) and SIGINT (Ctrl-C)
finish the current step, write a checkpoint and end the run with EXIT_STOPPED.

`StopRequest` is installed around the training loop only (start-up and the probe keep Python's default
handling: Ctrl-C there stops at once). The handler only sets a flag; the loop reads it between steps,
so a step is never cut in half. A second Ctrl-C while the final checkpoint is written stops at once
(KeyboardInterrupt; the last complete checkpoint is kept, as after any crash).

Under several ranks each rank has its own flag; the DeepSpeed engine all-reduces it with the step's
finiteness flag, so every rank stops after the same step (a scheduler signals every process of a job,
an interactive Ctrl-C may reach one rank only).

DataLoader workers ignore both signals (`ignore_stop_signals`, their worker_init_fn): a worker that died
of the scheduler's SIGTERM would fail the batch the last step is waiting for.
"""
from __future__ import annotations

import signal
import threading

from d2v.log import get_logger

log = get_logger(__name__)

EXIT_STOPPED = 75  # EX_TEMPFAIL: the run stopped cleanly on a signal after a checkpoint; resume it
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Context manager: while active, SIGTERM/SIGINT set `.signal_name` instead of ending the process."""

    def __init__(self, what: str = "the current step"):
        self.what = what
        self.signal_name: str | None = None
        self._old: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            if signum == signal.SIGINT:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            return
        self.signal_name = name
        log.warning(f"{name} received: finishing {self.what}, then writing a checkpoint and stopping "
                    f"(Ctrl-C again to stop at once)")

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()


def ignore_stop_signals() -> None:
    """For DataLoader workers: leave SIGTERM/SIGINT to the main process (workers exit with it)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)

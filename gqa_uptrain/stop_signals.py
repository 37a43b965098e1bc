"""Stopping a training run by signal (train.py): SIGTERM or SIGINT lets the current step finish,
and the trainer then saves a checkpoint at it and exits (status 0 for SIGTERM, SIGINT_EXIT for
SIGINT); a second SIGINT aborts at once with SIGINT_EXIT, nothing saved since the last checkpoint.

Across processes (jax.distributed) the stop goes through jax's preemption service, the mechanism
orbax's CheckpointManager.reached_preemption reads: jax.distributed.initialize installs its own
SIGTERM handler, a notice from any process reaches every other through the coordination service,
and multihost_utils.reached_preemption_sync_point(step), called at every step, turns True on every
process at the same step (the largest step any process had reported, plus one). So SIGTERM to one
process (a scheduler's preemption notice) stops them all after the same step, with no per-step
collective. A first SIGINT is turned into such a notice (the process raises SIGTERM on itself, to
jax's handler) and still ends that process with SIGINT_EXIT; the others report SIGTERM.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils

SIGINT_EXIT = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C


class StopSignals:
    """SIGTERM and SIGINT ask the run to stop after the current step (module docstring); a second
    SIGINT exits at once. Installed for the whole run, set-up included, so a Ctrl-C while data is
    tokenized or the step compiles never raises KeyboardInterrupt inside jax (seen: a traceback, or
    a segmentation fault when the signal reached the process group while steps were running).

    One process: `received` is the first signal's name, set by the handler. Several: SIGTERM is
    left to jax's preemption service and `stop_after(step)` asks it."""

    def __init__(self):
        self.received: str | None = None  # 'SIGTERM' | 'SIGINT'
        self._previous: dict[int, Any] = {}
        self._multi = False

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == "SIGINT":
            os.write(2, b"error: second SIGINT: aborted at once; nothing saved since the last "
                        b"checkpoint\n")
            os._exit(SIGINT_EXIT)  # no interpreter teardown while XLA threads are running
        first = self.received is None
        self.received = self.received or signal.Signals(signum).name
        if self._multi and first:
            signal.raise_signal(signal.SIGTERM)  # jax's handler: a preemption notice to all

    def __enter__(self) -> "StopSignals":
        # jax's preemption service runs only under jax.distributed with several processes; one
        # process keeps Python's handlers for both signals.
        self._multi = jax.process_count() > 1
        signals = (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT)
        # Handlers can only be installed from the main thread (tests may train in others).
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}
        return self

    def __exit__(self, *exc) -> None:
        if self.received:  # stopping: a Ctrl-C until the process exits still aborts at once
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def stop_after(self, step: int) -> str | None:
        """Whether to stop after `step` (the number of steps done): the signal's name, else None.
        Every process calls it at every step, with the same step numbers (the preemption sync
        point is agreed from them); one process only reads `received`."""
        if self._multi and multihost_utils.reached_preemption_sync_point(step):
            self.received = self.received or "SIGTERM"
            return self.received
        return None if self._multi else self.received

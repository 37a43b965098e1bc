"""Stopping a training run by signal (train.py): SIGTERM or SIGINT lets the current step finish,
and the trainer then saves a checkpoint at it and exits (status 0 for SIGTERM, SIGINT_EXIT for
SIGINT); a second SIGINT aborts at once with SIGINT_EXIT, nothing saved since the last checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGINT_EXIT = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C


class StopSignals:
    """SIGTERM and SIGINT ask the run to stop after the current step (module docstring); a second
    SIGINT exits at once. Installed for the whole run, set-up included, so a Ctrl-C while data is
    tokenized or the step compiles never raises KeyboardInterrupt inside jax (seen: a traceback, or
    a segmentation fault when the signal reached the process group while steps were running)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None  # 'SIGTERM' | 'SIGINT'
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == "SIGINT":
            os.write(2, b"error: second SIGINT: aborted at once; nothing saved since the last "
                        b"checkpoint\n")
            os._exit(SIGINT_EXIT)  # no interpreter teardown while XLA threads are running
        self.received = self.received or signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        # Handlers can only be installed from the main thread (tests may train in others).
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        if self.received:  # stopping: a Ctrl-C until the process exits still aborts at once
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def sync(self) -> None:
        """A signal to any process stops them all (each process sees the first one received)."""
        if jax.process_count() > 1:
            names = ("", "SIGTERM", "SIGINT")
            codes = multihost_utils.process_allgather(np.array(names.index(self.received or "")))
            if not self.received and codes.max() > 0:
                self.received = names[int(codes[codes > 0][0])]

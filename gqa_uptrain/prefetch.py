"""Training batches read ahead on a background thread, so a step does not wait for its data.

The host rows of step s are a pure function of (step, rows) (data.train_window_ids +
data.window_rows), so reading them early changes nothing: a thread builds the rows of steps
s + 1 .. s + depth while the devices run step s, into a queue bounded at `depth` steps, and the
main thread turns them into global arrays (sharding.make_global_batch: the device put stays on
the main thread). Which rows this process builds depends only on the batch's shape and sharding;
they are learned from the first step's own calls, so the thread asks for exactly the row groups
make_global_batch asks for, and nothing here repeats the sharding's arithmetic. A step that is
not the next one queued (a resume, a caller going back) is built directly, and the thread
restarts after it: the batches are bit-identical to depth 0, in any order of steps.

Memory: at most `depth` steps of this process's rows (5 int32 arrays [rows, seq_len]), e.g. 2 x
5 x 32 x 4096 x 4 bytes = 5 MiB for 32 local rows of 4,096 tokens.
"""

from __future__ import annotations

import queue
import threading
import weakref
from typing import Callable

import numpy as np

HostRows = dict[str, np.ndarray]  # {key: [rows, seq_len]} of data.BATCH_KEYS
# How often a blocked producer checks whether its prefetcher is gone (seconds).
_POLL_S = 0.1


def _key(rows: np.ndarray) -> bytes:
    return np.asarray(rows, np.int64).tobytes()


class BatchPrefetcher:
    """batch(step) = build(rows_fn), rows_fn(rows) = host_rows(step, rows), with the host rows of
    the next `depth` steps built ahead on a daemon thread (depth 0: no thread).

    host_rows(step, rows [n] int64 global row ids) -> {key: [n, seq_len]}: pure, thread-safe.
    build(rows_fn) -> the batch (e.g. sharding.make_global_batch of shape, sharding, rows_fn,
    keys): called on the caller's thread only. The thread stops when the prefetcher is garbage
    collected or close() is called, and never runs past stop_step (exclusive; None: no end).
    """

    def __init__(self, host_rows: Callable[[int, np.ndarray], HostRows],
                 build: Callable[[Callable[[np.ndarray], HostRows]], object], depth: int,
                 stop_step: int | None = None):
        if depth < 0:
            raise ValueError(f"data.prefetch={depth} must be >= 0 (0 = off)")
        self._host_rows, self._build, self._depth = host_rows, build, depth
        self._stop_step = stop_step
        self._groups: list[np.ndarray] | None = None  # this process's row groups, once known
        self._producer: _Producer | None = None

    def batch(self, step: int):
        ready = self._take(step)
        asked: list[np.ndarray] = []

        def rows_fn(rows: np.ndarray) -> HostRows:
            rows = np.asarray(rows, np.int64)
            asked.append(rows)
            if ready is not None and _key(rows) in ready:
                return ready[_key(rows)]
            return self._host_rows(step, rows)

        out = self._build(rows_fn)
        if self._depth and (self._producer is None or self._producer.first_step != step + 1):
            if self._groups is None:
                self._groups = asked
            self._restart(step + 1)
        return out

    def _take(self, step: int) -> dict[bytes, HostRows] | None:
        """The rows of `step` from the queue, or None when the queue holds another step next."""
        producer = self._producer
        if producer is None or producer.first_step != step or (
                self._stop_step is not None and step >= self._stop_step):  # none coming
            return None
        item = producer.queue.get()
        producer.first_step += 1
        if isinstance(item, BaseException):
            raise item
        return item

    def _restart(self, start: int) -> None:
        self.close()
        if self._stop_step is not None and start >= self._stop_step:
            return
        self._producer = _Producer(self._host_rows, self._groups, start, self._depth,
                                   self._stop_step)
        weakref.finalize(self, self._producer.stop.set)

    def close(self) -> None:
        """Stops the thread (it may finish the step it is building); later batch() calls build
        their rows directly until the thread restarts."""
        if self._producer is not None:
            self._producer.stop.set()
            self._producer = None


class _Producer:
    """The thread and its queue; holds no reference to its BatchPrefetcher (so that dropping the
    prefetcher stops it)."""

    def __init__(self, host_rows, groups, start: int, depth: int, stop_step: int | None):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.first_step = start  # the step the queue's head holds
        self.thread = threading.Thread(
            target=_produce, args=(host_rows, groups, start, stop_step, self.queue, self.stop),
            name="batch-prefetch", daemon=True)
        self.thread.start()


def _produce(host_rows, groups, start, stop_step, out: queue.Queue, stop: threading.Event):
    step = start
    while not stop.is_set() and (stop_step is None or step < stop_step):
        try:
            item: object = {_key(rows): host_rows(step, rows) for rows in groups}
        except BaseException as e:  # noqa: BLE001 (re-raised on the caller's thread)
            item = e
        while not stop.is_set():
            try:
                out.put(item, timeout=_POLL_S)
                break
            except queue.Full:
                continue
        if isinstance(item, BaseException):
            return
        step += 1

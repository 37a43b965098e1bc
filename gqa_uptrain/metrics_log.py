"""A training run's metrics: WORKDIR/metrics.jsonl (one JSON object a line, each with `step`) and
TensorBoard events in WORKDIR/tensorboard, written by the trainer (train.py) through MetricsLog.

On resume from step s, metrics.jsonl is cut back to s and TensorBoard purges events past s, so no
step appears twice (train.py's module docstring: metrics of a step are written before its
checkpoint). tensorboardX is imported without torch (_summary_writer).
"""

from __future__ import annotations

import json
import os
import sys

import jax

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tensorboard"


def _summary_writer(logdir: str, purge_step: int | None):
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch only to
    recognise its tensors (we log floats), and that import costs seconds at every start."""
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, which it catches
    try:
        from tensorboardX import SummaryWriter  # noqa: PLC0415
    finally:
        if blocked:
            del sys.modules["torch"]
    return SummaryWriter(logdir, purge_step=purge_step)


class MetricsLog:
    """WORKDIR/metrics.jsonl (one JSON object per line, each with `step`) and TensorBoard events.

    On resume from step s, lines with step > s are dropped (they were written after the checkpoint
    the run resumed from) and TensorBoard is told to purge events past s; a fresh start truncates.
    Only process 0 writes.
    """

    def __init__(self, workdir: str, start_step: int, resumed: bool):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, METRICS_FILE)
        self.tb = None
        if not self.enabled:
            return
        kept = []
        if resumed and os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by a kill
                        continue
                    if record["step"] <= start_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)
        self.file = open(self.path, "a")
        self.tb = _summary_writer(os.path.join(workdir, TB_DIR),
                                  start_step + 1 if resumed else None)

    def write(self, step: int, record: dict[str, float]) -> None:
        if not self.enabled or not record:
            return
        self.file.write(json.dumps({"step": step, **record}, sort_keys=True) + "\n")
        self.file.flush()
        for key, value in record.items():
            self.tb.add_scalar(key, value, step)

    def flush(self) -> None:
        if self.enabled:
            self.file.flush()
            self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


def read_value(workdir: str, step: int, key: str) -> float | None:
    """The value of `key` at `step` in WORKDIR/metrics.jsonl (the first such line), or None; lines
    cut by a kill are skipped."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        for line in f:
            try:
                m = json.loads(line)
            except json.JSONDecodeError:
                continue
            if m.get("step") == step and key in m:
                return float(m[key])
    return None

"""A training workdir's checkpoints, WORKDIR/checkpoints/<step>/, through orbax's CheckpointManager.

    with RunCheckpoints(workdir, keep=3, every=100) as manager:
        if manager.should_save(step): manager.save(step, params, meta, opt_state)

Each step directory is a checkpoint of checkpoints.py's format (version 2: written in place, orbax's
commit_success.txt last; checkpoints.save_args builds its items). What the manager adds:
  - async saves: save() returns once the arrays are copied off the devices (orbax's blocking part,
    which also makes the directories); the files are written and committed on orbax's background
    thread while training goes on. Safe with the trainer's donated buffers: the copy is taken
    before save returns (on CPU a zero-copy view, and jax then declines the donation rather than
    overwrite a buffer still referenced). wait() blocks until the last save is committed: the
    trainer calls it before saying a checkpoint was saved and before exiting.
  - the keep policy (orbax's LatestN(keep)): older steps are deleted after a newer one commits,
    so a kill at any moment leaves the newest complete checkpoint in place.
  - the cadence, the same on every host: FixedIntervalPolicy(every) is a function of the step
    number alone; a preemption sync point (stop_signals.py) saves too, on every host at the same
    step.
  - clear_incomplete: a killed save leaves its step directory without the commit mark; process 0
    deletes such directories (and version-1 temporaries) when a run starts, after every process
    has listed the complete ones.

Version-1 checkpoints in a resumed workdir (no commit mark) are read like any other (list_steps),
but orbax does not see them, so the keep policy leaves them in place.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from gqa_uptrain import checkpoints
from gqa_uptrain.formats import CHECKPOINTS_DIR


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(f"gqa_uptrain.run_checkpoints.{name}")


def clear_incomplete(workdir: str) -> list[str]:
    """Deletes (on process 0) what killed saves left in WORKDIR/checkpoints: version-2 step
    directories without the commit mark (checkpoints.incomplete_steps) and version 1's '.<step>.tmp'
    / '.<step>.old' folders. Call on every process: a barrier first (every process has read what
    it needs) and after. Returns the names deleted."""
    root = os.path.join(workdir, CHECKPOINTS_DIR)
    _barrier("clear:listed")
    removed = []
    if jax.process_index() == 0 and os.path.isdir(root):
        removed = [str(s) for s in checkpoints.incomplete_steps(workdir)]
        removed += [n for n in os.listdir(root)
                    if n.startswith(".") and n.endswith((".tmp", ".old"))]
        for name in removed:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    _barrier("clear:done")
    return removed


class RunCheckpoints:
    """WORKDIR/checkpoints/<step>/ through orbax's CheckpointManager (module docstring).

    keep: the newest checkpoints kept (None or 0: all). every: the step interval of should_save
    (0: never by interval; the trainer saves the last step and stops itself).
    """

    def __init__(self, workdir: str, *, keep: int | None = None, every: int = 0):
        root = os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR)
        save_policies = [policies.PreemptionCheckpointingPolicy()]
        if every > 0:
            save_policies.append(policies.FixedIntervalPolicy(every))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy(save_policies),
            # None: orbax's default, every checkpoint kept.
            preservation_policy=policies.LatestN(keep) if keep else None,
            enable_async_checkpointing=True, async_options=checkpoints.ASYNC_OPTIONS,
            atomicity_options=checkpoints.ATOMICITY,
            # Not orbax's own clean-up: under COMMIT_FILE it would take version-1 checkpoints
            # (no commit mark) for unfinished ones and delete them; clear_incomplete does it.
            cleanup_tmp_directories=False,
            save_root_metadata=False, create=True)
        self.directory = root
        self._manager = ocp.CheckpointManager(root, options=options,
                                              item_handlers=checkpoints.item_handlers())

    def should_save(self, step: int) -> bool:
        """Whether `step` is one the cadence saves (the same answer on every host)."""
        return self._manager.should_save(step)

    def save(self, step: int, params: dict[str, Any], meta: checkpoints.Meta,
             opt_state: Any = None, *, tokenizer_file: str | None = None) -> None:
        """Starts saving checkpoint `step` (meta.step must equal it; see checkpoints.save_args)
        and returns once the arrays are copied; wait() for its commit. Every process calls it."""
        if meta.step != step:
            raise ValueError(f"meta.step={meta.step} != step={step}")
        args = checkpoints.save_args(params, meta, opt_state, tokenizer_file=tokenizer_file)
        self._manager.save(step, args=args, force=True)

    def wait(self) -> None:
        """Blocks until every save started is committed (and old steps pruned)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()  # waits for the save in flight

    def __enter__(self) -> "RunCheckpoints":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

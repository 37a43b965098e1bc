"""A training run's config on disk: what is saved beside the checkpoints, what may change on resume,
the run's length, and the small multi-host helpers the trainer writes those files with.

WORKDIR/train_config.json holds the config a run was started (or last resumed) with, plus the
learning-rate schedules' version (SCHEDULE_VERSION_KEY: optim.SCHEDULE_VERSION); run.json the
resolved run (number of steps, source, tokenizer, model config); config_changes.jsonl one line per
config change a resume accepted. The rule for those changes is train.py's module docstring
("Resume with a changed config").
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from gqa_uptrain import optim

CONFIG_FILE = "train_config.json"  # not config.json: that name marks a Hugging Face folder
RUN_FILE = "run.json"
CHANGES_FILE = "config_changes.jsonl"  # accepted config changes on resume, one JSON line each
# Config keys (and sub-configs) that may change between a run and its resume: they change the
# cadence or the output of a run, or where it runs, never what the params become.
RESUMABLE_CHANGES = ("mesh", "progress_bar", "log_every", "eval_every", "checkpoint_every",
                     "keep_checkpoints", "data.prefetch")
# Keys that set the run's length: accepted under the schedule rule (module docstring).
LENGTH_KEYS = ("num_steps", "alpha")
# Saved beside the config keys (not a config key: nothing can set it), so that a run saved under
# another schedule version is refused on resume rather than continued with different rates.
SCHEDULE_VERSION_KEY = "schedule_version"


def _resumable(key: str) -> bool:
    """A key (dotted) that RESUMABLE_CHANGES or LENGTH_KEYS name, itself or a parent of it."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in RESUMABLE_CHANGES + LENGTH_KEYS
               for i in range(1, len(parts) + 1))


class TrainError(ValueError):
    """A run that cannot start or continue as configured."""


# ----------------------------------------------------------------------------- multi-host helpers


def is_main() -> bool:
    return jax.process_index() == 0


def sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def log(msg: str) -> None:
    if is_main():
        tqdm.write(msg, file=sys.stdout)  # keeps a progress bar intact
        sys.stdout.flush()


# ----------------------------------------------------------------------------- the saved config


def config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as saved (train_config.json, a checkpoint's provenance): its keys, and the
    learning-rate schedules' version under SCHEDULE_VERSION_KEY."""
    out = json.loads(config.to_json_best_effort(sort_keys=True))
    out[SCHEDULE_VERSION_KEY] = optim.SCHEDULE_VERSION
    return out


def check_schedule_version(saved: dict[str, Any], workdir: str) -> None:
    """TrainError unless the saved config's schedule version is this trainer's: the same config
    under another version would give its remaining (and past) steps other learning rates."""
    version = saved.get(SCHEDULE_VERSION_KEY)
    if version != optim.SCHEDULE_VERSION:
        was = ("none recorded, i.e. version 1, whose warmup started at lr 0" if version is None
               else f"version {version}")
        raise TrainError(f"{workdir} was trained under learning-rate schedule {was}; this trainer "
                         f"has version {optim.SCHEDULE_VERSION} (warmup from peak/warmup_steps at "
                         "step 0), so resuming would change its learning rates; use a new "
                         "--workdir")


def flat_items(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_items(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved, now)} of the keys whose values differ."""
    a, b = flat_items(saved), flat_items(now)
    return {k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)}


def make_schedule(config, num_steps: int):
    o = config.optimizer
    return optim.make_schedule(o.schedule, peak_lr=o.learning_rate,
                               warmup_steps=min(o.warmup_steps, num_steps),
                               total_steps=num_steps, decay_fraction=o.decay_fraction,
                               min_lr_ratio=o.min_lr_ratio)


def num_steps_of(config, source_step: int | None, where: str) -> int:
    """The run's length from config.num_steps (> 0), or alpha x source_step when it is -1."""
    if config.num_steps > 0:
        return config.num_steps
    if config.num_steps != -1:
        raise TrainError(f"config.num_steps={config.num_steps} must be > 0 or -1")
    if source_step is None:
        raise TrainError(f"config.num_steps=-1 means alpha x the source run's steps, but {where} "
                         "records no steps; set config.num_steps")
    if config.alpha <= 0:
        raise TrainError(f"config.num_steps=-1 needs config.alpha > 0, got {config.alpha}")
    return max(1, round(config.alpha * source_step))


def check_resume_config(config, workdir: str, run: dict[str, Any], step: int) -> dict[str, Any]:
    """Compares the command's config with the run's saved one when resuming at `step` (module
    docstring: what may change). Returns the run info, with num_steps updated when it changed."""
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path) as f:
        saved = json.load(f)
    check_schedule_version(saved, workdir)
    current = config_dict(config)
    diff = config_diff(saved, current)
    refused = {k: v for k, v in diff.items()
               if not _resumable(k)}
    if refused:
        raise TrainError(f"{workdir} holds a run with a different config (key: (saved, now)) "
                         f"{refused}; only {', '.join(RESUMABLE_CHANGES)} may change on resume "
                         f"(num_steps under the schedule rule); use a new --workdir or the saved "
                         "config")
    if not diff:
        return run
    new_steps = num_steps_of(config, run["source_step"], "the init checkpoint")
    if new_steps != run["num_steps"]:
        if new_steps < step:
            raise TrainError(f"num_steps {run['num_steps']} -> {new_steps}: the run is already at "
                             f"step {step}")
        taken = jnp.arange(step)
        before = np.asarray(make_schedule(config, run["num_steps"])(taken))
        after = np.asarray(make_schedule(config, new_steps)(taken))
        if not np.array_equal(before, after):
            changed = int(np.flatnonzero(before != after)[0])
            raise TrainError(
                f"num_steps {run['num_steps']} -> {new_steps} changes the learning rate of steps "
                f"already taken (the {config.optimizer.schedule} schedule at step {changed}: "
                f"{before[changed]:.6g} -> {after[changed]:.6g}), so the run would be neither "
                f"the old one nor the new one; use a new --workdir (or a 'constant' or 'wsd' "
                "schedule, which can be extended before its decay starts)")
        run = dict(run, num_steps=new_steps)
    if is_main():
        record = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "changes": {k: list(v) for k, v in diff.items()}}
        with open(os.path.join(workdir, CHANGES_FILE), "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        write_json_atomic(path, current)
        write_json_atomic(os.path.join(workdir, RUN_FILE), run)
    return run

"""Faults in a real subprocess: SIGKILL after a checkpoint, SIGKILL mid-save (an async save whose
step directory exists without orbax's commit mark), SIGKILL mid-step and SIGTERM, each followed by
rerunning the same command, end bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import numpy as np
import pytest

import _helpers_train as h
from gqa_uptrain import checkpoints

NUM_STEPS = 12
# Saving every step makes most of the run's wall time saves, so a kill lands mid-save often.
# The model and optimizer are test_train's `pretrained` run's: the programs compile once.
FLAGS = h.cli_flags(num_steps=NUM_STEPS, checkpoint_every=1, keep_checkpoints=2, eval_every=4,
                    log_every=1, **{"optimizer.learning_rate": 1e-2})


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    yield from h.compilation_cache(tmp_path_factory)


def _start(workdir: str) -> subprocess.Popen:
    return subprocess.Popen(h.train_cmd(workdir, FLAGS), cwd=h.REPO, env=h.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen, condition, timeout: float = 120, poll: float = 0.002):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    proc.kill()
    raise AssertionError("timed out waiting for the training subprocess")


def _lines(workdir: str) -> int:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return sum(1 for line in f if line.endswith("\n"))


def _kill(proc: subprocess.Popen, sig=signal.SIGKILL) -> subprocess.CompletedProcess:
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _params_and_opt(workdir: str):
    path = checkpoints.latest_checkpoint(workdir)
    params, meta, _ = checkpoints.restore(path)
    import orbax.checkpoint as ocp

    opt = ocp.StandardCheckpointer().restore(os.path.join(path, "opt_state"))
    return meta.step, {k: np.asarray(v) for k, v in params.items()}, {
        k: np.asarray(v) for k, v in opt.items()}


def test_kill_and_resume_is_bit_identical(tmp_path):
    reference = str(tmp_path / "reference")
    h.run(h.train_cmd(reference, FLAGS))
    workdir = str(tmp_path / "interrupted")
    killed_at = []

    # 1. SIGKILL right after the checkpoint of step 3 is complete.
    proc = _start(workdir)
    assert _wait_for(proc, lambda: max(checkpoints.list_steps(workdir), default=0) >= 3)
    _kill(proc)
    killed_at.append(("after checkpoint", max(checkpoints.list_steps(workdir))))

    # 2. SIGKILL while a checkpoint is being written (its step directory exists, uncommitted).
    # If the save committed between seeing the dir and the kill, try again on the next one.
    for _ in range(5):
        before = max(checkpoints.list_steps(workdir))
        proc = _start(workdir)
        ok = _wait_for(proc, lambda: any(s > before for s in checkpoints.incomplete_steps(workdir)))
        assert ok, proc.communicate()
        _kill(proc)
        pending = checkpoints.incomplete_steps(workdir)
        complete = checkpoints.list_steps(workdir)
        if any(p > max(complete) for p in pending):  # interrupted mid-save
            # The half-written checkpoint is never taken as the latest.
            assert checkpoints.latest_checkpoint(workdir) == checkpoints.step_dir(
                workdir, max(complete))
            killed_at.append(("mid-save", max(pending)))
            break
    else:
        pytest.fail("could not interrupt a save in 5 tries")

    # 3. SIGKILL at an arbitrary moment: as soon as one more training step has been logged.
    n_lines = _lines(workdir)
    proc = _start(workdir)
    assert _wait_for(proc, lambda: _lines(workdir) > n_lines + 1)
    _kill(proc)
    killed_at.append(("mid-run", _lines(workdir)))

    # 4. SIGTERM: saves the current step and exits cleanly.
    before = max(checkpoints.list_steps(workdir))
    proc = _start(workdir)
    assert _wait_for(proc, lambda: max(checkpoints.list_steps(workdir)) > before)
    out = _kill(proc, signal.SIGTERM)
    if max(checkpoints.list_steps(workdir)) < NUM_STEPS:  # it had not already finished
        assert out.returncode == 0, out.stderr
        assert "SIGTERM: saved a checkpoint at step" in out.stdout
        killed_at.append(("sigterm", max(checkpoints.list_steps(workdir))))

    # 5. The same command again finishes the run.
    h.run(h.train_cmd(workdir, FLAGS))
    step, params, opt = _params_and_opt(workdir)
    ref_step, ref_params, ref_opt = _params_and_opt(reference)
    assert step == ref_step == NUM_STEPS, killed_at
    for name in ref_params:
        assert np.array_equal(params[name], ref_params[name]), (name, killed_at)
    assert opt.keys() == ref_opt.keys()
    for name in ref_opt:
        assert np.array_equal(opt[name], ref_opt[name]), (name, killed_at)

    records, ref_records = h.metrics(workdir), h.metrics(reference)
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), "a step appears twice in metrics.jsonl"
    assert h.deterministic(records) == h.deterministic(ref_records), killed_at
    assert not checkpoints.incomplete_steps(workdir)
    assert checkpoints.list_steps(workdir) == [NUM_STEPS - 1, NUM_STEPS]  # keep_checkpoints=2

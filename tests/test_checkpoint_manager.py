"""Training checkpoints through orbax's CheckpointManager across hosts (run_checkpoints.py,
stop_signals.py): 2 processes x 4 simulated devices joined by jax.distributed on localhost, fsdp=8
across them. SIGTERM to one process stops both at the same step (jax's preemption sync point), each
saves its shards and exits 0; SIGKILL of both mid-run and a rerun end bit-identical to an
uninterrupted 2 x 4 run, which is within 1e-4 of 1 process x 8 devices; a checkpoint saved on
1 x 8 resumes on 2 x 4 and continues as 1 x 8 did. The single-process signal behaviour is tested
in tests/test_train_cli.py and tests/test_resume.py."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

import _helpers_train as h
from gqa_uptrain import checkpoints

NUM_STEPS = 40  # ~10 steps/s here: a preemption notice (~1 s to propagate) lands mid-run
FLAGS = h.cli_flags(num_steps=NUM_STEPS, batch_size=8, checkpoint_every=5, keep_checkpoints=3,
                    eval_every=0, final_eval_batches=0, log_every=1,
                    **{"mesh.data": 1, "mesh.fsdp": 8, "data.tokenizer": "byte"})
TIMEOUT = 240


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    yield from h.compilation_cache(tmp_path_factory)


def _start(workdir: str, processes: int) -> list[subprocess.Popen]:
    if processes == 1:
        cmds = [h.train_cmd(workdir, FLAGS)]
    else:
        port = h.free_port()
        cmds = [h.train_cmd(workdir, FLAGS, [f"--coordinator_address=localhost:{port}",
                                             f"--num_processes={processes}", f"--process_id={i}",
                                             "--distributed_timeout=60"])
                for i in range(processes)]
    return [subprocess.Popen(c, cwd=h.REPO, env=h.env(8 // processes), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for c in cmds]


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


def _run(workdir: str, processes: int) -> str:
    results = _finish(_start(workdir, processes))
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    return results[0][1]


def _lines(workdir: str) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.endswith("\n"))


def _wait_for_lines(procs, workdir: str, n: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while _lines(workdir) < n:
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            errors = [p.communicate()[1][-2000:] for p in procs]
            raise AssertionError(f"no {n} metrics lines: {errors}")
        time.sleep(0.01)


def _state(workdir: str):
    """(step, params, flat optimizer state) of the latest checkpoint, as numpy (on this
    process's one device, whatever mesh wrote it)."""
    path = checkpoints.latest_checkpoint(workdir)
    params, meta, _ = checkpoints.restore(path)
    opt_dir = os.path.join(path, "opt_state")
    stored = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in
              checkpoints._stored_shapes(opt_dir).items()}
    opt = checkpoints._restore_flat(opt_dir, stored, "optimizer state", None)
    return meta.step, {k: np.asarray(v) for k, v in params.items()}, {
        k: np.asarray(v) for k, v in opt.items()}


def _losses(workdir: str) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in h.metrics(workdir) if "train/loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The same run on 2 x 4 and on 1 x 8, never interrupted (1 x 8's final state read before
    test_resume_on_another_mesh cuts its workdir back)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    two, one = str(root / "two"), str(root / "one")
    _run(two, 2)
    _run(one, 1)
    return {"two": two, "one": one, "one_state": _state(one), "one_losses": _losses(one)}


def test_preempted_and_killed_two_process_run_resumes_bit_identical(tmp_path, uninterrupted):
    ref = uninterrupted["two"]
    ref_step, ref_params, ref_opt = _state(ref)
    # 2 x 4 trains like 1 x 8 (a different reduction order: not bit for bit).
    _, one_params, _ = uninterrupted["one_state"]
    for name in one_params:
        np.testing.assert_allclose(ref_params[name], one_params[name], rtol=1e-4, atol=1e-6,
                                   err_msg=name)
    one_losses, ref_losses = uninterrupted["one_losses"], _losses(ref)
    np.testing.assert_allclose([ref_losses[s] for s in sorted(one_losses)],
                               [one_losses[s] for s in sorted(one_losses)], rtol=1e-4)

    workdir = str(tmp_path / "interrupted")
    # 1. SIGTERM to process 1 only: a preemption notice; both stop after the same step, save it
    # and exit 0.
    procs = _start(workdir, 2)
    _wait_for_lines(procs, workdir, 3)
    procs[1].send_signal(signal.SIGTERM)
    results = _finish(procs)
    assert [rc for rc, _, _ in results] == [0, 0], [err[-2000:] for _, _, err in results]
    [line] = [x for x in results[0][1].splitlines() if x.startswith("SIGTERM: saved")]
    stopped = int(line.split(" at step ")[1].split(" ")[0])
    assert 3 <= stopped < NUM_STEPS, line
    assert line == (f"SIGTERM: saved a checkpoint at step {stopped} of {NUM_STEPS}; rerun the same "
                    "command to resume")
    assert max(checkpoints.list_steps(workdir)) == stopped
    assert not checkpoints.incomplete_steps(workdir)
    assert max(r["step"] for r in h.metrics(workdir)) == stopped

    # 2. SIGKILL of both processes mid-run (a host lost), a few steps after the resume.
    procs = _start(workdir, 2)
    _wait_for_lines(procs, workdir, stopped + 3)
    for p in procs:
        p.kill()
    _finish(procs)
    killed_at = _lines(workdir)
    assert killed_at < NUM_STEPS, "the run ended before it was killed"

    # 3. The same command again finishes the run, bit for bit the uninterrupted one.
    out = _run(workdir, 2)
    assert "resumed from" in out
    step, params, opt = _state(workdir)
    assert step == ref_step == NUM_STEPS
    for name in ref_params:
        assert np.array_equal(params[name], ref_params[name]), (name, stopped, killed_at)
    assert opt.keys() == ref_opt.keys()
    for name in ref_opt:
        assert np.array_equal(opt[name], ref_opt[name]), (name, stopped, killed_at)
    records = h.metrics(workdir)
    assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
    assert h.deterministic(records) == h.deterministic(h.metrics(ref))
    # orbax's keep policy (keep_checkpoints=3), every one committed.
    assert checkpoints.list_steps(workdir) == [30, 35, 40]
    assert not checkpoints.incomplete_steps(workdir)


def test_resume_on_another_mesh_continues_as_the_first_did(uninterrupted):
    """Saved on 1 process x 8 devices, resumed on 2 x 4: each process restores its shards of the
    1 x 8 checkpoint, and the last steps match 1 x 8's own."""
    one = uninterrupted["one"]
    for step in (35, 40):  # back to the checkpoint of step 30, written by the 1 x 8 run
        shutil.rmtree(checkpoints.step_dir(one, step))
    assert checkpoints.list_steps(one) == [30]
    out = _run(one, 2)
    assert f"resumed from {checkpoints.step_dir(one, 30)} (step 30 of {NUM_STEPS})" in out
    step, params, opt = _state(one)
    ref_step, ref_params, ref_opt = uninterrupted["one_state"]
    assert step == ref_step == NUM_STEPS
    for name in ref_params:
        np.testing.assert_allclose(params[name], ref_params[name], rtol=1e-4, atol=1e-6,
                                   err_msg=name)
    for name in ref_opt:
        np.testing.assert_allclose(opt[name], ref_opt[name], rtol=1e-4, atol=1e-7, err_msg=name)
    losses, ref_losses = _losses(one), uninterrupted["one_losses"]
    assert sorted(losses) == list(range(1, NUM_STEPS + 1))
    np.testing.assert_allclose([losses[s] for s in range(31, NUM_STEPS + 1)],
                               [ref_losses[s] for s in range(31, NUM_STEPS + 1)], rtol=1e-4)

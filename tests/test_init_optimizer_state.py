"""config.init_optimizer_state: a run continuing this project's checkpoint of the same model starts
from its Adam moments and count, and reads its own schedule from step 0; the refusals."""

from __future__ import annotations

import os
import re

import numpy as np
import orbax.checkpoint as ocp
import pytest

import _helpers_train as h
from gqa_uptrain import checkpoints, optim, train
from gqa_uptrain.run_config import TrainError

PRE_STEPS = 3
PEAK = 1e-2
B1, B2, EPS, WD = 0.9, 0.95, 1e-8, 0.1  # configs' optimizer_block


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    yield from h.compilation_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("init_opt")
    workdir = str(root / "pre")
    train.train_and_evaluate(h.config(num_steps=PRE_STEPS, checkpoint_every=PRE_STEPS,
                                      eval_every=0, final_eval_batches=0,
                                      **{"optimizer.learning_rate": PEAK,
                                         "data.cache_dir": str(root / "data")}), workdir)
    return workdir, str(root / "data")


def _continue_config(source: str, data_cache: str, **overrides):
    # Cosine with a 2-step warmup over 2 steps: step 0's rate is PEAK / 2, while the schedule read
    # at the restored count (step PRE_STEPS, past its end) would give the floor 0.1 PEAK.
    return h.config(h.UPTRAIN, "smoke", **{
                    "init_checkpoint": source, "num_steps": 2, "checkpoint_every": 1,
                    "keep_checkpoints": 2, "eval_every": 0, "final_eval_batches": 0,
                    "data.seq_len": 32, "batch_size": 4, "data.cache_dir": data_cache,
                       "progress_bar": False, "optimizer.learning_rate": PEAK,
                       "optimizer.schedule": "cosine", "optimizer.warmup_steps": 2,
                       **overrides})


def _state(checkpoint: str):
    """(params, {'mu' | 'nu': {name: array}, 'counts': [adam count, schedule count]})."""
    params, _, _ = checkpoints.restore(checkpoint)
    flat = ocp.StandardCheckpointer().restore(os.path.join(checkpoint, "opt_state"))
    moments = {"mu": {}, "nu": {}}
    counts = []
    for key, value in flat.items():  # checkpoints.flatten_tree's key paths: "[1][0].mu['embed']"
        found = re.search(r"\.(mu|nu)\['(.+)'\]$", key)
        if found:
            moments[found[1]][found[2]] = np.asarray(value)
        elif key.endswith(".count"):
            counts.append(int(value))
    assert set(moments["mu"]) == set(params) == set(moments["nu"]), sorted(flat)[:8]
    return {k: np.asarray(v) for k, v in params.items()}, moments, sorted(counts)


def test_the_continued_run_restores_the_optimizer_state_and_starts_its_own_schedule(
        pretrained, tmp_path):
    source, data_cache = pretrained
    cont, fresh = str(tmp_path / "continued"), str(tmp_path / "fresh")
    train.train_and_evaluate(_continue_config(source, data_cache, init_optimizer_state=True),
                             cont)
    # The same run with a fresh optimizer; distill.weight = 0, so its teacher (a path that does
    # not exist) is never read: no teacher is built.
    train.train_and_evaluate(_continue_config(source, data_cache, **{
        "distill.teacher": str(tmp_path / "no_such_teacher")}), fresh)

    p0, m0, counts0 = _state(checkpoints.step_dir(source, PRE_STEPS))
    p1, m1, counts1 = _state(checkpoints.step_dir(cont, 1))
    _, f1, fresh_counts = _state(checkpoints.step_dir(fresh, 1))
    assert counts0 == [PRE_STEPS, PRE_STEPS]
    # Adam's count continues (bias correction of P-step moments); the schedule's restarts at 0.
    assert counts1 == [1, PRE_STEPS + 1] and fresh_counts == [1, 1]
    # The restored moments: the first update adds the same clipped gradient g to both runs'
    # moments (same params, same batch), so mu_continued = b1 mu_checkpoint + mu_fresh (mu_fresh
    # = (1 - b1) g), and nu likewise with b2.
    for name in p0:
        for m, b in (("mu", B1), ("nu", B2)):
            want = b * m0[m][name] + f1[m][name]  # float32 rounding: a whole-array relative error
            err = np.linalg.norm(m1[m][name] - want) / np.linalg.norm(want)
            assert err < 1e-6, (m, name, err)
            # Not restoring them would be an error of about this, far above the bound.
            assert np.linalg.norm(b * m0[m][name]) > 0.1 * np.linalg.norm(want), (m, name)

    # The rate of the first update: AdamW's step from the moments at count P + 1.
    schedule = optim.make_schedule("cosine", peak_lr=PEAK, warmup_steps=2, total_steps=2,
                                   decay_fraction=0.2, min_lr_ratio=0.1)
    intended, at_restored_count = float(schedule(0)), float(schedule(PRE_STEPS))
    assert intended == pytest.approx(PEAK / 2) and at_restored_count == pytest.approx(PEAK * 0.1)
    t = PRE_STEPS + 1

    def direction(name):  # the update divided by -lr
        decay = WD if p0[name].ndim >= 2 else 0.0  # optim.decay_mask: matrices only
        mhat = m1["mu"][name] / (1 - B1 ** t)
        vhat = m1["nu"][name] / (1 - B2 ** t)
        return mhat / (np.sqrt(vhat) + EPS) + decay * p0[name]

    def worst(lr):
        return max(float(np.abs(p1[n] - (p0[n] - lr * direction(n))).max()
                         / (lr * np.abs(direction(n)).max())) for n in p0)

    assert worst(intended) < 1e-4, worst(intended)
    assert worst(at_restored_count) > 0.5  # the check tells the two rates apart


def test_refusals_name_the_problem_and_write_nothing(pretrained, tmp_path):
    source, data_cache = pretrained
    cases = {
        "converts it": dict(init_checkpoint=source, num_kv_heads=2),
        "holds no optimizer state": dict(init_checkpoint=str(tmp_path / "params_only")),
    }
    params, meta, _ = checkpoints.restore(checkpoints.step_dir(source, PRE_STEPS))
    checkpoints.save(str(tmp_path / "params_only"), params, meta)  # no opt_state/
    configs = {message: _continue_config(source, data_cache, init_optimizer_state=True,
                                         **overrides) for message, overrides in cases.items()}
    configs["which is empty"] = h.config(init_optimizer_state=True)  # scratch: nothing to restore
    for message, config in configs.items():
        workdir = tmp_path / f"w_{len(message)}"
        with pytest.raises(TrainError, match=message) as e:
            train.train_and_evaluate(config, str(workdir))
        assert "\n" not in str(e.value)
        assert not workdir.exists(), message

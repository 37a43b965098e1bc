"""Distillation (config.distill, losses.chunked_distill, train_step.Distill): the chunked KL against
the plain formula; weight 0 is the plain step bit for bit, with no teacher; a teacher equal to the
student gives a zero KL and KL gradient; a distilled run killed and resumed ends bit-identical to an
uninterrupted one; the refusals."""

from __future__ import annotations

import functools
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _helpers_train as h
from gqa_uptrain import checkpoints, losses, optim, sharding, train, train_step
from gqa_uptrain.model import ModelConfig, Transformer, abstract_params, get_params
from gqa_uptrain.run_config import TrainError


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    yield from h.compilation_cache(tmp_path_factory)


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _inputs(batch=3, seq=37, d=24, d_teacher=16, vocab=211, seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    hidden = jax.random.normal(k[0], (batch, seq, d), jnp.float32)
    head = jax.random.normal(k[1], (d, vocab), jnp.float32) * 0.5
    t_hidden = jax.random.normal(k[2], (batch, seq, d_teacher), jnp.float32)
    t_head = jax.random.normal(k[3], (d_teacher, vocab), jnp.float32) * 0.5
    targets = jax.random.randint(k[4], (batch, seq), 0, vocab)
    mask = (jax.random.uniform(k[5], (batch, seq)) > 0.2).astype(jnp.float32)
    return hidden, head, t_hidden, t_head, targets, mask


@pytest.mark.parametrize("chunk_size", [0, 5])  # 0: all logits at once; 5 pads the last chunk
def test_chunked_distill_equals_the_plain_formula_and_its_gradient(chunk_size):
    hidden, head, t_hidden, t_head, targets, mask = _inputs()
    temperature = 2.0

    def plain(h_, w):  # the formula written out, every logit at once
        s, t = h_ @ w, t_hidden @ t_head
        nll = -jnp.take_along_axis(jax.nn.log_softmax(s), targets[..., None], -1)[..., 0]
        p_t = jax.nn.softmax(t / temperature)
        kl = jnp.sum(p_t * (jnp.log(p_t) - jax.nn.log_softmax(s / temperature)), -1)
        return jnp.sum(nll * mask), jnp.sum(kl * mask)

    def got(h_, w):
        return losses.chunked_distill(h_, w, t_hidden, t_head, targets, mask, temperature,
                                      chunk_size)

    want_nll, want_kl = plain(hidden, head)
    nll, kl = got(hidden, head)
    np.testing.assert_allclose(nll, want_nll, rtol=1e-6)  # float32 tolerances
    np.testing.assert_allclose(kl, want_kl, rtol=1e-5)
    np.testing.assert_allclose(nll, losses.chunked_nll(hidden, head, targets, mask, chunk_size),
                               rtol=1e-6)
    assert float(kl) > 1.0  # two unrelated models: a KL worth comparing
    for part in (0, 1):
        g = jax.grad(lambda a, b: got(a, b)[part], argnums=(0, 1))(hidden, head)
        w = jax.grad(lambda a, b: plain(a, b)[part], argnums=(0, 1))(hidden, head)
        assert rel_err(g[0], w[0]) < 1e-5 and rel_err(g[1], w[1]) < 1e-5, part


def test_a_teacher_equal_to_the_student_gives_zero_kl_and_zero_kl_gradient():
    hidden, head, _, _, targets, mask = _inputs()
    for chunk_size in (0, 8):
        def kl(h_, w):  # the teacher is the same arrays, held constant (as distill_sums does)
            t_h, t_w = jax.lax.stop_gradient((h_, w))
            return losses.chunked_distill(h_, w, t_h, t_w, targets, mask, 2.0, chunk_size)[1]

        value, (gh, gw) = jax.value_and_grad(kl, argnums=(0, 1))(hidden, head)
        nh, nw = jax.grad(lambda a, b: losses.chunked_nll(a, b, targets, mask, chunk_size),
                          argnums=(0, 1))(hidden, head)
        assert float(value) == 0.0, chunk_size  # log p_t - log p_s is exactly 0
        # Its gradient (softmax(s / T) sum(p_t) - p_t) / T is 0 up to sum(p_t)'s rounding of 1.
        assert np.linalg.norm(gh) < 1e-6 * np.linalg.norm(nh), chunk_size
        assert np.linalg.norm(gw) < 1e-6 * np.linalg.norm(nw), chunk_size


CONFIG = ModelConfig(vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     mlp_dim=64)
OPTIMIZER = {"b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "clip_norm": 1.0}


@functools.lru_cache(maxsize=None)  # each step compiles once for the module
def _setup(distill=None):
    import ml_collections  # noqa: PLC0415

    schedule = optim.make_schedule("constant", peak_lr=1e-2, warmup_steps=0, total_steps=4,
                                   decay_fraction=0.0, min_lr_ratio=1.0)
    return train_step.build(CONFIG, sharding.make_mesh(-1, 1, 1), schedule,
                            ml_collections.ConfigDict(OPTIMIZER), implementation="auto",
                            remat="none", scan_layers=True, loss_chunk_size=8, distill=distill)


def _batch():
    tokens = jax.random.randint(jax.random.key(1), (2, 1, 3, 20), 0, CONFIG.vocab_size)
    ones = jnp.ones((1, 3, 20), jnp.int32)
    return {"inputs": tokens[0], "targets": tokens[1], "segment_ids": ones,
            "positions": jnp.broadcast_to(jnp.arange(20), (1, 3, 20)), "loss_mask": ones}


def _steps(setup, num_steps=2, teacher=()):
    params = setup.scratch_params(0)
    opt_state = setup.init_opt_state(params)
    for _ in range(num_steps):
        params, opt_state, metrics = setup.step(params, opt_state, _batch(), *teacher)
    return params, opt_state, {k: float(v) for k, v in metrics.items()}


def test_weight_0_is_the_plain_step_bit_for_bit_and_builds_no_teacher():
    plain = _steps(_setup())
    setup = _setup(train_step.Distill(teacher_config=CONFIG.replace(num_kv_heads=4), weight=0.0,
                                      temperature=2.0))
    assert setup.distill is None and setup.teacher_sh is None
    assert len(setup.abstract_args(1, 3, 20)) == 3  # the plain step's arguments
    zero = _steps(setup)
    assert zero[2] == plain[2]
    for a, b in zip(jax.tree.leaves(zero[:2]), jax.tree.leaves(plain[:2])):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_teacher_equal_to_the_student_leaves_only_the_weighted_cross_entropy():
    weight = 0.25
    setup = _setup(train_step.Distill(teacher_config=CONFIG, weight=weight, temperature=2.0))
    teacher = (jax.device_put(setup.scratch_params(0), setup.teacher_sh),)  # = step 0's student
    *_, same = _steps(setup, 1, teacher)
    *_, plain = _steps(_setup(), 1)
    # KL 0 and no KL gradient: loss and gradient are (1 - weight) x the cross-entropy's.
    assert abs(same["kl"]) < 1e-6 * same["ce"], same
    np.testing.assert_allclose(same["ce"], plain["loss"], rtol=1e-6)
    np.testing.assert_allclose(same["loss"], (1 - weight) * plain["loss"], rtol=1e-6)
    np.testing.assert_allclose(same["grad_norm"], (1 - weight) * plain["grad_norm"], rtol=1e-5)
    # Another teacher (other weights) is far from the student: the check can fail.
    other = get_params(Transformer(CONFIG, rngs=nnx.Rngs(5), scan_layers=True))
    *_, far = _steps(setup, 1, (jax.device_put(other, setup.teacher_sh),))
    assert far["kl"] > 0.01 and abs(far["loss"] - (1 - weight) * far["ce"]
                                    - weight * 4.0 * far["kl"]) < 1e-5 * far["loss"]


# ----------------------------------------------------------------------------- the trainer

NUM_STEPS = 6


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    workdir = str(root / "pre")
    train.train_and_evaluate(h.config(num_steps=4, checkpoint_every=4, eval_every=0,
                                      final_eval_batches=0,
                                      **{"optimizer.learning_rate": 1e-2,
                                         "data.cache_dir": str(root / "data")}), workdir)
    return workdir, str(root / "data")


def _flags(source, data_cache, **overrides):
    return h.cli_flags(h.UPTRAIN, "smoke,num_kv_heads=2", **{
        "init_checkpoint": source, "num_steps": NUM_STEPS, "checkpoint_every": 2,
        "keep_checkpoints": 1, "eval_every": 0, "final_eval_batches": 1, "log_every": 1,
        "data.seq_len": 32, "batch_size": 4, "data.cache_dir": data_cache,
        "progress_bar": False, "distill.weight": 0.5, "distill.temperature": 2.0, **overrides})


def test_a_distilled_run_killed_and_resumed_is_bit_identical(pretrained, tmp_path):
    source, data_cache = pretrained
    flags = _flags(source, data_cache)
    reference, workdir = str(tmp_path / "reference"), str(tmp_path / "killed")
    # XLA's cheap mode compiles the three processes' programs ~3x faster; all three use it.
    env = dict(h.env(), JAX_DISABLE_MOST_OPTIMIZATIONS="1")

    def run(path):
        out = subprocess.run(h.train_cmd(path, flags), cwd=h.REPO, env=env, capture_output=True,
                             text=True, timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    run(reference)
    proc = subprocess.Popen(h.train_cmd(workdir, flags), cwd=h.REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None and not checkpoints.list_steps(workdir):
            time.sleep(0.005)  # until its first checkpoint (step 2) is complete
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    killed_at = checkpoints.list_steps(workdir)
    assert killed_at and killed_at[-1] < NUM_STEPS, killed_at
    out = run(workdir)
    assert "resumed from" in out and "distillation: weight 0.5" in out, out

    assert h.final_params(workdir).keys() == h.final_params(reference).keys()
    for name, value in h.final_params(reference).items():
        assert np.array_equal(h.final_params(workdir)[name], value), name
    records, ref_records = h.metrics(workdir), h.metrics(reference)
    assert h.deterministic(records) == h.deterministic(ref_records)
    # The logged parts: loss = (1 - 0.5) ce + 0.5 T^2 kl, with a pooled student's KL > 0.
    for r in ref_records:
        if "train/loss" in r:
            assert r["train/kl"] > 0
            np.testing.assert_allclose(r["train/loss"], 0.5 * r["train/ce"]
                                       + 0.5 * 4.0 * r["train/kl"], rtol=1e-5)


def test_refusals_name_the_problem_and_write_nothing(pretrained, tmp_path):
    source, data_cache = pretrained
    cases = {
        "pools nothing": dict(num_kv_heads=-1),
        "must be in": {"distill.weight": 1.5},
        "vocab_size=300": {"distill.teacher": str(tmp_path / "big_vocab")},
    }
    meta = checkpoints.read_meta(checkpoints.latest_checkpoint(source))
    big = meta.model_config.replace(vocab_size=300)
    checkpoints.save(str(tmp_path / "big_vocab"), {k: np.zeros(v.shape, v.dtype)
                                                   for k, v in abstract_params(big).items()},
                     checkpoints.Meta(model_config=big))
    for message, overrides in cases.items():
        config = h.config(h.UPTRAIN, "smoke,num_kv_heads=2", **{
            "init_checkpoint": source, "data.seq_len": 32, "batch_size": 4,
            "data.cache_dir": data_cache, "distill.weight": 0.5, **overrides})
        workdir = tmp_path / f"w{len(message)}"
        with pytest.raises(TrainError, match=message) as e:
            train.train_and_evaluate(config, str(workdir))
        assert "\n" not in str(e.value)
        assert not workdir.exists(), message

"""Pooling K/V heads: each method against a direct numpy computation, and whole-model conversion."""

import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from gqa_uptrain import model as model_lib
from gqa_uptrain import pooling

D, K, H = 6, 8, 4
BF16 = np.dtype(ml_dtypes.bfloat16)


def _weights(dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal((D, K, H)).astype(dtype)  # [D, K, H]


def _direct(w, g, method):
    """Plain per-group loop over axis 1 of [D, K, H], in float64."""
    r = w.shape[1] // g
    w64 = w.astype(np.float64)
    if method == "mean":
        return np.stack([w64[:, j * r:(j + 1) * r].sum(axis=1) / r for j in range(g)], axis=1)
    return np.stack([w64[:, j * r] for j in range(g)], axis=1)


@pytest.mark.parametrize("method", ["mean", "first"])
@pytest.mark.parametrize("g", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-6), (np.float64, 1e-12), (np.float16, 1e-3),
                                       (BF16, 1e-2)])
def test_mean_and_first_match_direct_numpy(method, g, dtype, tol):
    w = _weights(dtype)
    out = pooling.pool_kv_heads(w, g, method, head_axis=1)
    assert out.shape == (D, g, H) and out.dtype == np.dtype(dtype)
    want = _direct(w, g, method)
    np.testing.assert_allclose(out.astype(np.float64), want, rtol=tol, atol=tol)
    if method == "first" or g == K:  # exact: a copy of stored values
        np.testing.assert_array_equal(out, w[:, :: K // g])


def test_mean_computes_in_float32_and_rounds_once():
    # bf16 inputs: the result is the float32 mean rounded once to bf16, not a bf16 running sum.
    w = _weights(BF16, seed=1)
    out = pooling.pool_kv_heads(w, 2, "mean", head_axis=1)
    want = w.astype(np.float32).reshape(D, 2, 4, H).mean(axis=2).astype(BF16)
    np.testing.assert_array_equal(out, want)


def test_identity_when_num_kv_heads_equals_current():
    for dtype in (np.float32, BF16):
        w = _weights(dtype)
        for method in ("mean", "first"):
            out = pooling.pool_kv_heads(w, K, method, head_axis=1)
            assert out.tobytes() == w.tobytes()


@pytest.mark.parametrize("head_axis", [0, 1, -1])
def test_any_head_axis(head_axis):
    w = np.moveaxis(_weights(), 1, head_axis)  # heads on head_axis
    out = pooling.pool_kv_heads(w, 2, "mean", head_axis=head_axis)
    np.testing.assert_allclose(np.moveaxis(out, head_axis, 1), _direct(_weights(), 2, "mean"),
                               rtol=1e-6)


def test_bias_axis0():
    b = np.random.default_rng(2).standard_normal((K, H)).astype(np.float32)
    out = pooling.pool_kv_heads(b, 4, "mean", head_axis=0)
    np.testing.assert_allclose(out, b.reshape(4, 2, H).mean(1), rtol=1e-6)
    assert not pooling.pool_kv_heads(b, 4, "random", head_axis=0, seed=3).any()  # biases -> 0


@pytest.mark.parametrize("g", [1, 2, 8])
def test_random_is_a_seeded_fresh_init(g):
    w = _weights()
    a = pooling.pool_kv_heads(w, g, "random", head_axis=1, seed=5, init_std=0.5)
    b = pooling.pool_kv_heads(w, g, "random", head_axis=1, seed=5, init_std=0.5)
    c = pooling.pool_kv_heads(w, g, "random", head_axis=1, seed=6, init_std=0.5)
    assert a.shape == (D, g, H) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Independent of the input's values (fresh init, even at g == K) ...
    np.testing.assert_array_equal(
        a, pooling.pool_kv_heads(w * 7, g, "random", head_axis=1, seed=5, init_std=0.5))
    assert not np.allclose(a, _direct(w, g, "first"))
    # ... with the requested scale: 1000+ draws give the std to within a few percent.
    big = pooling.pool_kv_heads(np.zeros((512, 8, 4), np.float32), 2, "random", head_axis=1,
                                seed=0, init_std=0.5)
    assert abs(big.std() - 0.5) < 0.03 and abs(big.mean()) < 0.03
    # init_std=None: the scale of the weights being replaced.
    w3 = 3 * np.random.default_rng(0).standard_normal((512, 8, 4)).astype(np.float32)
    assert abs(pooling.pool_kv_heads(w3, 2, "random", head_axis=1).std() - 3) < 0.2


@pytest.mark.parametrize("g,words", [(3, ["num_kv_heads=3", "8"]), (0, ["num_kv_heads=0", "8"]),
                                     (16, ["num_kv_heads=16", "8"]), (-2, ["num_kv_heads=-2"])])
def test_bad_num_kv_heads_names_both_numbers(g, words):
    with pytest.raises(ValueError) as e:
        pooling.pool_kv_heads(_weights(), g, "mean", head_axis=1)
    for w in words:
        assert w in str(e.value)


def test_bad_method_and_dtype():
    with pytest.raises(ValueError, match="method='median'"):
        pooling.pool_kv_heads(_weights(), 2, "median", head_axis=1)
    with pytest.raises(ValueError, match="int32"):
        pooling.pool_kv_heads(np.ones((2, 8, 4), np.int32), 2, "mean", head_axis=1)


def test_methods_list_matches_dispatch():
    assert pooling.METHODS == ("mean", "first", "random", "mean_normed")
    for method in pooling.METHODS:
        pooling.pool_kv_heads(_weights(), 2, method, head_axis=1)


def test_module_imports_neither_jax_nor_torch():
    code = ("import sys, gqa_uptrain.pooling, gqa_uptrain.hf, gqa_uptrain.convert; "
            "bad = [m for m in ('jax', 'torch', 'flax', 'orbax') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- whole model


def _config(**kw):
    base = dict(vocab_size=50, d_model=32, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=48)
    base.update(kw)
    return model_lib.ModelConfig(**base)


def _params(config, seed=0):
    """model.py's own init (weights N(0, 1/fan_in)), biases and norm scales moved off 0 / 1."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, a in model_lib.abstract_params(config).items():
        fan_in = a.shape[0] if name != "embed" else 1
        if name.endswith("o_proj"):
            fan_in = a.shape[0] * a.shape[1]
        x = rng.standard_normal(a.shape) / np.sqrt(fan_in)
        if name.endswith("scale"):
            x = 1 + 0.2 * rng.standard_normal(a.shape)
        elif name.endswith("bias"):
            x = 0.3 * rng.standard_normal(a.shape)
        out[name] = x.astype(a.dtype)
    return out


def _logits(config, params, toks):
    """The JAX model on these params, under jit (eager dispatch is ~10x slower here)."""
    m = nnx.eval_shape(lambda: model_lib.Transformer(config, rngs=nnx.Rngs(0)))
    model_lib.set_params(m, params)
    return np.asarray(nnx.jit(lambda mm, t: mm(t))(m, toks))


@pytest.mark.parametrize("method", ["mean", "first", "random"])
def test_convert_params_touches_only_kv(method):
    config = _config(qkv_bias=True, o_bias=True)
    params = _params(config)
    out, new_config = pooling.convert_params(params, config, 2, method, seed=1)
    assert new_config == config.replace(num_kv_heads=2)
    assert set(out) == set(params)
    model_lib.check_params_match(model_lib.abstract_params(new_config), out)
    for name, value in params.items():
        kv = pooling.kv_param_head_axis(name)
        if kv is None:
            assert out[name] is value or np.array_equal(out[name], value), name
            continue
        heads = np.moveaxis(value, kv, 0).astype(np.float64)  # [K, ...]
        got = np.moveaxis(out[name], kv, 0)
        if method == "mean":
            np.testing.assert_allclose(got, (heads[0::2] + heads[1::2]) / 2, rtol=1e-6, atol=1e-7)
        elif method == "first":
            np.testing.assert_array_equal(got, heads[0::2])
        elif name.endswith("_bias"):
            assert not got.any()
        else:  # model.py's init scale, 1/sqrt(d_model)
            assert 0.5 / np.sqrt(32) < got.std() < 1.5 / np.sqrt(32)
    if method == "random":  # distinct draws per tensor, reproducible per seed
        assert not np.array_equal(out["layers.0.attn.k_proj"], out["layers.1.attn.k_proj"])
        again, _ = pooling.convert_params(params, config, 2, method, seed=1)
        np.testing.assert_array_equal(again["layers.1.attn.v_proj"], out["layers.1.attn.v_proj"])


def test_convert_params_refuses_before_touching_anything():
    config = _config()
    with pytest.raises(ValueError, match="num_kv_heads=3 does not divide the model's 4 KV heads"):
        pooling.convert_params(_params(config), config, 3)


@pytest.mark.parametrize("num_heads,num_kv_heads,target", [(4, 4, 1), (8, 4, 2), (8, 8, 2)])
def test_lossless_when_heads_equal_within_groups(num_heads, num_kv_heads, target):
    """K/V heads equal inside each contiguous group -> pooled GQA model has the same logits.

    This also pins the grouping convention: query head n must read new KV head n // q_per_kv.
    Strided (interleaved) pooling would mix heads of different groups and change the logits.
    """
    config = _config(num_heads=num_heads, num_kv_heads=num_kv_heads, d_model=32, qkv_bias=True)
    params = _params(config, seed=3)
    r = num_kv_heads // target
    for name in list(params):
        axis = pooling.kv_param_head_axis(name)
        if axis is not None:
            heads = np.moveaxis(params[name], axis, 0).copy()
            heads += np.random.default_rng(len(name)).standard_normal(heads.shape).astype(heads.dtype) * 0.1
            heads = np.repeat(heads[::r], r, axis=0)  # equal within contiguous groups
            params[name] = np.moveaxis(heads, 0, axis)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 10)), jnp.int32)
    before = _logits(config, params, toks)
    out, new_config = pooling.convert_params(params, config, target, "mean")
    after = _logits(new_config, out, toks)
    np.testing.assert_allclose(after, before, atol=1e-5, rtol=1e-5)
    assert np.abs(before).max() > 0.5  # logits of order 1: the comparison can fail
    # Interleaved grouping (new head j = mean of old heads j, j+G, j+2G, ...) is not lossless here,
    # so this test would catch it.
    if 1 < target < num_kv_heads:
        interleaved = {}
        for name, value in params.items():
            axis = pooling.kv_param_head_axis(name)
            if axis is None:
                interleaved[name] = value
                continue
            heads = np.moveaxis(value, axis, 0)
            pooled = heads.reshape((r, target) + heads.shape[1:]).mean(axis=0)
            interleaved[name] = np.moveaxis(pooled, 0, axis)
        wrong = _logits(new_config, interleaved, toks)
        assert np.abs(wrong - before).max() > 1e-3


def test_mean_pooling_changes_logits_when_heads_differ():
    config = _config()
    params = _params(config, seed=4)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, 50, (1, 10)), jnp.int32)
    before = _logits(config, params, toks)
    out, new_config = pooling.convert_params(params, config, 1)
    after = _logits(new_config, out, toks)
    assert np.abs(after - before).max() > 1e-3


def test_kv_projection_params():
    config = _config(qkv_bias=True)
    params = _params(config)
    kv = sum(v.size for k, v in params.items() if pooling.kv_param_head_axis(k) is not None)
    assert pooling.kv_projection_params(2, 32, 4, 8, True) == kv


def test_mean_normed_is_the_mean_at_its_members_average_norm():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8, 4)).astype(np.float32)  # [d_model, K, head_dim]
    out = pooling.pool_kv_heads(w, 2, "mean_normed", head_axis=1)
    mean = pooling.pool_kv_heads(w, 2, "mean", head_axis=1)
    for j in range(2):  # group j: old heads 4j .. 4j+3, by a plain loop
        members = [np.linalg.norm(w[:, 4 * j + i, :].astype(np.float64)) for i in range(4)]
        np.testing.assert_allclose(np.linalg.norm(out[:, j, :]), np.mean(members), rtol=1e-5)
        # Same direction as the mean; the mean itself is shorter (~1/2 for 4 random heads).
        cos = np.sum(out[:, j] * mean[:, j]) / (np.linalg.norm(out[:, j]) *
                                                 np.linalg.norm(mean[:, j]))
        assert cos == pytest.approx(1.0, abs=1e-6)
        assert np.linalg.norm(mean[:, j]) < 0.7 * np.mean(members)
    # Equal heads: exactly the mean (= each head); a zero group stays zero.
    same = np.repeat(w[:, :1], 8, axis=1)
    np.testing.assert_allclose(pooling.pool_kv_heads(same, 2, "mean_normed", head_axis=1),
                               same[:, :2], rtol=1e-6)
    assert not pooling.pool_kv_heads(np.zeros_like(w), 2, "mean_normed", head_axis=1).any()
    # The HF layout (head axis first) gives the same heads.
    hf = pooling.pool_kv_heads(np.moveaxis(w, 1, 0), 2, "mean_normed", head_axis=0)
    np.testing.assert_allclose(np.moveaxis(hf, 0, 1), out, rtol=1e-6)

"""Pallas attention kernels: values and gradients against the plain-JAX references, structure
(grid axes, dK/dV heads, residuals, blocks visited), the wiring into attention() and the model, and
the real GPU/TPU lowerings (jax.export from this CPU).

On CPU every kernel runs in Pallas interpret mode, which is slow to compile: shapes are tiny and
each case compiles with XLA's backend optimisation off (`_compile`), which cuts compile time ~3x
without changing what is computed. Tolerances: fp32 1e-5 (absolute + relative; values are O(1)).
bf16: the kernel's error against an fp32 reference must stay within 2x the error of the same
reference run on the bf16 inputs, plus 1e-2 (bf16 has ~3 significant digits; the kernel keeps its
softmax in fp32, and the bf16 reference rounds probabilities before P·V as the kernel does).
On a GPU, fp32 matmuls run as TF32: those tests allow 5e-3 relative (bf16: 5e-2).
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jax_core

from gqa_uptrain import attention as attention_lib
from gqa_uptrain import bench
from gqa_uptrain import model as model_lib
from gqa_uptrain import sharding
from gqa_uptrain.kernels import decode_attention as da
from gqa_uptrain.kernels import flash_attention as fa

_FAST = {"xla_backend_optimization_level": 0}


def _compile(fn, *args):
    """jit + compile with XLA:CPU's backend optimisations off (interpret-mode kernels compile ~3x
    faster; the HLO, hence the numerics, is unchanged)."""
    return jax.jit(fn).lower(*args).compile(compiler_options=_FAST)


def _normal(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _qkv(batch, seq_q, seq_kv, num_heads, num_kv_heads, head_dim, dtype=jnp.float32, seed=0):
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
    return (_normal(kq, (batch, seq_q, num_heads, head_dim), dtype),
            _normal(kk, (batch, seq_kv, num_kv_heads, head_dim), dtype),
            _normal(kv, (batch, seq_kv, num_kv_heads, head_dim), dtype),
            _normal(kd, (batch, seq_q, num_heads, head_dim), dtype))


def _segments(batch, seq):
    # Three packed documents per row, boundaries differing between rows.
    pos = jnp.arange(seq)[None, :]
    cuts = jnp.array([[seq // 3, 2 * seq // 3], [seq // 4, seq // 2]])[:batch]
    return ((pos >= cuts[:, :1]).astype(jnp.int32) + (pos >= cuts[:, 1:]).astype(jnp.int32))


def _blocks(group, positions=16, keys=16):
    """Tiles of `positions` query positions (all heads of the group) and `keys` keys everywhere."""
    rows = positions * group
    return fa.BlockSizes(q_rows=rows, kv=keys, dkv_q_rows=rows, dkv_kv=keys, dq_q_rows=rows,
                         dq_kv=keys)


def _value_and_grads(attn, q, k, v, do):
    out, vjp = jax.vjp(attn, q, k, v)
    return (out, *vjp(do))


def _err(a, b):
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


# ----------------------------------------------------------------------------- flash: values, grads

# (name, num_heads, num_kv_heads, head_dim, seq, causal, segments, dtype)
_FLASH_CASES = [
    # G = 1 (MQA); 72 positions = 4.5 tiles of 16: the tail is padded and masked.
    ("mqa_ragged_len", 4, 1, 32, 72, True, False, jnp.float32),
    # Intermediate G, non-causal, ragged length.
    ("gqa_non_causal_ragged_len", 4, 2, 32, 72, False, False, jnp.float32),
    ("mha_segments", 4, 4, 32, 64, True, True, jnp.float32),  # G = num_heads, 4 tiles
    # q_per_kv 3 and head_dim 24 are zero-padded to 4 and 32 (Triton tiles are powers of two).
    ("group3_dim24_segments", 6, 2, 24, 64, False, True, jnp.float32),
    ("gqa_bf16", 4, 2, 32, 64, True, False, jnp.bfloat16),
]


@pytest.mark.parametrize("case", _FLASH_CASES, ids=[c[0] for c in _FLASH_CASES])
def test_flash_values_and_grads_match_reference(case):
    _, num_heads, num_kv_heads, head_dim, seq, causal, with_segments, dtype = case
    batch = 2
    q, k, v, do = _qkv(batch, seq, seq, num_heads, num_kv_heads, head_dim, dtype)
    seg = _segments(batch, seq) if with_segments else None
    blocks = _blocks(fa._next_pow2(num_heads // num_kv_heads))

    def kernel(q, k, v):
        return fa.flash_attention(q, k, v, seg, causal=causal, block_sizes=blocks)

    def reference(q, k, v):
        return fa.flash_attention_reference(q, k, v, seg, causal=causal)

    got = _compile(lambda *a: _value_and_grads(kernel, *a), q, k, v, do)(q, k, v, do)
    if dtype == jnp.float32:
        want = _value_and_grads(reference, q, k, v, do)
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=name)
    else:
        f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
        exact = _value_and_grads(reference, *f32)
        rounded = _value_and_grads(reference, q, k, v, do)
        for name, g, w, r in zip(("out", "dq", "dk", "dv"), got, exact, rounded):
            assert g.dtype == dtype
            assert _err(g, w) <= 2 * _err(r, w) + 1e-2, (name, _err(g, w), _err(r, w))
    assert got[2].shape == k.shape and got[3].shape == v.shape
    if num_kv_heads < num_heads and dtype == jnp.float32:
        # Grouping is contiguous: query head n reads KV head n // q_per_kv, head by head.
        group = num_heads // num_kv_heads
        kv_head = lambda x, n: x[:, :, n // group:n // group + 1]
        per_head = [fa.flash_attention_reference(q[:, :, n:n + 1], kv_head(k, n), kv_head(v, n),
                                                 seg, causal=causal) for n in range(num_heads)]
        np.testing.assert_allclose(got[0], jnp.concatenate(per_head, axis=2), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- flash: structure


def _pallas_calls(jaxpr):
    """Every pallas_call equation in a jaxpr, nested ones included: {name: eqn}."""
    found = {}

    def walk(j):
        for eqn in j.eqns:
            if eqn.primitive.name == "pallas_call":
                found[eqn.params["name"]] = eqn
            for p in eqn.params.values():
                if isinstance(p, jax_core.ClosedJaxpr):
                    walk(p.jaxpr)
                elif isinstance(p, jax_core.Jaxpr):
                    walk(p)

    walk(jaxpr)
    return found


def test_grids_have_a_kv_head_axis_and_tiles_hold_whole_groups():
    # Pairwise-distinct sizes so a grid identifies its axes: batch 5, KV heads 2, q_per_kv 4;
    # seq 96 = 6 forward query tiles of 16 positions (64 rows), 3 dK/dV tiles of 32 keys and
    # 3 dQ tiles of 32 positions (128 rows).
    batch, num_heads, num_kv_heads, head_dim, seq = 5, 8, 2, 32, 96
    q, k, v, do = _qkv(batch, seq, seq, num_heads, num_kv_heads, head_dim)
    blocks = fa.BlockSizes(q_rows=64, kv=16, dkv_q_rows=64, dkv_kv=32, dq_q_rows=128, dq_kv=16)
    attn = lambda q, k, v: fa.flash_attention(q, k, v, block_sizes=blocks)
    calls = _pallas_calls(jax.make_jaxpr(lambda *a: _value_and_grads(attn, *a))(q, k, v, do).jaxpr)
    assert set(calls) == {"gqa_flash_fwd", "gqa_flash_bwd_dkv", "gqa_flash_bwd_dq"}
    grids = {name: tuple(eqn.params["grid_mapping"].grid) for name, eqn in calls.items()}
    assert grids == {"gqa_flash_fwd": (6, batch, num_kv_heads),  # (query block, batch, KV head)
                     "gqa_flash_bwd_dkv": (3, batch, num_kv_heads),  # (KV block, batch, KV head)
                     "gqa_flash_bwd_dq": (3, batch, num_kv_heads)}
    # The query tile of the forward kernel covers all q_per_kv = 4 heads of its KV head.
    q_block = calls["gqa_flash_fwd"].params["grid_mapping"].block_mappings[0].block_shape
    assert [getattr(d, "block_size", None) for d in q_block] == [None, 16, 4, head_dim]


def test_dk_dv_leave_the_kernel_with_num_kv_heads_heads():
    batch, num_heads, num_kv_heads, head_dim, seq = 1, 8, 2, 32, 48
    q, k, v, do = _qkv(batch, seq, seq, num_heads, num_kv_heads, head_dim)
    attn = lambda q, k, v: fa.flash_attention(q, k, v, block_sizes=_blocks(4))
    jaxpr = jax.make_jaxpr(lambda *a: _value_and_grads(attn, *a))(q, k, v, do).jaxpr
    dkv = _pallas_calls(jaxpr)["gqa_flash_bwd_dkv"]
    # The kernel itself writes [batch, seq, num_kv_heads, head_dim]: the group sum happened inside.
    assert [tuple(o.aval.shape) for o in dkv.outvars] == [(batch, seq, num_kv_heads, head_dim)] * 2
    # ... and nothing after it reduces a num_heads-headed K/V gradient.
    shapes = {tuple(var.aval.shape) for eqn in jaxpr.eqns for var in eqn.outvars}
    assert (batch, seq, num_heads, head_dim) in shapes  # dq
    assert not [s for s in shapes if len(s) == 5 and num_heads // num_kv_heads in s and seq in s]


def _residual_shapes(fn, *args):
    """Shapes of what reverse-mode autodiff keeps for the backward pass (traced, not run)."""
    shapes = []

    def forward(*args):
        _, vjp = jax.vjp(fn, *args)
        shapes.extend(tuple(x.shape) for x in jax.tree_util.tree_leaves(vjp) if hasattr(x, "shape"))
        return 0

    jax.eval_shape(forward, *args)
    return shapes


def test_no_seq_by_seq_residual_is_saved():
    seq_q = seq_kv = 64
    q, k, v, _ = _qkv(1, seq_q, seq_kv, 4, 2, 32)
    attn = lambda q, k, v: fa.flash_attention(q, k, v, block_sizes=_blocks(2))
    shapes = _residual_shapes(attn, q, k, v)
    quadratic = lambda ss: [s for s in ss if sum(d >= seq_q for d in s) >= 2]
    assert not quadratic(shapes), shapes
    # Exactly q, k, v, the output and the per-row log-sum-exp [batch, kv_heads, seq * q_per_kv].
    assert sorted(shapes) == sorted([q.shape, k.shape, v.shape, q.shape, (1, 2, seq_q * 2)])
    # Positive control: the reference's autodiff does keep [.., seq, seq] probabilities.
    ref = lambda q, k, v: fa.flash_attention_reference(q, k, v)
    assert quadratic(_residual_shapes(ref, q, k, v))


def test_causal_visits_about_half_the_blocks():
    # 8 query blocks x 8 KV blocks of 16. Causal: query block i needs KV blocks 0..i -> 36 of 64
    # (the triangle n(n+1)/2 of n^2, ~half); dK/dV mirror it; non-causal visits all 64.
    batch, num_heads, num_kv_heads, head_dim, seq, n = 1, 4, 2, 32, 128, 8
    q, k, v, do = _qkv(batch, seq, seq, num_heads, num_kv_heads, head_dim)
    counts = {}
    for causal in (True, False):
        plan = fa.make_plan(q.shape, k.shape, causal=causal, scale=head_dim ** -0.5,
                            block_sizes=_blocks(2), interpret=True, count_blocks=True)

        def run(q, k, v, do, plan=plan):
            o, lse, fwd_counts = fa._fwd_call(q, k, v, None, plan)
            *_, (dkv_counts, dq_counts) = fa._bwd_call(q, k, v, None, o, lse, do, plan)
            return fwd_counts, dkv_counts, dq_counts

        counts[causal] = [np.asarray(c) for c in _compile(run, q, k, v, do)(q, k, v, do)]
    fwd, dkv, dq = counts[True]
    # Per (batch, KV head): query block i visits i + 1 KV blocks; KV block j is visited by
    # query blocks j..n-1.
    np.testing.assert_array_equal(fwd[0, 0], np.arange(1, n + 1))
    np.testing.assert_array_equal(dq[0, 0], np.arange(1, n + 1))
    np.testing.assert_array_equal(dkv[0, 0], n - np.arange(n))
    for causal_count, full_count in zip(counts[True], counts[False]):
        np.testing.assert_array_equal(full_count, n)
        ratio = causal_count.sum() / full_count.sum()
        assert ratio == pytest.approx(n * (n + 1) / 2 / n ** 2)  # 0.5625
        assert 0.5 <= ratio < 0.6


# ----------------------------------------------------------------------------- decode kernel


@pytest.mark.parametrize("num_kv_heads", [1, 8])  # MQA and MHA; G = 2 in the prefill tests
def test_decode_matches_reference_with_ragged_lengths(num_kv_heads):
    batch, num_heads, head_dim, max_len = 4, 8, 32, 128
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(num_kv_heads), 3)
    q = _normal(kq, (batch, 1, num_heads, head_dim), jnp.float32)
    k = _normal(kk, (batch, num_kv_heads, max_len, head_dim), jnp.float32)
    v = _normal(kv, (batch, num_kv_heads, max_len, head_dim), jnp.float32)
    lengths = jnp.array([1, 37, 100, 128], jnp.int32)  # one token, mid-block, full cache
    # 4 splits of 32 keys, 2 blocks of 16 each: sequences end inside, at the start of, and past
    # whole splits.
    fn = lambda q, k, v, lengths: da.decode_attention(q, k, v, lengths, lengths - 1, block_kv=16,
                                                      num_splits=4)
    compiled = _compile(fn, q, k, v, lengths)
    want = da.decode_attention_reference(q, k, v, lengths, lengths - 1)
    np.testing.assert_allclose(compiled(q, k, v, lengths), want, atol=1e-5, rtol=1e-5)
    # Blocks past each length are never read: filling them with NaN changes nothing. (Entries
    # past the length inside the last block are read and masked; the cache holds finite values.)
    used = -(-lengths // 16) * 16  # whole 16-key blocks holding valid entries
    beyond = jnp.arange(max_len)[None, None, :, None] >= used[:, None, None, None]
    k_bad, v_bad = jnp.where(beyond, jnp.nan, k), jnp.where(beyond, jnp.nan, v)
    np.testing.assert_allclose(compiled(q, k_bad, v_bad, lengths), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_decode_prefill_rows_and_odd_cache_length(causal):
    # 20 new tokens x q_per_kv 4 = 80 rows, two row blocks of 64; a cache of 37 positions (no
    # power-of-two block divides it, so it is padded); ragged offsets.
    batch, seq_q, num_heads, num_kv_heads, head_dim, max_len = 2, 20, 8, 2, 32, 37
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(7), 3)
    q = _normal(kq, (batch, seq_q, num_heads, head_dim), jnp.float32)
    k = _normal(kk, (batch, num_kv_heads, max_len, head_dim), jnp.float32)
    v = _normal(kv, (batch, num_kv_heads, max_len, head_dim), jnp.float32)
    offsets = jnp.array([0, 17], jnp.int32)
    lengths = offsets + seq_q
    fn = lambda q, k, v: da.decode_attention(q, k, v, lengths, offsets, causal=causal)
    got = _compile(fn, q, k, v)(q, k, v)
    want = da.decode_attention_reference(q, k, v, lengths, offsets, causal=causal)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_decode_bf16():
    batch, num_heads, num_kv_heads, head_dim, max_len = 2, 8, 2, 32, 64
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(3), 3)
    q = _normal(kq, (batch, 1, num_heads, head_dim), jnp.bfloat16)
    k = _normal(kk, (batch, num_kv_heads, max_len, head_dim), jnp.bfloat16)
    v = _normal(kv, (batch, num_kv_heads, max_len, head_dim), jnp.bfloat16)
    lengths = jnp.array([20, 64], jnp.int32)
    got = _compile(lambda q, k, v: da.decode_attention(q, k, v, lengths, lengths - 1, block_kv=16),
                   q, k, v)(q, k, v)
    assert got.dtype == jnp.bfloat16
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    exact = da.decode_attention_reference(*f32, lengths, lengths - 1)
    rounded = da.decode_attention_reference(q, k, v, lengths, lengths - 1)
    assert _err(got, exact) <= 2 * _err(rounded, exact) + 1e-2


def test_decode_tpu_kernel_in_tpu_interpret_mode():
    # The Mosaic TPU variant (scalar-prefetched lengths, one block per program, clamped fetches)
    # in the TPU interpreter.
    batch, num_heads, num_kv_heads, head_dim, max_len = 3, 8, 2, 32, 96
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(11), 3)
    q = _normal(kq, (batch, 1, num_heads, head_dim), jnp.float32)
    k = _normal(kk, (batch, num_kv_heads, max_len, head_dim), jnp.float32)
    v = _normal(kv, (batch, num_kv_heads, max_len, head_dim), jnp.float32)
    lengths = jnp.array([5, 70, 96], jnp.int32)  # 3 chunks of 32: the first 1, 3 and 3 are used
    got = da.decode_attention(q, k, v, lengths, lengths - 1, block_kv=32, backend="mosaic_tpu",
                              interpret=True)
    want = da.decode_attention_reference(q, k, v, lengths, lengths - 1)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- TPU training path


@pytest.mark.parametrize("causal,with_segments", [(True, True), (False, False)],
                         ids=["causal_segments", "non_causal_padded"])
def test_splash_path_matches_reference_in_tpu_interpret_mode(causal, with_segments):
    # 200 positions padded to 256 (splash blocks are 128); the padding must stay invisible.
    batch, seq, num_heads, num_kv_heads, head_dim = 2, 200, 4, 2, 32
    q, k, v, do = _qkv(batch, seq, seq, num_heads, num_kv_heads, head_dim, seed=5)
    seg = _segments(batch, seq) if with_segments else None
    kernel = lambda q, k, v: fa.flash_attention(q, k, v, seg, causal=causal, backend="splash",
                                                interpret=True)
    reference = lambda q, k, v: fa.flash_attention_reference(q, k, v, seg, causal=causal)
    got = _compile(lambda *a: _value_and_grads(kernel, *a), q, k, v, do)(q, k, v, do)
    want = _value_and_grads(reference, q, k, v, do)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5, err_msg=name)


# ----------------------------------------------------------------------------- attention(), model


def test_auto_never_picks_interpreted_pallas_on_cpu():
    assert jax.default_backend() == "cpu"
    call = dict(platform=jax.default_backend(), dtype="float32", head_dim=64, seq_q=1)
    select = attention_lib.select
    assert select("auto", attention_lib.Call(mode="train", kv_layout="bskd", **call)) == "einsum_vjp"
    assert select("auto", attention_lib.Call(mode="decode", kv_layout="bksd", **call)) == "cache"
    assert select("pallas", attention_lib.Call(mode="decode", kv_layout="bksd", **call)) == "pallas"


def test_pallas_with_q_offset_and_kv_lengths_uses_the_decode_kernel():
    # bskd K/V with cache positions: attention() transposes to the cache layout, decode kernel.
    q = _normal(jax.random.PRNGKey(0), (2, 3, 4, 16), jnp.float32)
    k = _normal(jax.random.PRNGKey(1), (2, 24, 2, 16), jnp.float32)
    v = _normal(jax.random.PRNGKey(2), (2, 24, 2, 16), jnp.float32)
    q_offset, kv_lengths = jnp.array([4, 20]), jnp.array([7, 23])
    call = lambda impl: lambda q, k, v: attention_lib.attention(
        q, k, v, mode="decode", kv_layout="bskd", q_offset=q_offset, kv_lengths=kv_lengths,
        implementation=impl)
    got = _compile(call("pallas"), q, k, v)
    calls = _pallas_calls(jax.make_jaxpr(call("pallas"))(q, k, v).jaxpr)
    assert list(calls) == ["gqa_decode"]
    np.testing.assert_allclose(got(q, k, v), call("reference")(q, k, v), atol=1e-5, rtol=1e-5)


def test_pallas_refuses_segment_ids_with_a_cache():
    q = jnp.zeros((1, 2, 4, 8))
    k = jnp.zeros((1, 2, 4, 8))
    with pytest.raises(ValueError, match="segment_ids"):
        attention_lib.attention(q, k, k, segment_ids=jnp.zeros((1, 2), jnp.int32),
                                kv_lengths=jnp.array([2]), implementation="pallas",
                                mode="decode")


def _tiny_model(num_kv_heads=2):
    # One layer: each layer adds its own copy of the interpret-mode kernels to compile.
    config = model_lib.ModelConfig(vocab_size=61, d_model=64, num_layers=1, num_heads=4,
                                   num_kv_heads=num_kv_heads, mlp_dim=96)
    return model_lib.build_model(config, seed=1)


def _model_step(implementation, compile_fn):
    """Loss and grads of a tiny model on packed documents."""
    model = _tiny_model()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch, seq = 2, 40  # 40 positions: not a multiple of the 16- or 32-position tiles
    tokens = jax.random.randint(jax.random.PRNGKey(2), (batch, seq + 1), 0, 61)
    segment_ids = _segments(batch, seq)

    def loss_fn(params):
        m = nnx.merge(graphdef, params, rest)
        logits = m(tokens[:, :-1], segment_ids=segment_ids, implementation=implementation)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    step = jax.value_and_grad(loss_fn)
    return compile_fn(step, params)(params)


def _assert_same_step(got, want, tol):
    np.testing.assert_allclose(got[0], want[0], rtol=tol)
    flat_got, flat_want = jax.tree_util.tree_leaves(got[1]), jax.tree_util.tree_leaves(want[1])
    assert len(flat_got) == len(flat_want) > 0
    for g, w in zip(flat_got, flat_want):
        scale = float(jnp.max(jnp.abs(w))) + 1e-12  # relative to each parameter's largest grad
        np.testing.assert_allclose(g / scale, w / scale, atol=tol)


def test_model_training_step_with_pallas_matches_reference():
    _assert_same_step(_model_step("pallas", _compile), _model_step("reference", _compile), tol=1e-5)


def test_model_decode_with_pallas_matches_reference():
    model = _tiny_model(num_kv_heads=1)
    graphdef, state = nnx.split(model)
    batch, prompt_len, steps, max_len = 3, 6, 2, 16
    prompt = jax.random.randint(jax.random.PRNGKey(4), (batch, prompt_len), 0, 61)
    prompt_lengths = jnp.array([6, 2, 4], jnp.int32)  # ragged, right-padded prompts

    def run(state, implementation):
        m = nnx.merge(graphdef, state)
        cache = m.init_cache(batch, max_len)
        logits, cache = m.decode(prompt, cache, num_valid=prompt_lengths,
                                 implementation=implementation)
        outs = [jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]]
        for _ in range(steps):
            token = jnp.argmax(outs[-1], axis=-1)[:, None].astype(jnp.int32)
            logits, cache = m.decode(token, cache, implementation=implementation)
            outs.append(logits[:, 0])
        return jnp.stack(outs, axis=1)  # [batch, 1 + steps, vocab]

    got = _compile(lambda s: run(s, "pallas"), state)(state)
    want = _compile(lambda s: run(s, "reference"), state)(state)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- real lowerings

# The benchmark's shapes: batch 4, seq 4096, 32 query heads, head_dim 128, bf16.
_BENCH = dict(batch=4, seq=4096, num_heads=32, head_dim=128)
_TRITON_CALL = "__gpu$xla.gpu.triton"


def _export(fn, platform, *args):
    exported = jax.export.export(
        jax.jit(fn), platforms=[platform],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(_TRITON_CALL)])(*args)
    return exported.mlir_module()


def _bench_specs(num_kv_heads):
    b, t, n, d = (_BENCH[key] for key in ("batch", "seq", "num_heads", "head_dim"))
    sds = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)
    return dict(q=sds(b, t, n, d), kv=sds(b, t, num_kv_heads, d), seg=sds(b, t, dtype=jnp.int32),
                q1=sds(b, 1, n, d), cache=sds(b, num_kv_heads, t, d),
                lengths=sds(b, dtype=jnp.int32))


@pytest.mark.parametrize("num_kv_heads", [32, 8, 1])
@pytest.mark.parametrize("platform,backend,decode_backend,marker",
                         [("cuda", "triton", "triton", _TRITON_CALL),
                          ("tpu", "splash", "mosaic_tpu", "tpu_custom_call")])
def test_kernels_lower_for_gpu_and_tpu(num_kv_heads, platform, backend, decode_backend, marker):
    s = _bench_specs(num_kv_heads)
    attn = lambda q, k, v, seg=None: fa.flash_attention(q, k, v, seg, causal=True,
                                                        backend=backend, interpret=False)
    loss = lambda *a: attn(*a).astype(jnp.float32).sum()
    grads = jax.grad(loss, argnums=(0, 1, 2))
    decode = lambda q, k, v, lengths: da.decode_attention(q, k, v, lengths, lengths - 1,
                                                          backend=decode_backend, interpret=False)
    modules = {
        "fwd": _export(attn, platform, s["q"], s["kv"], s["kv"]),
        "bwd": _export(grads, platform, s["q"], s["kv"], s["kv"]),
        "bwd_segments": _export(grads, platform, s["q"], s["kv"], s["kv"], s["seg"]),
        "decode": _export(decode, platform, s["q1"], s["cache"], s["cache"], s["lengths"]),
    }
    for name, text in modules.items():
        assert marker in text, name
    if platform == "cuda":  # forward 1 kernel; backward forward + dK/dV + dQ
        assert len(re.findall(re.escape(_TRITON_CALL), modules["bwd"])) >= 3


# ----------------------------------------------------------------------------- on a device


def _device_check(platform_backend, dtype, atol):
    batch, seq, num_heads, head_dim = 2, 512, 8, 64
    for num_kv_heads in (1, 2, 8):
        q, k, v, do = _qkv(batch, seq, seq, num_heads, num_kv_heads, head_dim, dtype)
        kernel = lambda q, k, v: fa.flash_attention(q, k, v, causal=True, backend=platform_backend,
                                                    interpret=False)
        reference = lambda q, k, v: fa.flash_attention_reference(q, k, v, causal=True)
        got = jax.jit(lambda *a: _value_and_grads(kernel, *a))(q, k, v, do)
        f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
        with jax.default_matmul_precision("highest"):
            want = jax.jit(lambda *a: _value_and_grads(reference, *a))(*f32)
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
            scale = float(jnp.max(jnp.abs(w)))
            assert _err(g, w) <= atol * max(1.0, scale), (num_kv_heads, name, _err(g, w), scale)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 5e-3), (jnp.bfloat16, 5e-2)])
def test_flash_on_gpu(dtype, atol):
    # fp32 runs as TF32 on the tensor cores (~1e-3 relative); bf16 inputs round to ~3 digits.
    _device_check("triton", dtype, atol)


@pytest.mark.gpu
@pytest.mark.parametrize("num_kv_heads", [1, 8, 32])
def test_decode_on_gpu(num_kv_heads):
    batch, num_heads, head_dim, max_len = 4, 32, 128, 4096
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q = _normal(kq, (batch, 1, num_heads, head_dim), jnp.bfloat16)
    k = _normal(kk, (batch, num_kv_heads, max_len, head_dim), jnp.bfloat16)
    v = _normal(kv, (batch, num_kv_heads, max_len, head_dim), jnp.bfloat16)
    lengths = jnp.array([1, 1000, 3001, 4096], jnp.int32)
    got = jax.jit(lambda *a: da.decode_attention(*a, lengths, lengths - 1))(q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    with jax.default_matmul_precision("highest"):
        want = da.decode_attention_reference(*f32, lengths, lengths - 1)
    assert _err(got, want) < 3e-2


@pytest.mark.gpu
def test_model_step_with_pallas_on_gpu():
    # The reference runs at 'highest' precision; the kernels use TF32 for fp32.
    with jax.default_matmul_precision("highest"):
        want = _model_step("reference", lambda f, *a: jax.jit(f))
    _assert_same_step(_model_step("pallas", lambda f, *a: jax.jit(f)), want, tol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("implementation,with_segments,expected",
                         [("auto", False, "cudnn"), ("auto", True, "pallas"),
                          ("xla", True, "xla")])
def test_attention_in_shard_map_on_gpu(implementation, with_segments, expected):
    # As the trainer's step calls attention: under jax.set_mesh, where 'cudnn' and 'pallas' run
    # inside shard_map (on one GPU's 1x1x1 mesh the shard is the whole array). bf16 inputs:
    # cuDNN without segment ids, the Pallas flash kernel for packed rows, 'xla' as a control.
    batch, seq, num_heads, num_kv_heads, head_dim = 2, 512, 8, 2, 128
    q, k, v, do = _qkv(batch, seq, seq, num_heads, num_kv_heads, head_dim, jnp.bfloat16)
    seg = _segments(batch, seq) if with_segments else None
    call = attention_lib.Call(mode="train", platform="gpu", kv_layout="bskd", dtype="bfloat16",
                              head_dim=head_dim, seq_q=seq, segment_ids=with_segments)
    assert attention_lib.select(implementation, call) == expected
    attn = lambda q, k, v: attention_lib.attention(q, k, v, segment_ids=seg,
                                                   implementation=implementation)
    with jax.set_mesh(sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])):
        assert ("shard_map" in str(jax.make_jaxpr(attn)(q, k, v))) == (expected != "xla")
        got = jax.jit(lambda *a: _value_and_grads(attn, *a))(q, k, v, do)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    reference = lambda q, k, v: fa.flash_attention_reference(q, k, v, seg, causal=True)
    with jax.default_matmul_precision("highest"):
        want = jax.jit(lambda *a: _value_and_grads(reference, *a))(*f32)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        scale = float(jnp.max(jnp.abs(w)))
        assert _err(g, w) <= 5e-2 * max(1.0, scale), (name, _err(g, w), scale)


@pytest.mark.tpu
@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 5e-3), (jnp.bfloat16, 5e-2)])
def test_flash_on_tpu(dtype, atol):
    _device_check("splash", dtype, atol)


@pytest.mark.tpu
def test_decode_on_tpu():
    batch, num_heads, num_kv_heads, head_dim, max_len = 4, 32, 8, 128, 4096
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q = _normal(kq, (batch, 1, num_heads, head_dim), jnp.bfloat16)
    k = _normal(kk, (batch, num_kv_heads, max_len, head_dim), jnp.bfloat16)
    v = _normal(kv, (batch, num_kv_heads, max_len, head_dim), jnp.bfloat16)
    lengths = jnp.array([1, 1000, 3001, 4096], jnp.int32)
    got = jax.jit(lambda *a: da.decode_attention(*a, lengths, lengths - 1))(q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    with jax.default_matmul_precision("highest"):
        want = da.decode_attention_reference(*f32, lengths, lengths - 1)
    assert _err(got, want) < 3e-2


# ----------------------------------------------------------------------------- benchmark CLI


def test_bench_kernels_quick_prints_a_table_and_a_json_last_line(capsys):
    assert bench.main(["kernels", "--quick"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    headline = json.loads(lines[-1])
    assert headline["bench"] == "kernels" and headline["interpret"] is True
    assert set(headline["num_kv_heads"]) == {"4", "1"}
    for figures in headline["num_kv_heads"].values():
        assert figures["fwd_ms"] > 0 and figures["fwd_bwd_ms"] > 0 and figures["decode_us"] > 0
        assert figures["fwd_bwd_vs_xla"] > 0 and figures["decode_vs_reference"] > 0
        assert figures["fwd_bwd_vs_cudnn"] is None  # no cuDNN on a CPU
    table = [line for line in lines if line.startswith("| ") and "|---" not in line][1:]
    rows = {tuple(cell.strip() for cell in line.split("|")[1:4]) for line in table}
    for g in ("4", "1"):
        for op, impls in (("fwd", ("pallas", "xla")), ("fwd+bwd", ("pallas", "xla")),
                          ("decode", ("pallas", "reference", "xla"))):
            assert {(g, op, impl) for impl in impls} <= rows
    assert not [line for line in table if "n/a" in line]


def test_bench_rejects_an_unknown_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["kernelz"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kernelz" in err[0]

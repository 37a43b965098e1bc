"""Conversions beyond mean pooling (merging.py, calibration.py, the converter's --method options).

The issue's required tests: the permutation alone leaves the MHA model's logits unchanged; equal
weights or identical heads reduce the function-aware merge to the mean; the K merge commutes with RoPE
at several positions; on constructed heads with a known optimum each method finds it. Plus: the
statistics against a direct loop, the closed form against a generic least-squares solver, the
fallbacks, and the command line end to end (checkpoint and Hugging Face folder, loaded back with
transformers).
"""

import itertools
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gqa_uptrain import calibration, checkpoints, convert, hf, merging, pooling
from gqa_uptrain import model as model_lib
from gqa_uptrain.byte_tokenizer import write_byte_tokenizer

# One shape of model, token batch and calibration batch throughout, so that every jitted function
# (the forward, the calibration's block step and statistics) compiles once for the whole module.
VOCAB = 257  # byte-sized: the command-line tests calibrate on stdlib bytes


def _config(**kw):
    base = dict(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=4,
                mlp_dim=48, qkv_bias=True, o_bias=True)
    base.update(kw)
    return model_lib.ModelConfig(**base)


def _params(config, seed=0):
    """Weights N(0, 1/fan_in) like model.py's init, biases and norm scales moved off 0 / 1."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, a in sorted(model_lib.abstract_params(config).items()):
        kind = name.split(".")[-1]
        fan_in = 1 if kind == "embed" else a.shape[0] * (a.shape[1] if kind == "o_proj" else 1)
        x = rng.standard_normal(a.shape) / np.sqrt(fan_in)
        if name.endswith("scale"):
            x = 1 + 0.2 * rng.standard_normal(a.shape)
        elif name.endswith("bias"):
            x = 0.3 * rng.standard_normal(a.shape)
        out[name] = x.astype(a.dtype)
    return out


CONFIG = _config()


def _logits(config, params, toks):
    m = nnx.eval_shape(lambda: model_lib.Transformer(config, rngs=nnx.Rngs(0)))
    model_lib.set_params(m, {k: np.asarray(v, np.float32) for k, v in params.items()})
    return np.asarray(model_lib.forward_fn(m)(jnp.asarray(toks, jnp.int32)))


def _tokens(batch=2, seq=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (batch, seq)).astype(np.int32)


def _calib(seed=4):
    return _tokens(8, 32, seed=seed)


def _rope_np(x, positions, inv_freq):
    """Rotate-half RoPE in float64 numpy: x [..., t, H] at positions [t] (independent reference)."""
    half = x.shape[-1] // 2
    ang = np.asarray(positions, np.float64)[:, None] * np.asarray(inv_freq, np.float64)  # [t, F]
    c, s = np.cos(ang), np.sin(ang)
    x0, x1 = x[..., :half], x[..., half:]
    return np.concatenate([x0 * c - x1 * s, x1 * c + x0 * s], axis=-1)


# ----------------------------------------------------------------------------- method strings


def test_method_strings():
    assert merging.METHODS[:len(pooling.METHODS)] == pooling.METHODS
    for method in ("mean", "fit", "fit_o", "similar+mean", "similar+fit", "similar_weights+fit",
                   "similar+first", "similar+fit_o"):
        assert method in merging.METHODS
        assert str(merging.parse_method(method)) == method
    spec = merging.parse_method("similar+fit")
    assert (spec.grouping, spec.merge, spec.needs_calibration) == ("similar", "fit", True)
    assert not merging.parse_method("similar_weights+mean").needs_calibration
    assert merging.parse_method("first").is_pooling
    for bad in ("median", "similar+random", "contiguous+mean", "similar", "similar+", "+mean",
                "fit+similar"):
        with pytest.raises(ValueError, match=r"is not one of mean, first, random, mean_normed, fit"):
            merging.parse_method(bad)


# ----------------------------------------------------------------------------- permutation


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 4)])
def test_permutation_alone_leaves_logits_unchanged(num_heads, num_kv_heads):
    config = _config(num_heads=num_heads, num_kv_heads=num_kv_heads)
    params = _params(config, seed=1)
    toks = _tokens()
    before = _logits(config, params, toks)
    perms = [np.array([2, 0, 3, 1]), np.array([1, 3, 0, 2])]
    permuted = params
    for layer, perm in enumerate(perms):
        permuted = merging.permute_layer(permuted, layer, perm, num_heads)
    # Every head-carrying tensor really moved (query heads with their KV head).
    q_perm = merging.query_perm(perms[0], num_heads)
    np.testing.assert_array_equal(permuted["layers.0.attn.q_proj"],
                                  params["layers.0.attn.q_proj"][:, q_perm])
    np.testing.assert_array_equal(permuted["layers.0.attn.o_proj"],
                                  params["layers.0.attn.o_proj"][q_perm])
    np.testing.assert_array_equal(permuted["layers.0.attn.v_bias"],
                                  params["layers.0.attn.v_bias"][perms[0]])
    after = _logits(config, permuted, toks)
    np.testing.assert_allclose(after, before, atol=1e-5, rtol=1e-5)
    assert np.abs(before).max() > 0.5
    # Negative control: moving K/V heads without their query heads changes the model.
    wrong = dict(params)
    for key in ("k_proj", "v_proj"):
        wrong[f"layers.0.attn.{key}"] = params[f"layers.0.attn.{key}"][:, perms[0]]
    assert np.abs(_logits(config, wrong, toks) - before).max() > 1e-3


def test_permute_layer_refuses_a_non_permutation():
    with pytest.raises(ValueError, match="not a permutation"):
        merging.permute_layer(_params(CONFIG), 0, np.array([0, 0, 1, 2]), 4)


# ----------------------------------------------------------------------------- grouping


def _all_balanced_partitions(items, r):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for others in itertools.combinations(rest, r - 1):
        remaining = [x for x in rest if x not in others]
        for tail in _all_balanced_partitions(remaining, r):
            yield [[first, *others]] + tail


@pytest.mark.parametrize("num_heads,num_groups", [(8, 4), (8, 2), (6, 3), (6, 2)])
def test_balanced_groups_find_planted_clusters(num_heads, num_groups):
    """Heads drawn around num_groups well-separated centres, placed in shuffled order: the planted
    partition is the optimum (checked by enumerating every balanced partition) and is found."""
    rng = np.random.default_rng(num_heads + num_groups)
    r = num_heads // num_groups
    order = rng.permutation(num_heads)
    planted = canonical = merging.canonical_groups(order.reshape(num_groups, r))
    points = np.empty((num_heads, 5))
    for g, members in enumerate(planted):
        points[members] = 10 * rng.standard_normal(5) + 0.1 * rng.standard_normal((r, 5))
    gram = points @ points.T
    dist = merging.head_distances(gram, gram)
    best = min(_all_balanced_partitions(list(range(num_heads)), r),
               key=lambda p: merging.group_cost(dist, np.array(p)))
    np.testing.assert_array_equal(merging.canonical_groups(np.array(best)), canonical)
    np.testing.assert_array_equal(merging.balanced_groups(dist, num_groups), canonical)


def test_balanced_groups_never_worse_than_contiguous():
    for seed in range(5):
        points = np.random.default_rng(seed).standard_normal((8, 3))
        dist = merging.head_distances(points @ points.T, points @ points.T)
        groups = merging.balanced_groups(dist, 2)
        assert sorted(groups.reshape(-1).tolist()) == list(range(8))
        assert (merging.group_cost(dist, groups)
                <= merging.group_cost(dist, np.arange(8).reshape(2, 4)) + 1e-12)
    # Already-contiguous clusters keep the identity order.
    points = np.repeat(10 * np.random.default_rng(0).standard_normal((4, 3)), 2, axis=0)
    dist = merging.head_distances(points @ points.T, points @ points.T)
    np.testing.assert_array_equal(merging.groups_to_perm(merging.balanced_groups(dist, 4)),
                                  np.arange(8))


def _planted_pairs_model(config, pairs_per_layer, seed=2):
    """K/V heads equal within the given (non-contiguous) pairs of heads, per layer."""
    params = _params(config, seed=seed)
    for layer, pairs in enumerate(pairs_per_layer):
        for key in ("k_proj", "v_proj", "k_bias", "v_bias"):
            name = f"layers.{layer}.attn.{key}"
            axis = pooling.kv_param_head_axis(name)
            heads = np.moveaxis(params[name], axis, 0).copy()
            for a, b in pairs:
                heads[b] = heads[a]
            params[name] = np.moveaxis(heads, 0, axis)
    return params


@pytest.mark.parametrize("method", ["similar_weights+mean", "similar+mean", "similar+fit"])
def test_similarity_grouping_finds_planted_pairs_and_is_lossless(method):
    """Heads equal in pairs {0,2},{1,3} (layer 0) and {0,3},{1,2} (layer 1): grouping by similarity
    pairs them, and the converted model is the MHA model; contiguous mean pooling is not."""
    config = CONFIG
    pairs = [[(0, 2), (1, 3)], [(0, 3), (1, 2)]]
    params = _planted_pairs_model(config, pairs)
    toks = _tokens(seed=3)
    before = _logits(config, params, toks)
    report = {}
    out, new_config = calibration.convert_params_calibrated(
        params, config, 2, method, calib_tokens=_calib(), report=report)
    assert new_config.num_kv_heads == 2
    assert [l["kv_perm"] for l in report["layers"]] == [[0, 2, 1, 3], [0, 3, 1, 2]]
    np.testing.assert_allclose(_logits(new_config, out, toks), before, atol=1e-4, rtol=1e-4)
    plain, _ = pooling.convert_params(params, config, 2, "mean")
    assert np.abs(_logits(new_config, plain, toks) - before).max() > 1e-2


# ----------------------------------------------------------------------------- K merge and RoPE


@pytest.mark.parametrize("scaling", [None, (("factor", 8.0), ("high_freq_factor", 4.0),
                                            ("low_freq_factor", 1.0),
                                            ("original_max_position_embeddings", 64),
                                            ("rope_type", "llama3"))])
def test_k_merge_commutes_with_rope(scaling):
    config = _config(d_model=64, num_heads=4, rope_scaling=scaling)  # head_dim 16
    inv_freq = model_lib.rope_inv_freq(config)
    rng = np.random.default_rng(0)
    r, head_dim = 3, config.head_dim
    keys = rng.standard_normal((2, 6, r, head_dim)).astype(np.float32)  # [b, t, r, H]
    positions = jnp.asarray(np.array([[0, 1, 5, 37, 1000, 4095]] * 2), jnp.int32)
    # Coefficients from an actual solve (b != 0) and arbitrary ones.
    M = rng.standard_normal((1, r, head_dim // 2, 2, 2))
    M = M @ np.swapaxes(M, -1, -2)
    samples = rng.standard_normal((40, r, head_dim // 2, 2))
    S = np.einsum("tlfp,tmfq->lmfpq", samples, samples)[None, None].repeat(r, axis=1)
    solved = merging.solve_k_merge(M, S)[0][0]
    assert np.abs(solved[..., 1]).max() > 1e-3
    for coeffs in (solved, rng.standard_normal((r, head_dim // 2, 2))):
        rotated_members = np.asarray(model_lib.apply_rope(jnp.asarray(keys), positions, inv_freq))
        merge_then_rotate = np.asarray(model_lib.apply_rope(
            jnp.asarray(merging.apply_k_merge(coeffs, keys)[:, :, None].astype(np.float32)),
            positions, inv_freq))[:, :, 0]
        rotate_then_merge = merging.apply_k_merge(coeffs, rotated_members)
        np.testing.assert_allclose(merge_then_rotate, rotate_then_merge, atol=2e-5, rtol=2e-5)
        assert np.abs(rotate_then_merge).max() > 0.5
    # Negative control: a general head_dim x head_dim map per member does not commute.
    general = rng.standard_normal((r, head_dim, head_dim))
    merged = np.einsum("btlh,lhk->btk", keys, general)
    rotated = np.asarray(model_lib.apply_rope(jnp.asarray(keys), positions, inv_freq))
    a = np.asarray(model_lib.apply_rope(jnp.asarray(merged[:, :, None].astype(np.float32)),
                                        positions, inv_freq))[:, :, 0]
    b = np.einsum("btlh,lhk->btk", rotated, general)
    assert np.abs(a - b)[:, 1:].max() > 0.1


def _random_k_stats(rng, G, r, F, T=60):
    keys = rng.standard_normal((T, G, r, F, 2))
    w = rng.random((T, G, r))
    Mr = rng.standard_normal((G, r, F, 2, 2))
    M = Mr @ np.swapaxes(Mr, -1, -2)
    S = np.einsum("tgi,tglfp,tgmfq->gilmfpq", w, keys, keys)
    return keys, w, M, S


def test_k_closed_form_is_the_least_squares_optimum():
    """The K coefficients equal a generic least-squares solve of the explicit objective
    sum_i sum_u w_i(u) |L_i^T (k_i(u) - sum_l J(a_l, b_l) k_l(u))|^2 (M_i = L_i L_i^T)."""
    rng = np.random.default_rng(0)
    G, r, F = 2, 3, 4
    keys, w, M, S = _random_k_stats(rng, G, r, F)
    coeffs, degenerate, info = merging.solve_k_merge(M, S, ridge=0.0)
    assert not degenerate.any()
    for g, j in itertools.product(range(G), range(F)):
        rows, target = [], []
        for i in range(r):
            L = np.linalg.cholesky(M[g, i, j])
            for t in range(keys.shape[0]):
                k = keys[t, g, :, j]  # [r, 2]
                # Design columns (l, a) -> k_l, (l, b) -> rho k_l, rho = [[0, -1], [1, 0]].
                cols = []
                for l in range(r):
                    cols += [k[l], np.array([-k[l, 1], k[l, 0]])]
                design = np.stack(cols, axis=1)  # [2, 2r]
                rows.append(np.sqrt(w[t, g, i]) * L.T @ design)
                target.append(np.sqrt(w[t, g, i]) * L.T @ k[i])
        want = np.linalg.lstsq(np.concatenate(rows), np.concatenate(target), rcond=None)[0]
        np.testing.assert_allclose(coeffs[g, :, j].reshape(-1), want, rtol=1e-8, atol=1e-10)
    assert info["objective_fit"] < info["objective_mean"]


def test_k_merge_reduces_to_mean():
    rng = np.random.default_rng(1)
    G, r, F = 2, 4, 3
    mean = merging.mean_k_coeffs(r, F, G)
    keys, w, M, S = _random_k_stats(rng, G, r, F)
    # Equal weights: the same query moments for every member, and the same key weighting.
    M_equal = np.broadcast_to(M[:, :1], M.shape).copy()
    S_equal = np.einsum("tg,tglfp,tgmfq->glmfpq", w[:, :, 0], keys, keys)[:, None].repeat(r, 1)
    np.testing.assert_allclose(merging.solve_k_merge(M_equal, S_equal)[0], mean, atol=1e-12)
    # Identical members (a singular system), any query moments and weightings.
    same = np.repeat(keys[:, :, :1], r, axis=2)
    S_same = np.einsum("tgi,tglfp,tgmfq->gilmfpq", w, same, same)
    np.testing.assert_allclose(merging.solve_k_merge(M, S_same)[0], mean, atol=1e-12)
    # Unequal weights do move it (the two cases above are not vacuous).
    assert np.abs(merging.solve_k_merge(M, S)[0] - mean).max() > 1e-2


def test_k_merge_falls_back_to_mean_on_degenerate_statistics():
    rng = np.random.default_rng(2)
    G, r, F = 1, 2, 3
    _, _, M, S = _random_k_stats(rng, G, r, F)
    mean = merging.mean_k_coeffs(r, F, G)
    for M_bad, S_bad in ((np.zeros_like(M), S), (M, np.zeros_like(S)),
                         (M, np.where(np.arange(F)[:, None, None] == 1, np.nan, S))):
        coeffs, degenerate, info = merging.solve_k_merge(M_bad, S_bad)
        bad = degenerate[0]
        assert bad.any() and np.isfinite(coeffs).all()
        np.testing.assert_array_equal(coeffs[:, :, bad], mean[:, :, bad])


def test_v_merge_reduces_to_mean_and_follows_output_projections():
    rng = np.random.default_rng(3)
    num_kv, G, s, H, D = 4, 2, 2, 4, 6
    o_same = np.tile(rng.standard_normal((1, s, H, D)), (num_kv, 1, 1, 1)).reshape(-1, H, D)
    maps = merging.solve_v_merge(o_same, num_kv, G)
    np.testing.assert_allclose(maps, np.broadcast_to(np.eye(H) / 2, maps.shape), atol=1e-12)
    o = rng.standard_normal((num_kv * s, H, D))
    maps = merging.solve_v_merge(o, num_kv, G)
    np.testing.assert_allclose(maps.sum(axis=1), np.broadcast_to(np.eye(H), (G, H, H)),
                               atol=1e-12)  # identical members merge to themselves
    assert np.abs(maps - np.eye(H) / 2).max() > 1e-2
    zero = merging.solve_v_merge(np.zeros_like(o), num_kv, G)  # no output weights: the mean
    np.testing.assert_array_equal(zero, np.broadcast_to(np.eye(H) / 2, zero.shape))


# ----------------------------------------------------------------------------- statistics


def test_fit_statistics_match_a_direct_loop():
    """calibration._fit_stats against plain loops over (query, key) pairs with explicit 2x2 RoPE
    rotations, on a row holding two documents (segments) and a padding token."""
    rng = np.random.default_rng(4)
    D, N, K, H, T = 8, 4, 2, 4, 7
    F = H // 2
    G = 1
    h = rng.standard_normal((1, T, D)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 0, 1, 0]], np.int32)
    segments = np.array([[1, 1, 1, 1, 2, 2, 0]], np.int32)
    valid = segments > 0
    lp = {"q_proj": rng.standard_normal((D, N, H)), "k_proj": rng.standard_normal((D, K, H)),
          "v_proj": rng.standard_normal((D, K, H)), "q_bias": rng.standard_normal((N, H)),
          "k_bias": rng.standard_normal((K, H)), "v_bias": rng.standard_normal((K, H))}
    inv_freq = np.array([1.0, 0.3], np.float32)
    qm, km, vm = calibration._fit_stats(
        jnp.asarray(h), jnp.asarray(positions), jnp.asarray(segments), jnp.asarray(valid),
        {k: jnp.asarray(v, jnp.float32) for k, v in lp.items()}, jnp.asarray(inv_freq), G,
        with_values=True)
    gk, gv = calibration._gram_stats(jnp.asarray(h), jnp.asarray(valid),
                                     {k: jnp.asarray(v, jnp.float32) for k, v in lp.items()})

    q = np.einsum("td,dnh->tnh", h[0], lp["q_proj"]) + lp["q_bias"]  # [T, N, H]
    k = np.einsum("td,dnh->tnh", h[0], lp["k_proj"]) + lp["k_bias"]
    v = np.einsum("td,dnh->tnh", h[0], lp["v_proj"]) + lp["v_bias"]
    qr, kr = _rope_np(np.swapaxes(q, 0, 1), positions[0], inv_freq), \
        _rope_np(np.swapaxes(k, 0, 1), positions[0], inv_freq)  # [heads, T, H]
    s = N // K
    want_qm = np.zeros((K, F, 2, 2))
    weight = np.zeros((K, T))
    want_vm = np.zeros((N, K, K, H, H))  # G = 1: every KV head is in every head's group
    for n in range(N):
        for t in range(T):
            if not valid[0, t]:
                continue
            keys = [u for u in range(t + 1) if segments[0, u] == segments[0, t]]
            logits = np.array([qr[n, t] @ kr[n // s, u] for u in keys]) / np.sqrt(H)
            a = np.exp(logits - logits.max())
            a /= a.sum()
            z = np.einsum("u,ulh->lh", a, v[keys])  # [K, H] attention-averaged member values
            want_vm[n] += np.einsum("lh,mk->lmhk", z, z)
            for prob, u in zip(a, keys):
                weight[n // s, u] += prob
                for j in range(F):
                    phi = inv_freq[j] * (positions[0, u] - positions[0, t])
                    R = np.array([[np.cos(phi), -np.sin(phi)], [np.sin(phi), np.cos(phi)]])
                    qj = np.array([q[t, n, j], q[t, n, j + F]])
                    want_qm[n // s, j] += prob * R.T @ np.outer(qj, qj) @ R
    pairs = np.stack([k[..., :F], k[..., F:]], -1)  # [T, K, F, 2]
    want_km = np.einsum("ui,ulfp,umfq->ilmfpq", weight.T, pairs, pairs)
    np.testing.assert_allclose(np.asarray(qm), want_qm, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(np.asarray(km)[0], want_km, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(np.asarray(vm), want_vm, rtol=2e-4, atol=2e-4)
    m = valid[0]
    np.testing.assert_allclose(np.asarray(gk), np.einsum("tih,tjh->ij", k[m], k[m]), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(gv), np.einsum("tih,tjh->ij", v[m], v[m]), rtol=1e-4)


# ----------------------------------------------------------------------------- fit on models


def _split_heads_model(config, seed=5):
    """A model whose function-aware optimum is known: in each pair of heads (2g, 2g+1) the even
    head's queries use only the first half of the RoPE pairs and the odd head's the second half,
    and the even head's output projection reads only the first half of head_dim, the odd head's the
    second. The best merged head takes K pairs and V dims from whichever member uses them: every
    member's logits and outputs are then unchanged."""
    params = _params(config, seed=seed)
    F = config.head_dim // 2
    first = np.zeros(config.head_dim, bool)
    first[: F // 2] = first[F: F + F // 2] = True  # RoPE pairs 0 .. F/2-1 (both halves)
    low = np.arange(config.head_dim) < config.head_dim // 2
    for layer in range(config.num_layers):
        a = f"layers.{layer}.attn."
        for n in range(config.num_heads):
            keep_q = first if n % 2 == 0 else ~first
            params[a + "q_proj"][:, n, ~keep_q] = 0
            params[a + "q_bias"][n, ~keep_q] = 0
            keep_o = low if n % 2 == 0 else ~low
            params[a + "o_proj"][n, ~keep_o] = 0
    return params, first, low


def _known_optimum(params, config, first, low):
    out = {}
    for layer in range(config.num_layers):
        a = f"layers.{layer}.attn."
        for key, keep in (("k_proj", first), ("k_bias", first), ("v_proj", low),
                          ("v_bias", low)):
            w = params[a + key]
            axis = pooling.kv_param_head_axis(a + key)
            heads = np.moveaxis(w, axis, 0)  # [K, (D,) H]
            best = np.where(keep, heads[0::2], heads[1::2])
            out[a + key] = np.moveaxis(best, 0, axis)
    return out


def test_fit_finds_the_known_optimum_and_lowers_its_objective():
    config = CONFIG  # head_dim 8: RoPE pairs 0..3
    params, first, low = _split_heads_model(config)
    report = {}
    out, new_config = calibration.convert_params_calibrated(params, config, 2, "fit",
                                                            calib_tokens=_calib(6), report=report)
    optimum = _known_optimum(params, config, first, low)
    mean, _ = pooling.convert_params(params, config, 2, "mean")
    for name, best in optimum.items():
        fit_err = np.abs(out[name] - best).max()
        mean_err = np.abs(mean[name] - best).max()
        assert fit_err < 0.02 * mean_err, (name, fit_err, mean_err)  # the ridge's small pull
    toks = _tokens(seed=7)
    before = _logits(config, params, toks)
    fit_change = np.abs(_logits(new_config, out, toks) - before).max()
    mean_change = np.abs(_logits(new_config, mean, toks) - before).max()
    assert fit_change < 0.02 * mean_change, (fit_change, mean_change)
    for layer in report["layers"]:
        assert layer["objective_fit"] < 0.01 * layer["objective_mean"]


def test_fit_on_identical_heads_is_mean_and_lossless():
    config = CONFIG
    params = _planted_pairs_model(config, [[(0, 1), (2, 3)]] * 2)  # equal within contiguous groups
    out, new_config = calibration.convert_params_calibrated(params, config, 2, "fit",
                                                            calib_tokens=_calib())
    mean, _ = pooling.convert_params(params, config, 2, "mean")
    for name in mean:
        np.testing.assert_allclose(out[name], mean[name], rtol=1e-6, atol=1e-6)
    toks = _tokens()
    np.testing.assert_allclose(_logits(new_config, out, toks), _logits(config, params, toks),
                               atol=1e-4, rtol=1e-4)


def test_fit_o_separates_values_in_disjoint_subspaces():
    """Known optimum of 'fit_o': K heads equal within each group (attention unchanged) and the two
    members' values in complementary halves of head_dim. The merged value then holds both members'
    values (an invertible mix), and re-fitted output projections read each member's back exactly;
    'fit' alone (output projections kept) cannot."""
    config = CONFIG
    params = _planted_pairs_model(config, [[(0, 1), (2, 3)]] * 2)  # K/V equal in groups ...
    low = np.arange(config.head_dim) < config.head_dim // 2
    rng = np.random.default_rng(12)
    for layer in range(config.num_layers):
        a = f"layers.{layer}.attn."
        v = rng.standard_normal(params[a + "v_proj"].shape) / np.sqrt(config.d_model)
        v[:, 0::2, ~low] = 0  # ... except V: even members use the low half, odd the high half
        v[:, 1::2, low] = 0
        params[a + "v_proj"] = v.astype(np.float32)
        params[a + "v_bias"][0::2, ~low] = 0
        params[a + "v_bias"][1::2, low] = 0
    toks = _tokens(seed=13)
    before = _logits(config, params, toks)
    changes = {}
    for method in ("fit", "fit_o"):
        out, new_config = calibration.convert_params_calibrated(params, config, 2, method,
                                                                calib_tokens=_calib(14))
        changes[method] = np.abs(_logits(new_config, out, toks) - before).max()
    mean, _ = pooling.convert_params(params, config, 2, "mean")
    changes["mean"] = np.abs(_logits(new_config, mean, toks) - before).max()
    assert changes["fit_o"] < 0.02 * changes["mean"], changes
    assert changes["fit"] > 0.2 * changes["mean"], changes


def test_refit_o_keeps_projections_of_identical_members():
    rng = np.random.default_rng(15)
    N, K, G, H, D = 4, 4, 2, 4, 6
    o = rng.standard_normal((N, H, D))
    maps = merging.solve_v_merge(o, K, G)
    z = rng.standard_normal((50, H))
    Z = np.einsum("th,tk->hk", z, z)  # identical members: every z_nl is the same
    moments = np.broadcast_to(Z, (N, 2, 2, H, H))
    np.testing.assert_allclose(merging.refit_o(o, maps, moments), o, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(merging.refit_o(o, maps, np.zeros_like(moments)), o)


def test_too_little_calibration_data_falls_back_to_mean():
    config = CONFIG
    params = _params(config, seed=8)
    mean, _ = pooling.convert_params(params, config, 2, "mean")
    few = _tokens(1, merging.MIN_CALIB_TOKENS - 1)
    for method in ("fit", "fit_o", "similar+mean", "similar+fit"):
        report = {}
        out, _ = calibration.convert_params_calibrated(params, config, 2, method,
                                                       calib_tokens=few, report=report)
        assert "calibration_fallback" in report
        for name in mean:
            np.testing.assert_array_equal(out[name], mean[name])
    # Padding does not count: a long row that is mostly padding falls back too.
    seg = np.zeros((1, 256), np.int32)
    seg[0, :10] = 1
    report = {}
    calibration.convert_params_calibrated(params, config, 2, "fit", calib_tokens=_tokens(1, 256),
                                          segment_ids=seg, report=report)
    assert report["calibration_fallback"].startswith("10 calibration tokens")


def test_convert_params_calibrated_delegates_and_validates():
    config = CONFIG
    params = _params(config, seed=9)
    for method in pooling.METHODS:
        got, got_config = calibration.convert_params_calibrated(params, config, 2, method, seed=3)
        want, _ = pooling.convert_params(params, config, 2, method, seed=3)
        assert got_config == config.replace(num_kv_heads=2)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    # num_kv_heads == current: every calibrated method is the identity (up to float rounding).
    for method in ("similar+fit_o", "similar_weights+mean"):
        same, _ = calibration.convert_params_calibrated(params, config, 4, method,
                                                        calib_tokens=_calib())
        for name in params:
            np.testing.assert_allclose(same[name], params[name], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs calib_tokens"):
        calibration.convert_params_calibrated(params, config, 2, "fit")
    with pytest.raises(ValueError, match="outside the model's vocabulary of 257"):
        calibration.convert_params_calibrated(params, config, 2, "fit",
                                              calib_tokens=np.full((2, 40), 257))
    with pytest.raises(ValueError, match="num_kv_heads=3 does not divide"):
        calibration.convert_params_calibrated(params, config, 3, "similar_weights+mean")
    with pytest.raises(ValueError, match="is not one of"):
        calibration.convert_params_calibrated(params, config, 2, "similar+random")


def test_calibration_rows_are_deterministic_and_from_the_train_split(tmp_path):
    a = calibration.calibration_rows("byte", num_tokens=1024, seq_len=128, seed=0)
    b = calibration.calibration_rows("byte", num_tokens=1024, seq_len=128, seed=0)
    c = calibration.calibration_rows("byte", num_tokens=1024, seq_len=128, seed=1)
    assert a["inputs"].shape == (8, 128) and a["inputs"].dtype == np.int32
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["inputs"], c["inputs"])
    assert (a["segment_ids"] >= 1).all() and (a["positions"][:, 0] == 0).all()
    for i in range(3):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * 200)
    rows = calibration.calibration_rows("byte", str(tmp_path / "*.txt"), 512, 64, seed=0,
                                        val_fraction=0.0)
    text = bytes(rows["inputs"][rows["inputs"] < 256].astype(np.uint8).tolist())
    assert b"document" in text
    with pytest.raises(ValueError, match="less than one row"):
        calibration.calibration_rows("byte", num_tokens=10, seq_len=64)


# ----------------------------------------------------------------------------- command line


BYTE_CONFIG = CONFIG
CALIB_FLAGS = ["--calib_tokens=256", "--calib_seq_len=32"]  # 8 rows of 32, as _calib()


def test_cli_similar_fit_checkpoint(tmp_path, capsys):
    params = _params(BYTE_CONFIG, seed=10)
    src = str(tmp_path / "mha")
    checkpoints.save(src, params, checkpoints.Meta(BYTE_CONFIG, step=7,
                                                   provenance={"tokenizer": "byte"}))
    out = str(tmp_path / "gqa")
    code = convert.main([f"--input={src}", f"--output={out}", "--num_kv_heads=2",
                         "--method=similar+fit", "--seed=1", *CALIB_FLAGS])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "whole model loaded in memory" in stdout
    assert "calibration: 256 tokens (8 rows of 32) from stdlib (train split), tokenizer byte" in stdout
    assert "K logit error on calibration data" in stdout and "grouping cost" in stdout
    got, meta, _ = checkpoints.restore(out)
    assert meta.model_config.num_kv_heads == 2 and meta.source_step == 7
    assert meta.provenance["method"] == "similar+fit"
    assert meta.provenance["calibration"]["num_tokens"] == 256
    # The same conversion through the library, from the same calibration rows: identical.
    rows = calibration.calibration_rows("byte", "stdlib", 256, 32, seed=1)
    want, _ = calibration.convert_params_calibrated(
        params, BYTE_CONFIG, 2, "similar+fit", calib_tokens=rows["inputs"],
        segment_ids=rows["segment_ids"], positions=rows["positions"], seed=1)
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name]), want[name])


def test_cli_fit_o_hf_folder_runs_in_transformers(tmp_path, capsys):
    from _hf_helpers import hf_logits, jax_logits, make_hf_folder, tokens  # torch: only here

    src = make_hf_folder(tmp_path / "llama", vocab=260, num_heads=4, num_kv_heads=4)
    out = str(tmp_path / "out")
    # Without a tokenizer there is nothing to tokenize the calibration data with.
    assert convert.main([f"--input={src}", f"--output={out}", "--num_kv_heads=2",
                         "--method=fit", *CALIB_FLAGS]) == 1
    assert "has no tokenizer.json" in capsys.readouterr().err and not os.path.exists(out)
    write_byte_tokenizer(src)
    code = convert.main([f"--input={src}", f"--output={out}", "--num_kv_heads=2",
                         "--method=similar+fit_o", *CALIB_FLAGS])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "tokenizer.json" in stdout  # calibrated with the folder's own tokenizer
    with open(os.path.join(src, "config.json")) as f:
        before = json.load(f)
    with open(os.path.join(out, "config.json")) as f:
        after = json.load(f)
    assert after["num_key_value_heads"] == 2
    changed = {k for k in before if k != "num_key_value_heads" and before[k] != after.get(k)}
    assert not changed, changed
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    params, config = hf.load_hf_model(out)
    toks = tokens(2, 12, vocab=260)
    np.testing.assert_allclose(hf_logits(out, toks), jax_logits(params, config, toks),
                               atol=1e-4, rtol=1e-4)


def test_cli_refuses_bad_calibrated_input(tmp_path, capsys):
    params = _params(BYTE_CONFIG, seed=11)
    src = str(tmp_path / "mha")
    checkpoints.save(src, params, checkpoints.Meta(BYTE_CONFIG))
    out = tmp_path / "out"
    cases = [
        (["--method=similar+random"], 2, "invalid choice: 'similar+random'"),
        (["--method=fit", "--calib_tokens=10", "--calib_seq_len=32"], 1,
         "calibration needs seq_len >= 1 and num_tokens >= seq_len"),
        (["--method=fit", "--calib_data=" + str(tmp_path / "nothing*.txt")], 1, "nothing"),
        (["--method=fit", "--calib_tokenizer=" + str(tmp_path / "missing.json")], 1,
         "tokenizer"),
    ]
    for flags, code, message in cases:
        with pytest.raises(SystemExit) if code == 2 else _nothing():
            got = convert.main([f"--input={src}", f"--output={out}", "--num_kv_heads=2", *flags])
            assert got == code
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
        assert not out.exists()
        assert sorted(os.listdir(tmp_path)) == ["mha"]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

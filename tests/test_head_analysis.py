"""head_analysis: within-group cosine similarity and pooled-norm ratio of K/V heads, checked on
heads built to have known answers and against a plain loop."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from gqa_uptrain import head_analysis


def _params(k, v):
    return {"layers.0.attn.k_proj": k, "layers.0.attn.v_proj": v, "embed": np.zeros((3, 2))}


def test_identical_heads_have_cosine_one_and_ratio_one():
    rng = np.random.default_rng(0)
    head = rng.standard_normal((16, 1, 4))
    k = np.repeat(head, 8, axis=1)  # [d_model, 8 heads, head_dim], all equal
    [row] = head_analysis.analyse(_params(k, k), 2)
    assert row["layer"] == 0
    assert row["k_cosine"] == pytest.approx(1.0) and row["k_norm_ratio"] == pytest.approx(1.0)


def test_orthogonal_heads_have_cosine_zero_and_ratio_one_over_sqrt_r():
    # 8 heads of one-hot [d_model=8, head_dim=1] columns: mutually orthogonal, unit norm.
    k = np.eye(8).reshape(8, 8, 1)
    for g in (1, 2, 4):
        stats = head_analysis.group_stats(k, g)
        assert stats["cosine"] == pytest.approx(0.0, abs=1e-12)
        assert stats["norm_ratio"] == pytest.approx(1 / math.sqrt(8 // g))
    assert math.isnan(head_analysis.group_stats(k, 8)["cosine"])  # r = 1: no pairs
    assert head_analysis.group_stats(k, 8)["norm_ratio"] == 1.0


def test_random_heads_match_a_plain_loop():
    rng = np.random.default_rng(1)
    k = rng.standard_normal((12, 8, 3)) + 0.5  # correlated through the shared offset
    v = rng.standard_normal((12, 8, 3))
    rows = head_analysis.analyse({**_params(k, v), "layers.1.attn.k_proj": v,
                                  "layers.1.attn.v_proj": k}, 2)
    assert [r["layer"] for r in rows] == [0, 1]

    def plain(w, g):
        r = w.shape[1] // g
        cos, ratio = [], []
        for j in range(g):
            heads = [w[:, j * r + i, :].ravel() for i in range(r)]
            cos += [np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
                    for a, b in itertools.permutations(heads, 2)]
            ratio.append(np.linalg.norm(np.mean(heads, axis=0))
                         / np.mean([np.linalg.norm(h) for h in heads]))
        return np.mean(cos), np.mean(ratio)

    for key, w in (("k", k), ("v", v)):
        c, r = plain(w, 2)
        assert rows[0][f"{key}_cosine"] == pytest.approx(c, rel=1e-10)
        assert rows[0][f"{key}_norm_ratio"] == pytest.approx(r, rel=1e-10)
    assert rows[1]["k_cosine"] == pytest.approx(rows[0]["v_cosine"])
    assert rows[0]["k_cosine"] > 0.1 > abs(rows[0]["v_cosine"])  # the offset shows


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        head_analysis.analyse(_params(np.ones((4, 8, 2)), np.ones((4, 8, 2))), 3)
    with pytest.raises(ValueError, match="not this project's model"):
        head_analysis.analyse({"embed": np.ones((2, 2))}, 1)
    with pytest.raises(ValueError, match=r"layers \[0\] lack"):
        head_analysis.analyse({"layers.0.attn.k_proj": np.ones((4, 8, 2))}, 2)

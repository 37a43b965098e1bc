"""How alike the K/V heads of a group are, and what pooling does to their norms: the measurements
behind the conversion ablation (why `first` can beat `mean`).

For a flat params dict of this project's model (layers.{i}.attn.k_proj / v_proj, each
[d_model, K, head_dim]) and a target num_kv_heads G, the K heads of a layer fall into G contiguous
groups of r = K // G (pooling.group_heads: the grouping every conversion uses). Each head is one
vector (its [d_model, head_dim] slice, flattened), and per layer and projection:

  cosine      the mean over groups of the mean pairwise cosine similarity of a group's r heads
              (1: identical heads, where `mean` is exact; ~0: unrelated heads);
  norm_ratio  the mean over groups of |mean of the group| / (mean of its members' norms): 1 for
              identical heads, 1/sqrt(r) for r orthogonal heads of equal norm. Pooling by `mean`
              scales that head's keys (or values) by this factor, i.e. softens the attention
              logits (K) or shrinks the attention output (V); `first` and `mean_normed` keep the
              norm (ratio 1 by construction).

Plain numpy (no jax), like pooling.py.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from gqa_uptrain import pooling

PROJECTIONS = ("k_proj", "v_proj")
_PROJ = re.compile(r"^layers\.(\d+)\.attn\.(k_proj|v_proj)$")


def group_stats(w: np.ndarray, num_kv_heads: int, head_axis: int = 1) -> dict[str, float]:
    """cosine and norm_ratio (module docstring) of one projection, e.g. a k_proj
    [d_model, K, head_dim] (head_axis 1), pooled to num_kv_heads groups. r = 1 (no pooling)
    gives cosine nan (no pairs) and norm_ratio 1."""
    grouped = pooling.group_heads(np.asarray(w, np.float64), num_kv_heads, head_axis=head_axis)
    vectors = grouped.reshape(grouped.shape[0], grouped.shape[1], -1)  # [G, r, d_model * head_dim]
    r = vectors.shape[1]
    norms = np.linalg.norm(vectors, axis=-1)  # [G, r]
    unit = vectors / np.where(norms > 0, norms, 1.0)[..., None]
    gram = np.einsum("grd,gsd->grs", unit, unit)  # [G, r, r] cosines
    pairs = ~np.eye(r, dtype=bool)
    cosine = float(gram[:, pairs].mean()) if r > 1 else float("nan")
    pooled_norm = np.linalg.norm(vectors.mean(axis=1), axis=-1)  # [G]
    member_norm = norms.mean(axis=1)  # [G]
    ratio = np.divide(pooled_norm, member_norm, out=np.ones_like(pooled_norm),
                      where=member_norm > 0)
    return {"cosine": cosine, "norm_ratio": float(ratio.mean())}


def analyse(params: dict[str, Any], num_kv_heads: int) -> list[dict[str, Any]]:
    """Per layer (in order): {'layer': i, 'k_cosine', 'k_norm_ratio', 'v_cosine', 'v_norm_ratio'}
    for pooling the params' K/V heads to num_kv_heads groups (group_stats). params: the flat
    dict {'layers.0.attn.k_proj': [d_model, K, head_dim], ...}; other entries are ignored.
    ValueError if there is no k_proj/v_proj, or if num_kv_heads does not divide K."""
    layers: dict[int, dict[str, Any]] = {}
    for name, value in params.items():
        m = _PROJ.match(name)
        if m is None:
            continue
        stats = group_stats(np.asarray(value), num_kv_heads, head_axis=1)
        prefix = m.group(2)[0]  # 'k' | 'v'
        row = layers.setdefault(int(m.group(1)), {"layer": int(m.group(1))})
        row.update({f"{prefix}_cosine": stats["cosine"], f"{prefix}_norm_ratio": stats["norm_ratio"]})
    if not layers:
        raise ValueError("no layers.{i}.attn.k_proj / v_proj in the params: not this project's "
                         "model")
    missing = [i for i, row in layers.items() if len(row) != 5]
    if missing:
        raise ValueError(f"layers {missing} lack a k_proj or a v_proj")
    return [layers[i] for i in sorted(layers)]

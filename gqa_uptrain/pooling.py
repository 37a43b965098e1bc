"""Pooling K/V heads: multi-head (or grouped) attention -> fewer KV heads, as pure numpy functions.

The paper's method (Ainslie et al. 2023, arXiv 2305.13245): split the K key heads of a layer into
num_kv_heads contiguous groups of r = K // num_kv_heads heads (heads.pool_ratio) and replace each group by the mean
of its members; same for the value heads. Query and output projections are untouched. Grouping is
contiguous, as everywhere in this codebase: new KV head j pools old heads j*r .. j*r+r-1, so query head
n, which read old KV head n // (N // K), now reads new KV head n // (N // num_kv_heads) — the group
that contains its old KV head.

Methods (METHODS):
  mean    each new head is the mean of its group (the paper's method). Exact when the heads of a
          group are equal; the identity when num_kv_heads == K.
  first   each new head is the first head of its group (the paper's ablation).
  random  a fresh normal initialisation of the new heads (the paper's third baseline), seeded;
          biases become zeros. Drawn afresh even when num_kv_heads == K.
  mean_normed  the mean rescaled to its members' average norm (each head's tensor slice, e.g. a
          k_proj head's [d_model, head_dim], as one vector): a control for `mean`. Averaging r
          nearly unrelated heads shrinks the norm by about 1/sqrt(r) (softer attention, smaller
          values); this keeps the mean's direction and undoes only that shrinkage
          (head_analysis.py measures both). Equal to `mean` when a group's heads are equal; a zero
          mean stays zero.

This module is plain numpy (no jax, no torch) so that the Hugging Face -> Hugging Face path can use it
on one tensor at a time. Arithmetic is in float32, or float64 for float64 tensors, and the result is
cast back to the input's dtype (bfloat16 through ml_dtypes, round to nearest even).

New methods register in _POOLERS; a method gets the tensor with the head axis moved to the front,
viewed as [num_kv_heads, pool_ratio, ...], and returns [num_kv_heads, ...].
"""

from __future__ import annotations

import math
import re
import zlib
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from gqa_uptrain import heads

if TYPE_CHECKING:  # model.py imports jax; this module must not (the HF -> HF path is jax-free).
    from gqa_uptrain.model import ModelConfig

METHODS = ("mean", "first", "random", "mean_normed")

# Flat param names of this project's model that carry KV heads, and their head axis.
#   k_proj, v_proj [d_model, num_kv_heads, head_dim] -> axis 1;  k_bias, v_bias [num_kv_heads, head_dim] -> 0.
_KV_PARAM = re.compile(r"^layers\.(\d+)\.attn\.(k_proj|v_proj|k_bias|v_bias)$")
_KV_HEAD_AXIS = {"k_proj": 1, "v_proj": 1, "k_bias": 0, "v_bias": 0}


def converter_version() -> str:
    """This package's version, recorded by every conversion."""
    try:
        from importlib.metadata import version  # noqa: PLC0415

        return f"gqa_uptrain {version('gqa_uptrain')}"
    except Exception:  # noqa: BLE001 (not installed: running from a source tree)
        return "gqa_uptrain (source tree)"


def conversion_record(method: str, seed: int, num_kv_heads_before: int,
                      num_kv_heads_after: int) -> dict[str, Any]:
    """What every conversion records about itself (a checkpoint's or HF folder's provenance):
    the converter's version, the method and its seed, the KV heads before and after."""
    return {"converter": converter_version(), "method": method, "seed": seed,
            "num_kv_heads_before": num_kv_heads_before, "num_kv_heads_after": num_kv_heads_after}


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype == np.float64:
        return np.dtype(np.float64)
    if dtype.kind == "f" or dtype.name in ("bfloat16",) or dtype.name.startswith("float8"):
        return np.dtype(np.float32)
    raise ValueError(f"cannot pool a tensor of dtype {dtype.name}: K/V weights must be floating point")


def _pool_mean(grouped: np.ndarray, **_) -> np.ndarray:
    return grouped.astype(_compute_dtype(grouped.dtype)).mean(axis=1)


def _head_norms(grouped: np.ndarray) -> np.ndarray:
    """[G, r, ...] -> [G, r]: each member head's norm over all its other axes."""
    x = grouped.astype(_compute_dtype(grouped.dtype))
    return np.sqrt(np.square(x).reshape(x.shape[:2] + (-1,)).sum(axis=-1))


def _pool_mean_normed(grouped: np.ndarray, **_) -> np.ndarray:
    mean = _pool_mean(grouped)  # [G, ...]
    pooled_norm = np.sqrt(np.square(mean).reshape(mean.shape[0], -1).sum(axis=-1))  # [G]
    target = _head_norms(grouped).mean(axis=1)  # [G]: the members' average norm
    scale = np.divide(target, pooled_norm, out=np.ones_like(target), where=pooled_norm > 0)
    return mean * scale.reshape((-1,) + (1,) * (mean.ndim - 1))


def _pool_first(grouped: np.ndarray, **_) -> np.ndarray:
    return grouped[:, 0]


def _pool_random(grouped: np.ndarray, *, seed: int, init_std: float | None, is_bias: bool) -> np.ndarray:
    shape = (grouped.shape[0],) + grouped.shape[2:]
    compute = _compute_dtype(grouped.dtype)
    if is_bias:
        return np.zeros(shape, compute)
    if init_std is None:
        # Match the scale of the weights being replaced.
        init_std = float(np.std(grouped.astype(compute)))
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float64).astype(compute) * init_std


_POOLERS: dict[str, Callable[..., np.ndarray]] = {
    "mean": _pool_mean,
    "first": _pool_first,
    "random": _pool_random,
    "mean_normed": _pool_mean_normed,
}
assert tuple(_POOLERS) == METHODS


def group_heads(w: np.ndarray, num_kv_heads: int, *, head_axis: int) -> np.ndarray:
    """The contiguous groups of w's K heads: [num_kv_heads, r, ...rest] with r = K // num_kv_heads
    and rest = w's other axes in order; group j holds heads j*r .. j*r+r-1 (the one grouping of
    this codebase). A view where numpy can make one. ValueError (heads.pool_ratio) unless
    num_kv_heads divides K."""
    w = np.asarray(w)
    front = np.moveaxis(w, head_axis % w.ndim, 0)
    ratio = heads.pool_ratio(front.shape[0], num_kv_heads)
    return front.reshape((num_kv_heads, ratio) + front.shape[1:])


def pool_kv_heads(w: np.ndarray, num_kv_heads: int, method: str = "mean", *, head_axis: int,
                  seed: int = 0, init_std: float | None = None, is_bias: bool | None = None) -> np.ndarray:
    """Pools the K heads along `head_axis` of `w` into num_kv_heads contiguous groups.

    w: any array with the head axis of size K, e.g. this project's k_proj [d_model, K, head_dim]
      (head_axis=1), a bias [K, head_dim] (head_axis=0), or a Hugging Face k_proj.weight viewed as
      [K, head_dim, d_model] (head_axis=0). Returns w's shape with K replaced by num_kv_heads, in w's
      dtype.
    method: one of METHODS. seed / init_std: for 'random' only — init_std None means the standard
      deviation of `w` itself. is_bias: 'random' gives zeros for biases; None means "w has no axis
      besides the head axis and one more" (a [K, head_dim] bias), which callers with other layouts
      should pass explicitly.
    Raises ValueError naming both numbers if num_kv_heads < 1, > K, or does not divide K.
    """
    if method not in _POOLERS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    w = np.asarray(w)
    head_axis = head_axis % w.ndim
    if is_bias is None:
        is_bias = w.ndim <= 2 and head_axis == 0
    grouped = group_heads(w, num_kv_heads, head_axis=head_axis)  # [G, r, ...]
    pooled = _POOLERS[method](grouped, seed=seed, init_std=init_std, is_bias=is_bias)  # [G, ...]
    return np.ascontiguousarray(np.moveaxis(pooled.astype(w.dtype), 0, head_axis))


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed from the run's seed and the tensor's name, so 'random' does not depend on
    the order tensors are visited in (the streaming HF path visits them shard by shard)."""
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])


def kv_param_head_axis(name: str) -> int | None:
    """Head axis of a KV-carrying param of this project's model ('layers.3.attn.k_proj' -> 1), else None."""
    m = _KV_PARAM.match(name)
    return None if m is None else _KV_HEAD_AXIS[m.group(2)]


def convert_params(params: dict[str, Any], config: "ModelConfig", num_kv_heads: int,
                   method: str = "mean", seed: int = 0) -> tuple[dict[str, np.ndarray], "ModelConfig"]:
    """Pools every layer's K/V heads of this project's flat params from config.num_kv_heads to num_kv_heads.

    params: {dotted name: array} (see model.py): layers.{i}.attn.k_proj / v_proj [d_model, K, head_dim]
      and k_bias / v_bias [K, head_dim] become [..., num_kv_heads, ...]; every other param is passed
      through unchanged (as a numpy array). 'random' draws N(0, 1/d_model) like model.py's init, with
      a seed per tensor name (tensor_seed), and zero biases.
    Returns (new params, config.replace(num_kv_heads=num_kv_heads)).
    """
    if method not in _POOLERS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    heads.pool_ratio(config.num_kv_heads, num_kv_heads)
    new_config = config.replace(num_kv_heads=num_kv_heads)
    init_std = 1.0 / math.sqrt(config.d_model)
    out = {}
    for name, value in params.items():
        value = np.asarray(value)
        axis = kv_param_head_axis(name)
        if axis is None:
            out[name] = value
            continue
        if value.shape[axis] != config.num_kv_heads:
            raise ValueError(f"{name} has shape {value.shape} but the config has "
                             f"num_kv_heads={config.num_kv_heads} on axis {axis}")
        out[name] = pool_kv_heads(value, num_kv_heads, method, head_axis=axis,
                                  seed=tensor_seed(seed, name), init_std=init_std,
                                  is_bias=name.endswith("_bias"))
    return out, new_config


def kv_projection_params(num_layers: int, d_model: int, num_kv_heads: int, head_dim: int,
                         bias: bool) -> int:
    """Parameters of the K and V projections (and their biases) over all layers."""
    per_head = d_model * head_dim + (head_dim if bias else 0)
    return 2 * num_layers * num_kv_heads * per_head

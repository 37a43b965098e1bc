"""Initial params placed straight into their shardings: each process reads only the slices its
devices hold, and no path puts a whole model on one device or in one host's memory.

    params, config = sharded_init.load(source, mesh, param_dtype="float32",
                                       num_kv_heads=8, method="mean", seed=0)

Sources (loading.inspect's Source):
  checkpoint  orbax restores every param straight into the partition rules' shardings of the
              source's shapes (sharding.param_shardings), each process reading its shards;
  hf          every safetensors tensor is a read-only numpy memory map viewed in this project's
              layout (hf.py's transforms are transposes and reshapes: views), and
              jax.make_array_from_callback asks each process for its devices' slices only, so a
              process reads the pages of its slices.
Both are cast to param_dtype on device. GGUF files are dequantized whole tensors at a time on the
host (gguf_io.py): they take the host path (loading.load).

K/V pooling to num_kv_heads then runs on device (pool_on_device), in the target's shardings. Where
the tensor axis splits KV heads (num_kv_heads divisible by it), a group of source heads never crosses
a shard boundary — groups are contiguous and the source's K heads are split the same way — so
'mean' and 'first' are local; otherwise XLA moves what the group needs. 'mean_normed' needs each
member head's norm over d_model, which fsdp splits: one all-reduce of [G, r] norms. 'random' draws
each tensor on the host from its per-tensor seed (pooling.tensor_seed), so it is the same on any
mesh, and each process keeps its slices. The values equal loading.convert's host path ('mean',
'first', 'random' bit for bit: the same float32 sums in the same order; 'mean_normed' to float32
rounding of the norms). Methods that need calibration (merging.py) are host-only by design.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gqa_uptrain import checkpoints, hf, heads, pooling, sharding
from gqa_uptrain.model import ModelConfig, abstract_params

POOLING_ON_DEVICE = ("mean", "first", "random", "mean_normed")


def hf_views(folder: str) -> dict[str, Any]:
    """{project name: a function returning a read-only memory-mapped view of that tensor in the
    project's layout} of an HF folder (the same checks as hf.load_hf_model; nothing is read but
    headers). A view is opened when its tensor is placed and dropped right after, so the pages a
    process maps stay one tensor's slices at a time (they count in its resident size)."""
    hf_config = hf.read_hf_config(folder)
    layout = hf.hf_layout(hf_config)
    tensors, _, _ = hf.weight_tensors(folder)
    hf.check_tensors(tensors, layout)
    table = {t.hf: t for t in layout.tensors()}

    def opener(info, row):
        def view() -> np.ndarray:
            raw = np.memmap(info.path, dtype=hf.numpy_dtype(info.dtype), mode="r",
                            offset=info.offset, shape=info.shape)
            return row.to_project(raw, layout)
        return view

    # Not in the table: rotary buffers and a tied lm_head.weight (load_hf_model drops them too).
    return {table[n].project: opener(info, table[n].row) for n, info in tensors.items()
            if n in table}


def _place(views: dict[str, Any], shapes, shardings: dict[str, Any], dtype
           ) -> dict[str, jax.Array]:
    out = {}
    for name, sh in shardings.items():
        view = views[name]()
        if tuple(view.shape) != tuple(shapes[name].shape):
            raise ValueError(f"{name}: the folder's tensor has shape {tuple(view.shape)}, the "
                             f"config {tuple(shapes[name].shape)}")
        out[name] = jax.make_array_from_callback(
            view.shape, sh, lambda index, view=view: np.asarray(view[index]).astype(dtype))
        del view  # unmaps once the callbacks are done (make_array_from_callback ran them)
    return out


def _cast(params: dict[str, jax.Array], shardings, dtype) -> dict[str, jax.Array]:
    return jax.jit(lambda p: {k: v.astype(dtype) for k, v in p.items()},
                   out_shardings=shardings)(params)


def source_params(source, mesh, param_dtype: str) -> tuple[dict[str, jax.Array], ModelConfig]:
    """The source's params (per-layer names, its own K heads) placed by the partition rules on
    `mesh`, cast to param_dtype; each process reads only its shards."""
    config = source.config.replace(param_dtype=param_dtype)
    shapes = abstract_params(source.config)
    shardings = sharding.param_shardings(shapes, mesh)
    dtype = jnp.dtype(param_dtype)
    if source.format == "checkpoint":
        params, _, _ = checkpoints.restore(source.path, param_shardings=shardings)
        return _cast(params, shardings, dtype), config
    if source.format == "hf":
        views = hf_views(source.path)
        missing, unexpected = sorted(set(shapes) - set(views)), sorted(set(views) - set(shapes))
        if missing or unexpected:
            raise ValueError(f"params of {source.path} do not match the model: missing "
                             f"{missing[:8]}, unexpected {unexpected[:8]}")
        return _place(views, shapes, shardings, dtype), config
    raise ValueError(f"{source.format} sources are not read per shard (host path: loading.load)")


# ----------------------------------------------------------------------------- pooling on device


def _group_mean(grouped: jax.Array) -> jax.Array:
    """[G, r, ...] -> [G, ...]: float32 sum of the r members in order, then / r (numpy's
    mean over a non-contiguous axis: the same operations, so the same bits)."""
    x = grouped.astype(jnp.float32)
    total = x[:, 0]
    for j in range(1, x.shape[1]):
        total = total + x[:, j]
    return total / x.shape[1]


def _pool_grouped(grouped: jax.Array, method: str) -> jax.Array:
    if method == "first":
        return grouped[:, 0].astype(jnp.float32)
    mean = _group_mean(grouped)
    if method == "mean":
        return mean
    # mean_normed: the mean rescaled to the members' average norm (pooling._pool_mean_normed).
    x = grouped.astype(jnp.float32)
    member_norms = jnp.sqrt(jnp.sum(jnp.square(x).reshape(x.shape[:2] + (-1,)), axis=-1))
    pooled_norm = jnp.sqrt(jnp.sum(jnp.square(mean).reshape(mean.shape[0], -1), axis=-1))
    target = jnp.mean(member_norms, axis=1)
    scale = jnp.where(pooled_norm > 0, target / jnp.where(pooled_norm > 0, pooled_norm, 1.0), 1.0)
    return mean * scale.reshape((-1,) + (1,) * (mean.ndim - 1))


def _pool_tensor(w: jax.Array, num_kv_heads: int, head_axis: int, method: str) -> jax.Array:
    front = jnp.moveaxis(w, head_axis, 0)
    ratio = heads.pool_ratio(front.shape[0], num_kv_heads)
    grouped = front.reshape((num_kv_heads, ratio) + front.shape[1:])
    return jnp.moveaxis(_pool_grouped(grouped, method).astype(w.dtype), 0, head_axis)


def _random_tensor(name: str, shape: tuple[int, ...], dtype, sh, *, seed: int, init_std: float,
                   is_bias: bool) -> jax.Array:
    @functools.cache
    def full() -> np.ndarray:  # one draw per process, sliced for each local device
        if is_bias:
            return np.zeros(shape, dtype)
        rng = np.random.default_rng(pooling.tensor_seed(seed, name))
        # pooling._pool_random's draw: [G, ...rest] in float64, to float32, times the std.
        axis = pooling.kv_param_head_axis(name)
        front = (shape[axis],) + tuple(d for i, d in enumerate(shape) if i != axis)
        draw = rng.standard_normal(front, dtype=np.float64).astype(np.float32) * init_std
        return np.moveaxis(draw, 0, axis).astype(dtype)

    return jax.make_array_from_callback(shape, sh, lambda index: full()[index])


def pool_on_device(params: dict[str, jax.Array], config: ModelConfig, num_kv_heads: int,
                   method: str, seed: int, mesh) -> tuple[dict[str, jax.Array], ModelConfig]:
    """pooling.convert_params on placed arrays: the result placed by the partition rules of the
    pooled shapes on `mesh`."""
    if method not in POOLING_ON_DEVICE:
        raise ValueError(f"method={method!r} does not pool on device (one of {POOLING_ON_DEVICE})")
    heads.pool_ratio(config.num_kv_heads, num_kv_heads)
    new_config = config.replace(num_kv_heads=num_kv_heads)
    new_shapes = abstract_params(new_config)
    shardings = sharding.param_shardings(new_shapes, mesh)
    kv = {n: pooling.kv_param_head_axis(n) for n in params}
    kv = {n: a for n, a in kv.items() if a is not None}
    out = {n: v for n, v in params.items() if n not in kv}
    if method == "random":
        init_std = 1.0 / math.sqrt(config.d_model)
        for name in kv:
            out[name] = _random_tensor(name, tuple(new_shapes[name].shape), params[name].dtype,
                                       shardings[name], seed=seed,
                                       init_std=init_std, is_bias=name.endswith("_bias"))
        return out, new_config
    pooled = jax.jit(
        lambda p: {n: _pool_tensor(p[n], num_kv_heads, kv[n], method) for n in kv},
        out_shardings={n: shardings[n] for n in kv})({n: params[n] for n in kv})
    out.update(pooled)
    return out, new_config


def load(source, mesh, *, param_dtype: str, num_kv_heads: int = -1, method: str = "mean",
         seed: int = 0) -> tuple[dict[str, jax.Array], ModelConfig, dict[str, Any] | None]:
    """(params placed on `mesh` by the partition rules, per-layer names; ModelConfig; the
    conversion record or None). num_kv_heads -1 keeps the source's heads."""
    params, config = source_params(source, mesh, param_dtype)
    if num_kv_heads == -1:
        return params, config, None
    record = pooling.conversion_record(method, seed, config.num_kv_heads, num_kv_heads)
    params, config = pool_on_device(params, config, num_kv_heads, method, seed, mesh)
    return params, config, record



@dataclasses.dataclass(frozen=True)
class Deferred:
    """An init source the trainer places once its mesh exists (load(...) with these arguments);
    `config` is the ModelConfig the load will return (known without reading an array)."""

    source: Any  # loading.Source
    config: ModelConfig
    param_dtype: str
    num_kv_heads: int
    method: str
    seed: int

    def load(self, mesh) -> dict[str, jax.Array]:
        params, config, _ = load(self.source, mesh, param_dtype=self.param_dtype,
                                 num_kv_heads=self.num_kv_heads, method=self.method,
                                 seed=self.seed)
        assert config == self.config, (config, self.config)
        return params


def deferred(source, *, param_dtype: str, num_kv_heads: int = -1, method: str = "mean",
             seed: int = 0) -> tuple[Deferred | None, dict[str, Any] | None]:
    """(Deferred, conversion record or None) for a source this module reads per shard — a
    checkpoint or an HF folder, kept or pooled by a POOLING_ON_DEVICE method — else (None, None):
    the host path (GGUF; the calibrated methods). Checks the head counts now (ValueError), before
    anything is read."""
    if source.format not in ("checkpoint", "hf"):
        return None, None
    if num_kv_heads != -1 and method not in POOLING_ON_DEVICE:
        return None, None
    config = source.config.replace(param_dtype=param_dtype)
    record = None
    if num_kv_heads != -1:
        heads.pool_ratio(config.num_kv_heads, num_kv_heads)
        record = pooling.conversion_record(method, seed, config.num_kv_heads, num_kv_heads)
        config = config.replace(num_kv_heads=num_kv_heads)
    return Deferred(source, config, param_dtype, num_kv_heads, method, seed), record

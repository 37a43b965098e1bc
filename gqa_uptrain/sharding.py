"""Device mesh and parameter partitioning by name.

The mesh has three axes, all of jax's Auto type (XLA propagates shardings; with Explicit axes
nnx.Embed's gather failed with a ShardingTypeError, seen on jax 0.10.2):
  data    pure data parallelism: params replicated, batch split.
  fsdp    batch split too, and every parameter's d_model dimension split (ZeRO-3 style: XLA gathers
          a layer's weights just before it uses them).
  tensor  Megatron-style model parallelism over heads and the MLP's hidden dimension.
The batch is split over data x fsdp.

Rules (first match wins; a name matching none is replicated):
  embed            [vocab, d_model]                  (tensor, fsdp)
  lm_head          [d_model, vocab]                  (fsdp, tensor)
  *.q_proj         [d_model, num_heads, head_dim]    (fsdp, tensor, -)
  *.k_proj/v_proj  [d_model, num_kv_heads, head_dim] (fsdp, tensor, -)
  *.o_proj         [num_heads, head_dim, d_model]    (tensor, -, fsdp)
  *.q/k/v_bias     [heads, head_dim]                 (tensor, -)
  *.gate/up_proj   [d_model, mlp_dim]                (fsdp, tensor)
  *.down_proj      [mlp_dim, d_model]                (tensor, fsdp)
  norms' scale, o_bias                               replicated
Stacked layers (layer_stack.py: 'layers.attn.k_proj' [num_layers, ...], the trainer's layout with
scan_layers) follow the same rule for their per-layer dimensions; the layer axis is replicated (each
device holds its shard of every layer, as ZeRO-3 over layers does).
A dimension is split over an axis only when the axis size divides it; otherwise that dimension is
replicated over the axis. In particular, when num_kv_heads is smaller than the tensor axis (or does
not divide by it), k_proj/v_proj (and their biases) are replicated over `tensor`: every tensor shard
holds all KV heads and computes K/V redundantly, while the query heads stay split. That is correct
and costs num_kv_heads * head_dim * d_model extra parameter memory per tensor shard; GQA keeps K/V
small, so the cost is small. The KV *cache* at decode time is not affected by these rules.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from gqa_uptrain import layer_stack

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

_RULES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"^embed$", ("tensor", "fsdp")),
    (r"^lm_head$", ("fsdp", "tensor")),
    (r"\.attn\.(q|k|v)_proj$", ("fsdp", "tensor", None)),
    (r"\.attn\.o_proj$", ("tensor", None, "fsdp")),
    (r"\.attn\.(q|k|v)_bias$", ("tensor", None)),
    (r"\.mlp\.(gate|up)_proj$", ("fsdp", "tensor")),
    (r"\.mlp\.down_proj$", ("tensor", "fsdp")),
]


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Resolves one -1 entry to the devices left over; raises ValueError if they do not multiply
    to num_devices."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh data={data}, fsdp={fsdp}, tensor={tensor}: at most one may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh data={data}, fsdp={fsdp}, tensor={tensor}: sizes must be >= 1 or -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh data={data}, fsdp={fsdp}, tensor={tensor}: {num_devices} "
                             f"devices are not divisible by {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh data={data}, fsdp={fsdp}, tensor={tensor} needs "
                         f"{math.prod(sizes)} devices; there are {num_devices}")
    return tuple(sizes)


def make_mesh(data: int, fsdp: int, tensor: int, devices=None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over all devices (of all processes), Auto axis types."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def partition_spec(name: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The PartitionSpec of param `name` with `shape` (see the module docstring for the rules)."""
    if layer_stack.is_stacked_name(name):
        return P(None, *_rule_spec(name, tuple(shape[1:]), mesh))
    return _rule_spec(name, shape, mesh)


def _rule_spec(name: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    for pattern, axes in _RULES:
        if re.search(pattern, name):
            if len(axes) != len(shape):
                raise ValueError(f"partition rule {pattern!r} has {len(axes)} dims; param {name!r} "
                                 f"has shape {shape}")
            return P(*(a if a is not None and dim % mesh.shape[a] == 0 else None
                       for a, dim in zip(axes, shape)))
    return P()


def param_shardings(shapes: dict[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
    """{name: NamedSharding} for a flat params dict (arrays or ShapeDtypeStructs)."""
    return {name: NamedSharding(mesh, partition_spec(name, tuple(x.shape), mesh))
            for name, x in shapes.items()}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_spec(leading_axes: int = 0) -> P:
    """Batch arrays [*leading, batch, seq]: the batch dim split over data x fsdp."""
    return P(*([None] * leading_axes), BATCH_AXES)


def batch_divisor(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def put_global(host_array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array every process holds in full (multi-host safe: each process
    places only its addressable shards)."""
    host_array = np.asarray(host_array)
    return jax.make_array_from_callback(host_array.shape, sharding, lambda idx: host_array[idx])


def put_params(params: dict[str, Any], shardings: dict[str, NamedSharding]) -> dict[str, jax.Array]:
    return {name: put_global(np.asarray(v), shardings[name]) for name, v in params.items()}


def make_global_batch(shape: tuple[int, ...], sharding: NamedSharding,
                      rows_fn: Callable[[np.ndarray], dict[str, np.ndarray]],
                      keys: tuple[str, ...]) -> dict[str, jax.Array]:
    """Global batch arrays of `shape` ([..., batch, seq], batch on axis -2) where each process
    builds only the rows its devices hold: rows_fn(global row ids) -> {key: [rows, seq] array}.

    Leading axes (gradient accumulation's micro-batches) are flattened into the row id:
    row = micro * batch + i.
    """
    cache: dict[tuple, dict[str, np.ndarray]] = {}
    seq = shape[-1]

    def rows_for(index):
        # index: a tuple of slices, one per dim; materialise those global rows once for all keys.
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in cache:
            grids = np.meshgrid(*[np.arange(n)[s] for n, s in zip(shape[:-1], index[:-1])],
                                indexing="ij")
            flat = np.zeros(grids[0].shape, np.int64)
            for g, n in zip(grids, shape[:-1]):
                flat = flat * n + g
            rows = rows_fn(flat.ravel())
            cache[key] = {k: v.reshape(flat.shape + (seq,))[..., index[-1]] for k, v in rows.items()}
        return cache[key]

    return {k: jax.make_array_from_callback(shape, sharding, lambda idx, k=k: rows_for(idx)[k])
            for k in keys}

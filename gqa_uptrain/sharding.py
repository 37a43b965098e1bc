"""Device mesh, and one set of logical-axis rules for parameters and activations.

The mesh has three axes, all of jax's Auto type (XLA propagates shardings; with Explicit axes
nnx.Embed's gather failed with a ShardingTypeError, seen on jax 0.10.2):
  data    pure data parallelism: params replicated, batch split.
  fsdp    batch split too, and every parameter's d_model dimension split (ZeRO-3 style: XLA gathers
          a layer's weights just before it uses them).
  tensor  Megatron-style model parallelism over heads and the MLP's hidden dimension.

Every array dimension that matters gets a logical name, and LOGICAL_RULES maps each name to mesh
axes (MaxText's logical_axis_rules, levanter's axis mapping): the one table below decides how both
the parameters and the activations are laid out.

  logical name    mesh axes        what it names
  batch           (data, fsdp)     sequences of a batch (activations)
  seq             -                positions (activations; no sequence parallelism)
  act_embed       -                d_model of an activation (the residual stream)
  heads           tensor           query heads (q_proj, o_proj, attention activations)
  kv_heads        tensor           KV heads (k_proj, v_proj, K/V activations)
  head_dim        -
  mlp             tensor           the MLP's hidden dimension
  vocab           tensor           the vocabulary (embed, lm_head, logits)
  embed           fsdp             d_model of a parameter: ZeRO-3's split
  layers          -                the stacked layer axis (layer_stack.py), scanned over

Parameters get their logical names from PARAM_AXES (first match wins; a name matching none, the
norms' scales and o_bias, is replicated):
  embed            [vocab, d_model]                  (vocab, embed)
  lm_head          [d_model, vocab]                  (embed, vocab)
  *.q_proj         [d_model, num_heads, head_dim]    (embed, heads, head_dim)
  *.k_proj/v_proj  [d_model, num_kv_heads, head_dim] (embed, kv_heads, head_dim)
  *.o_proj         [num_heads, head_dim, d_model]    (heads, head_dim, embed)
  *.q_bias         [num_heads, head_dim]             (heads, head_dim)
  *.k/v_bias       [num_kv_heads, head_dim]          (kv_heads, head_dim)
  *.gate/up_proj   [d_model, mlp_dim]                (embed, mlp)
  *.down_proj      [mlp_dim, d_model]                (mlp, embed)
Stacked layers ('layers.attn.k_proj' [num_layers, ...], the trainer's layout with scan_layers) get
`layers` in front. Activations are constrained where the model makes them (`constrain`, on the
mesh of the step's `jax.set_mesh`): the embedding output, each block's residual stream, q/k/v and
the attention output, the MLP's hidden activations and the final hidden states, so XLA keeps every
activation split by batch and per-device activation memory follows the per-device batch, not the
global one (without them the compiled step gathered global-batch activations such as
f32[8, 2048, 4096] over fsdp).

A dimension is split over an axis only when the axis size divides it; otherwise that dimension is
replicated over the axis. In particular, when num_kv_heads is smaller than the tensor axis (or does
not divide by it), k_proj/v_proj (and their biases, and the K/V activations) are replicated over
`tensor`: every tensor shard holds all KV heads and computes K/V redundantly, while the query heads
stay split. That is correct and costs num_kv_heads * head_dim * d_model extra parameter memory per
tensor shard; GQA keeps K/V small, so the cost is small. The KV *cache* at decode time is not
affected by these rules.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from gqa_uptrain import layer_stack

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis name -> mesh axes (None: replicated). The module docstring's table.
LOGICAL_RULES: dict[str, tuple[str, ...] | str | None] = {
    "batch": BATCH_AXES,
    "seq": None,
    "act_embed": None,
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "embed": "fsdp",
    "layers": None,
}

PARAM_AXES: list[tuple[str, tuple[str, ...]]] = [
    (r"^embed$", ("vocab", "embed")),
    (r"^lm_head$", ("embed", "vocab")),
    (r"\.attn\.q_proj$", ("embed", "heads", "head_dim")),
    (r"\.attn\.(k|v)_proj$", ("embed", "kv_heads", "head_dim")),
    (r"\.attn\.o_proj$", ("heads", "head_dim", "embed")),
    (r"\.attn\.q_bias$", ("heads", "head_dim")),
    (r"\.attn\.(k|v)_bias$", ("kv_heads", "head_dim")),
    (r"\.mlp\.(gate|up)_proj$", ("embed", "mlp")),
    (r"\.mlp\.down_proj$", ("mlp", "embed")),
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


def logical_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """The PartitionSpec of an array whose dimensions have these logical names (None: not split),
    by LOGICAL_RULES; a dimension the mapped mesh axes do not divide is replicated."""
    if len(names) != len(shape):
        raise ValueError(f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
    if all(n is None for n in names):
        return P()
    spec = []
    for name, dim in zip(names, shape):
        axes = LOGICAL_RULES[name] if name is not None else None
        if axes is not None:
            size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
            if dim % size:
                axes = None
        spec.append(axes)
    return P(*spec)


def param_logical_axes(name: str, ndim: int) -> tuple[str | None, ...]:
    """Logical names of param `name`'s dimensions (all None for a replicated param)."""
    stacked = layer_stack.is_stacked_name(name)
    for pattern, axes in PARAM_AXES:
        if re.search(pattern, name):
            axes = (("layers",) if stacked else ()) + axes
            if len(axes) != ndim:
                raise ValueError(f"partition rule {pattern!r} has {len(axes)} dims; param "
                                 f"{name!r} has {ndim}")
            return axes
    return (None,) * ndim


def partition_spec(name: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The PartitionSpec of param `name` with `shape` (the module docstring's rules)."""
    return logical_spec(param_logical_axes(name, len(shape)), shape, mesh)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """x constrained to the sharding LOGICAL_RULES give its dimensions' logical names, on the mesh
    of the surrounding `jax.set_mesh` (the trainer traces its steps inside one); the identity
    without such a mesh (one device, decoding, the converters) or on a one-device mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or not set(MESH_AXES) <= set(mesh.shape):
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(names, x.shape, mesh))


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

"""The attention kernels over a device mesh: each shard runs the kernel on its own slice.

XLA cannot partition a Pallas kernel (Mosaic TPU: "Mosaic kernels cannot be automatically
partitioned"; Triton: it exports, but the custom call then runs on the global shape on every
device) and does not need to partition a cuDNN call either: attention is independent per sequence
and per KV group. So attention.attention() calls these kernels inside `jax.shard_map` over the mesh
of the surrounding `jax.set_mesh` (the trainer traces its steps inside one), with the
PartitionSpecs sharding.LOGICAL_RULES give the activations the model already constrains:

  q, out      [batch, seq, heads, head_dim]         batch over (data, fsdp), heads over tensor
  k, v        [batch, seq, kv_heads, head_dim]      (bskd; the decode cache is [batch, kv_heads,
                                                     seq, head_dim]) batch over (data, fsdp),
                                                     KV heads over tensor
  segment_ids [batch, seq]; q_offset, kv_lengths [batch]: batch over (data, fsdp)

A dimension an axis does not divide is replicated over it (sharding.logical_spec), so a batch that
does not divide over data x fsdp, or heads over tensor, is computed redundantly: correct, not fast.
When the query heads split over tensor but the KV heads do not (num_kv_heads not divisible by the
tensor size: the parameter rules replicate k_proj/v_proj and the K/V activations then), each tensor
shard still needs exactly the KV heads its query heads read (contiguous grouping, query head n reads
KV head n // q_per_kv). They are gathered outside the shard_map into a [.., tensor * kv_local, ..]
array that does split over tensor (kv_heads_per_shard): XLA partitions that gather and its gradient
sums each KV head's pieces back, and the per-shard function stays free of axis_index bookkeeping.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gqa_uptrain import sharding

BTNH = ("batch", "seq", "heads", "head_dim")  # q and the output, as model.py names them
KV_NAMES = {"bskd": ("batch", "seq", "kv_heads", "head_dim"),
            "bksd": ("batch", "kv_heads", "seq", "head_dim")}
KV_HEAD_AXIS = {"bskd": 2, "bksd": 1}


def context_mesh():
    """The abstract mesh of the surrounding `jax.set_mesh` if it has this project's axes
    (sharding.MESH_AXES), else None. A one-device mesh counts: shard_map over it is the identity
    on shapes, and it keeps one code path for one device and many."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(sharding.MESH_AXES) <= set(mesh.axis_names):
        return None
    return mesh


def kv_heads_per_shard(num_heads: int, num_kv_heads: int, tensor: int) -> np.ndarray | None:
    """The KV heads each tensor shard's query heads read, shard after shard ([tensor * kv_local]
    indices into the KV head axis), or None when none need gathering: KV heads divisible by
    `tensor` (they split like the query heads) or query heads not divisible (both replicated).

    Query heads split, KV heads not: a shard holds num_heads / tensor query heads. If they all
    fall in one group (q_per_kv divisible by them) the shard needs that group's one KV head;
    otherwise groups straddle shards and each query head gets its own KV head (the shard runs
    q_per_kv = 1). E.g. 8 heads, 2 KV heads, tensor 4: [0, 0, 1, 1]; 24 heads, 6 KV heads,
    tensor 4: [0, 0, 0, 0, 1, 1, ..., 5] (one per query head).
    """
    if num_kv_heads % tensor == 0 or num_heads % tensor:
        return None
    local, group = num_heads // tensor, num_heads // num_kv_heads
    if group % local == 0:  # a shard's heads start at a multiple of `local`: within one group
        return np.array([shard * local // group for shard in range(tensor)])
    return np.arange(num_heads) // group


def shard_call(run: Callable[..., jax.Array], mesh, *, kv_layout: str, q, k, v,
               segment_ids=None, q_offset=None, kv_lengths=None) -> jax.Array:
    """run(q, k, v, segment_ids=, q_offset=, kv_lengths=) on each shard of `mesh`; shapes as
    attention.attention's (q [b, t, N, d]; k, v in kv_layout). Returns [b, t, N, d], laid out
    like q (batch over data x fsdp, heads over tensor)."""
    idx = kv_heads_per_shard(q.shape[2], k.shape[KV_HEAD_AXIS[kv_layout]], mesh.shape["tensor"])
    if idx is not None:
        k = jnp.take(k, idx, axis=KV_HEAD_AXIS[kv_layout])
        v = jnp.take(v, idx, axis=KV_HEAD_AXIS[kv_layout])
    batch = q.shape[0]
    arrays = dict(q=q, k=k, v=v)
    names = dict(q=BTNH, k=KV_NAMES[kv_layout], v=KV_NAMES[kv_layout])
    if segment_ids is not None:
        arrays["segment_ids"], names["segment_ids"] = segment_ids, ("batch", "seq")
    for key, x in (("q_offset", q_offset), ("kv_lengths", kv_lengths)):
        if x is not None:  # scalars become [batch] so that they split with the batch
            arrays[key] = jnp.broadcast_to(jnp.asarray(x, jnp.int32).reshape(-1), (batch,))
            names[key] = ("batch",)
    specs = {key: sharding.logical_spec(names[key], arrays[key].shape, mesh) for key in arrays}

    def per_shard(a):
        return run(a["q"], a["k"], a["v"], segment_ids=a.get("segment_ids"),
                   q_offset=a.get("q_offset"), kv_lengths=a.get("kv_lengths"))

    # check_vma=False: a pallas_call's out_shape carries no varying-manual-axes type (splash's
    # refuses check_vma=True). Then shard_map's transpose divides the output cotangent by the size
    # of the axes the output's spec does not name and psums each input's cotangent over the axes
    # its spec does not name: right for a function that computes the same on shards holding the
    # same inputs (a replicated batch or head axis), as a kernel does.
    return jax.shard_map(per_shard, mesh=mesh, in_specs=(specs,), out_specs=specs["q"],
                         check_vma=False)(arrays)

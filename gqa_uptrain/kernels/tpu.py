"""The TPU path of flash_attention: the shipped splash attention kernel behind our entry point.

Why splash and not our own Mosaic TPU kernel: splash (jax.experimental.pallas.ops.tpu.
splash_attention) takes fewer KV heads natively (KV head = query head // q_per_kv, our contiguous
grouping), has forward and backward kernels whose dK/dV kernel accumulates over the query heads of a
group in VMEM scratch before writing num_kv_heads heads, supports causal masks with block skipping
and segment ids, and gives correct values and gradients in TPU interpret mode on CPU
(tests/test_kernels.py). It is also what MaxText runs on TPUs. Writing a second flash kernel for
Mosaic's grid-driven pipeline would add code without a TPU here to measure it against splash.
Splash's limits, handled here: it is unbatched (vmap over batch), does not scale q (we scale q
before it, in q's dtype — one extra rounding in bf16), and needs sequence lengths that are
multiples of its blocks (we pad; padded keys get a segment id no real token has).
Difference from the Triton path: splash's forward grid runs over query heads, so a K/V block is
fetched once per query head rather than once per group (the dK/dV kernel does accumulate per group).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash

# Splash's blocks must be multiples of 128 on a TPU. 512 is MaxText's default for v5e/v6e; not
# measured here (no TPU).
DEFAULT_BLOCK = 512
_MIN_BLOCK = 128


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@functools.lru_cache(maxsize=64)
def _kernel(num_heads: int, seq_pad: int, causal: bool, block: int, interpret: bool):
    shape = (seq_pad, seq_pad)
    head_mask = splash.CausalMask(shape) if causal else splash.FullMask(shape)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    # The kernel carries block-sparsity tables built with jnp; built under a trace they would be
    # tracers (leaked by the cache), and as device arrays reused under a later trace they become
    # hoisted constants that jax.export rejects ("Too many leaves"). Built eagerly and held as
    # numpy arrays, they are embedded as literals in every trace.
    with jax.ensure_compile_time_eval():
        kernel = splash.make_splash_mha(splash.MultiHeadMask([head_mask] * num_heads),
                                        block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                        interpret=interpret)
    return jax.tree_util.tree_map(np.asarray, kernel)


def splash_attention(q, k, v, segment_ids=None, *, causal=True, scale=None, block=None,
                     interpret=False):
    """q [b, t, N, d], k/v [b, t, K, d] (self-attention: seq_q == seq_kv), segment_ids [b, t].

    Returns [b, t, N, d] in q's dtype. Differentiable (splash's own custom_vjp).
    """
    batch, seq, num_heads, head_dim = q.shape
    if k.shape[1] != seq:
        raise ValueError(f"the splash (TPU) path needs seq_q == seq_kv; got {seq} and {k.shape[1]}")
    scale = head_dim ** -0.5 if scale is None else scale
    block = min(block or DEFAULT_BLOCK, _round_up(seq, _MIN_BLOCK))
    seq_pad = _round_up(seq, block)
    pad = seq_pad - seq
    # Splash wants heads before positions: [b, heads, seq, d].
    qh = jnp.swapaxes((q * scale).astype(q.dtype), 1, 2)
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    segs = None
    if segment_ids is not None or (pad and not causal):
        ids = (jnp.zeros((batch, seq), jnp.int32) if segment_ids is None
               else segment_ids.astype(jnp.int32))
        # Padding gets an id below every real one: real queries never see padded keys, and a
        # padded query always sees at least itself (a fully masked row would be NaN in splash).
        pad_id = jnp.min(ids, axis=1, keepdims=True) - 1
        ids = jnp.concatenate([ids, jnp.broadcast_to(pad_id, (batch, pad))], axis=1)
        segs = splash.SegmentIds(q=ids, kv=ids)
    if pad:
        widths = ((0, 0), (0, 0), (0, pad), (0, 0))
        qh, kh, vh = jnp.pad(qh, widths), jnp.pad(kh, widths), jnp.pad(vh, widths)
    kernel = _kernel(num_heads, seq_pad, causal, block, interpret)
    if segs is None:
        out = jax.vmap(kernel)(qh, kh, vh)
    else:
        out = jax.vmap(kernel)(qh, kh, vh, segs)
    return jnp.swapaxes(out[:, :, :seq], 1, 2).astype(q.dtype)

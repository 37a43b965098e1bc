"""The decode cache's attention ('cache'): reference_attention's math over the bksd cache, with
the einsum shapes XLA:CPU runs fastest, chosen by group size, head size and cache length.

Measured on the 2-core CPU these tests run on; on GPU/TPU 'auto' does not pick it (attention.AUTO).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gqa_uptrain.masking import mask_value

_MASK_VALUE = mask_value(jnp.float32)  # logits are float32 here

# The one-token layout switches: small heads (measured at head_dim 16 and 64 only) or a short cache
# (measured at 2K and 8K only) put the logits' seq axis minor.
SEQ_MINOR_MAX_HEAD_DIM = 16
SEQ_MINOR_MAX_CACHE = 4096


def cache_attention(q, k, v, mask):
    """Attention over the bksd decode cache with the contraction order chosen by group size.

    The same math as reference_attention (fp32 logits and softmax), different einsum shapes. On
    XLA's CPU backend the [q_per_kv, head_dim] x [head_dim, seq] product of the grouped einsum is a
    small-M matmul that ran *slower* than MHA's matrix-vector product: with 8 query heads at an 8K
    cache, 4 KV heads (q_per_kv 2) took ~2x MHA's time. Measured on this 2-core CPU (one loaded run,
    batch 8, 8K cache): q_per_kv 2 is fastest as one matrix-vector product per query head (the KV
    block is re-read per head, so it costs at most MHA's traffic); q_per_kv >= 3 as the tall-skinny
    product [seq, head_dim] x [head_dim, q_per_kv], which reads K once.
    """
    batch, seq_q, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    out_dtype = q.dtype
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    qg = q.reshape(batch, seq_q, num_kv_heads, group, head_dim) * (head_dim ** -0.5)
    keep = None if mask is None else mask[:, None, :, :]  # [b, 1, t, s]
    if group == 1 or (group == 2 and seq_q == 1):
        outs = []
        for j in range(group):
            logits = jnp.einsum("btkd,bksd->bkts", qg[:, :, :, j], k)  # [b, k, t, s]
            if keep is not None:
                logits = jnp.where(keep, logits, _MASK_VALUE)
            probs = jax.nn.softmax(logits, axis=-1)
            outs.append(jnp.einsum("bkts,bksd->btkd", probs, v))  # [b, t, k, d]
        out = jnp.stack(outs, axis=3)  # [b, t, k, g, d]
    elif seq_q == 1 and (head_dim <= SEQ_MINOR_MAX_HEAD_DIM or k.shape[2] <= SEQ_MINOR_MAX_CACHE):
        # One new token, small heads or a short cache: the per-logit work (mask, softmax) weighs
        # more against the cache bytes, and it runs faster with the logits' seq axis minor. K is
        # still read once (the tall-skinny product), then the [b, k, s, g] logits are transposed
        # (q_per_kv/head_dim of K's size). Measured side by side, one layer, batch 8:
        # - 8K cache, 8 heads of 16 (machine loaded by a training run; read the ratios): q_per_kv
        #   4: 6.0 vs 9.2 ms for the branch below, q_per_kv 8: 4.3 vs 5.6 ms.
        # - 16 heads of 64, compiled as the decode step is (xla_options.decode_options), quiet
        #   machine: 2K cache, q_per_kv 4 / 8 / 16: 8.0 / 5.2 / 2.3 ms vs 10.4 / 4.4 / 2.9 ms;
        #   8K cache: 29.1 / 15.7 / 9.3 vs 23.3 / 13.0 / 11.5 ms, hence the branch below there.
        logits = jnp.swapaxes(jnp.einsum("bksd,bkgd->bksg", k, qg[:, 0]), 2, 3)  # [b, k, g, s]
        if keep is not None:
            logits = jnp.where(keep, logits, _MASK_VALUE)  # keep [b, 1, 1, s]
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bkgs,bksd->bkgd", probs, v)[:, None]  # [b, 1, k, g, d]
    elif seq_q == 1:
        # One new token: drop the t axis entirely. Measured on a quiet machine (batch 8, 8K cache,
        # 16 heads of 64): 23 ms vs 46 ms with the t axis kept (q_per_kv 4), 9 vs 18 ms (q_per_kv 16).
        logits = jnp.einsum("bksd,bkgd->bksg", k, qg[:, 0])  # [b, k, s, g]
        if keep is not None:
            logits = jnp.where(keep[:, :, 0, :, None], logits, _MASK_VALUE)
        probs = jax.nn.softmax(logits, axis=2)
        out = jnp.einsum("bksg,bksd->bkgd", probs, v)[:, None]  # [b, 1, k, g, d]
    else:
        logits = jnp.einsum("bksd,btkgd->bkstg", k, qg)  # [b, k, s, t, g]
        if keep is not None:
            logits = jnp.where(jnp.swapaxes(keep, 2, 3)[..., None], logits, _MASK_VALUE)
        probs = jax.nn.softmax(logits, axis=2)
        out = jnp.einsum("bkstg,bksd->btkgd", probs, v)  # [b, t, k, g, d]
    return out.reshape(batch, seq_q, num_heads, head_dim).astype(out_dtype)

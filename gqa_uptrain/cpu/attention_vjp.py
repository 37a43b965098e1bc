"""Self-attention as grouped einsums with a hand-written backward pass (the CPU training default).

The math is reference_attention's (fp32 logits, softmax and products); only the execution
differs. Why it exists: on XLA's CPU backend, jax.nn.dot_product_attention and autodiff of the
einsum reference spend most of their time in passes over the [b, heads, t, s] score tensor, which
no CPU fusion keeps in cache. This form makes fewer and cheaper passes:
- the mask is an additive bias (one add that XLA fuses into the score product) instead of a
  select after it, and the softmax is normalised *after* the value product, on [.., t, d] rows
  instead of [.., t, s];
- the forward keeps the unnormalised exp(scores - max) and the row sums, so the backward needs
  no recomputation, and its row scalings (1/sum, the softmax-gradient's delta) act on the small
  [.., t, d] tensors or fuse into the one elementwise pass over the scores.
Measured side by side on the 2-core CPU of this project (one layer, forward + backward,
jax.grad of a weighted sum; numbers in README "Performance"): batch 16 x 256 tokens, 8 heads of
32: 121 ms vs 196-200 ms for jax.nn.dot_product_attention; batch 8 x 256, 8 query heads over 2
KV heads of 64: 84 vs 97 ms.

Memory is that of plain autodiff: the forward keeps one fp32 [b, heads, t, s] tensor per layer
(the model's remat=True recomputes it instead). Not flash attention: nothing is tiled, so it is
meant for CPU training lengths, not long contexts on accelerators (those use 'xla' or 'pallas').

Letters as in attention.py: b batch, t query position, s key position, k KV head, g query head
within its group, d head_dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gqa_uptrain.masking import mask_value


# Causal query blocks (attention_vjp(causal=True)): measured per layer, forward + backward, batch
# 16 x 256, 8 heads of 32: 1 / 2 / 4 / 8 blocks 116 / 105 / 93 / 93 ms (8 blocks slower forward);
# batch 4 x 1024: 1 / 4 / 8 / 16 blocks 793 / 352 / 270 / 278 ms.
_MAX_CAUSAL_BLOCKS = 8
_MIN_CAUSAL_BLOCK = 64

_MASK_VALUE = mask_value(jnp.float32)  # the scores are float32 (masking.py)


def _forward(q_rows, k, v, mask_rows):
    """q_rows [b, k, r, d] (pre-scaled; r = q_per_kv * seq_q rows, group-major), k/v
    [b, k, s, d], mask_rows bool [b or 1, 1, r, s] (True = may attend). Returns out [b, k, r, d],
    exp_scores [b, k, r, s] = exp(scores - row max), row_sum [b, k, r, 1] = their sum over s,
    row_seen [b, k, r, 1]: 1.0 where the row may attend to some key, else 0.0."""
    bias = jnp.where(mask_rows, 0.0, _MASK_VALUE)
    scores = jnp.einsum("bkrd,bksd->bkrs", q_rows, k) + bias
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    exp_scores = jnp.exp(scores - row_max)
    row_sum = jnp.sum(exp_scores, axis=-1, keepdims=True)
    out = jnp.einsum("bkrs,bksd->bkrd", exp_scores, v) / row_sum
    # Only a fully masked row's max carries the mask value (the scores themselves are far smaller).
    row_seen = jnp.any(mask_rows, axis=-1, keepdims=True).astype(jnp.float32)
    return out, exp_scores, row_sum, row_seen


@jax.custom_vjp
def _rows_attention(q_rows, k, v, mask_rows):
    return _forward(q_rows, k, v, mask_rows)[0]


def _rows_attention_fwd(q_rows, k, v, mask_rows):
    out, exp_scores, row_sum, row_seen = _forward(q_rows, k, v, mask_rows)
    # A row with no key to attend to has uniform probabilities that do not depend on q or k (the
    # reference's select cuts their gradient); elsewhere exp_scores is already 0 where masked.
    return out, (q_rows, k, v, out, exp_scores, row_sum, row_seen)


def _rows_attention_bwd(residuals, d_out):
    q_rows, k, v, out, exp_scores, row_sum, row_seen = residuals
    # probs = exp_scores / row_sum. Every use of probs below moves 1/row_sum (and row_seen) onto a
    # [.., r, d] or [.., r, 1] factor, so the [.., r, s] tensors are read as few times as possible.
    d_out_scaled = d_out / row_sum  # [b, k, r, d]
    # dv[s] = sum over rows r of probs[r, s] d_out[r]; summing the group's rows is the GQA sum.
    dv = jnp.einsum("bkrs,bkrd->bksd", exp_scores, d_out_scaled)
    # Softmax backward: d_scores = probs * (d_probs - delta), with delta = rowsum(d_out * out).
    delta = jnp.sum(d_out * out, axis=-1, keepdims=True) * row_seen / row_sum  # [b, k, r, 1]
    d_probs_scaled = jnp.einsum("bkrd,bksd->bkrs", d_out_scaled * row_seen, v)
    d_scores = exp_scores * (d_probs_scaled - delta)
    dq_rows = jnp.einsum("bkrs,bksd->bkrd", d_scores, k)
    dk = jnp.einsum("bkrs,bkrd->bksd", d_scores, q_rows)
    return dq_rows, dk, dv, None


_rows_attention.defvjp(_rows_attention_fwd, _rows_attention_bwd)


def _query_blocks(seq_q: int, causal: bool) -> list[tuple[int, int]]:
    """[start, end) query-position blocks: one block unless causal; causal: at most
    _MAX_CAUSAL_BLOCKS of at least _MIN_CAUSAL_BLOCK positions each, as equal as integers allow."""
    num_blocks = min(_MAX_CAUSAL_BLOCKS, max(1, seq_q // _MIN_CAUSAL_BLOCK)) if causal else 1
    bounds = [round(j * seq_q / num_blocks) for j in range(num_blocks + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def attention_vjp(q, k, v, mask, *, causal: bool = False):
    """Grouped-query self- or cross-attention with the hand-written backward above.

    Args:
      q: [batch, seq_q, num_heads, head_dim].
      k, v: [batch, seq_kv, num_kv_heads, head_dim] (the bskd layout); num_heads a multiple of
        num_kv_heads, query head n reading KV head n // q_per_kv.
      mask: bool, broadcastable to [batch, seq_q, seq_kv] with a leading axis of batch or 1
        (attention.make_mask's), True where a query may attend; or None.
      causal: promises that mask lets query i see no key after position i (causal self-attention,
        seq_q == seq_kv, no cache offset). The queries then run in blocks, each over the keys up
        to its last position only, skipping work the mask would zero.
    Returns:
      [batch, seq_q, num_heads, head_dim] in q's dtype. Gradients flow to q, k and v (in their
      dtypes).
    """
    batch, seq_q, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    out_dtype = q.dtype
    # fp32 throughout, as the reference; the casts' gradients cast back to the inputs' dtypes.
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    seq_kv = k.shape[1]
    if causal and seq_q != seq_kv:
        raise ValueError(f"causal=True is for self-attention; got seq_q {seq_q}, seq_kv {seq_kv}")
    mask = (jnp.ones((1, seq_q, seq_kv), bool) if mask is None
            else jnp.broadcast_to(mask, (mask.shape[0], seq_q, seq_kv)))
    # Head-major operands, a KV head's query heads stacked as rows [b, k, q_per_kv * t, d]: every
    # product is then a plain batched matmul over (b, k). Measured: the same math written with
    # separate g and t axes ran the d256 layer 1.7x slower (forward + backward). The transposes
    # and block slices touch q/k/v/out only, head_dim/seq_kv the size of the scores.
    qg = (q * head_dim ** -0.5).reshape(batch, seq_q, num_kv_heads, group, head_dim)
    qg = qg.transpose(0, 2, 3, 1, 4)  # [b, k, g, t, d]
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [b, k, s, d]
    outs = []
    for start, end in _query_blocks(seq_q, causal):
        keys = end if causal else seq_kv
        rows = group * (end - start)
        q_rows = qg[:, :, :, start:end].reshape(batch, num_kv_heads, rows, head_dim)
        mask_rows = jnp.tile(mask[:, start:end, :keys], (1, group, 1))[:, None]  # [b|1, 1, r, s]
        out = _rows_attention(q_rows, k[:, :, :keys], v[:, :, :keys], mask_rows)
        outs.append(out.reshape(batch, num_kv_heads, group, end - start, head_dim))
    out = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]  # [b, k, g, t, d]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq_q, num_heads, head_dim).astype(out_dtype)

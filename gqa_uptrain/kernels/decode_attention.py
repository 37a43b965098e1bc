"""Decode attention with native GQA: new tokens against the KV cache, split over the sequence.

Shapes: q [batch, seq_q, num_heads, head_dim] (seq_q = 1 for a decode step, the prompt length for a
prefill); k, v [batch, num_kv_heads, max_len, head_dim] — the model's cache layout (bksd);
kv_lengths [batch] valid cache entries; q_offset [batch] cache position of query 0.

Design (flash-decoding):
  * The query is regrouped to [batch, num_kv_heads, seq_q * q_per_kv, head_dim]: the rows of one KV
    head — every query head of the group, at every new position — sit in one tile, so each K/V
    block is read from memory once for the whole group.
  * grid (batch, KV head, row block, split): the cache is cut into `num_splits` chunks along the
    sequence so that a batch of few sequences still fills the machine; each program runs an fp32
    online softmax over its chunk and writes a partial output and its log-sum-exp. A tiny XLA
    reduction merges the splits (weights exp(lse_split - max lse)).
  * ragged lengths: a program only loops over the blocks below min(kv_length, last visible
    position + 1) — blocks past a sequence's length are never read. On a TPU the chunk index is
    clamped through scalar prefetch so the pipeline does not fetch them either.

Backends: 'triton' (GPU; on CPU the same kernel in interpret mode) and 'mosaic_tpu' (TPU: the same
kernel body, the lengths in SMEM via scalar prefetch, one block per chunk). Neither has been run on
its device here (none available); both lower via jax.export (tests/test_kernels.py).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from gqa_uptrain.masking import mask_value

_MASK_VALUE = mask_value(jnp.float32)  # logits are float32 in the kernels (masking.py)
_MIN_ROWS = 16  # tl.dot's minimum M; also a whole bf16 sublane tile on a TPU
_MAX_ROWS = 64  # rows per program before the query is split into row blocks (prefill)
# Programs to aim for when choosing num_splits on a GPU: ~2 per SM of an H100/H200 (132 SMs).
# A guess, not a measurement.
_TARGET_PROGRAMS = 264
_MIN_BLOCKS_PER_SPLIT = 4
BACKENDS = ("triton", "mosaic_tpu")


@dataclasses.dataclass(frozen=True)
class _Plan:
    causal: bool
    scale: float
    q_per_kv: int
    seq_q: int
    block_rows: int
    block_kv: int  # keys per inner step
    chunk: int  # keys per split (a multiple of block_kv)
    interpret: bool


def decode_attention_reference(q, k, v, kv_lengths=None, q_offset=None, *, causal=True,
                               scale=None):
    """Plain-JAX grouped attention over a bksd cache; same contract as decode_attention."""
    batch, seq_q, num_heads, head_dim = q.shape
    num_kv_heads, max_len = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    qg = q.reshape(batch, seq_q, num_kv_heads, group, head_dim)  # [b, t, k, g, d]
    logits = jnp.einsum("btkgd,bksd->bkgts", qg.astype(jnp.float32), k.astype(jnp.float32)) * scale
    lengths, offsets = _lengths_offsets(kv_lengths, q_offset, batch, max_len)
    kv_pos = jnp.arange(max_len)[None, None, :]  # [1, 1, s]
    mask = kv_pos < lengths[:, None, None]
    if causal:
        mask = mask & (kv_pos <= (offsets[:, None] + jnp.arange(seq_q)[None, :])[:, :, None])
    logits = jnp.where(mask[:, None, None], logits, _MASK_VALUE)
    # Probabilities are rounded to v's dtype, as the kernels do before P·V. Products of bf16 values
    # are exact in fp32, so upcasting computes what a bf16 matmul with fp32 accumulation does (and
    # XLA:CPU cannot run every bf16 x bf16 -> fp32 dot).
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).astype(jnp.float32)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v.astype(jnp.float32))
    return out.reshape(batch, seq_q, num_heads, head_dim).astype(q.dtype)


def _lengths_offsets(kv_lengths, q_offset, batch, max_len):
    lengths = (jnp.full((batch,), max_len, jnp.int32) if kv_lengths is None
               else jnp.broadcast_to(jnp.asarray(kv_lengths, jnp.int32), (batch,)))
    offsets = (jnp.zeros((batch,), jnp.int32) if q_offset is None
               else jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (batch,)))
    return lengths, offsets


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ----------------------------------------------------------------------------- kernel


def _decode_kernel(lengths_ref, offsets_ref, q_ref, qpos_ref, k_ref, v_ref, o_ref, lse_ref, *,
                   plan: _Plan):
    # lengths_ref, offsets_ref [batch] ints (SMEM on a TPU); q_ref [rows, d]; qpos_ref [rows, 1]
    # absolute position of each row; k_ref, v_ref [chunk, d] this split's keys;
    # o_ref [rows, d] fp32 partial output, normalised within the split; lse_ref [rows, 1].
    batch_idx, row_block, split = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    rows, block_kv = plan.block_rows, plan.block_kv
    kv_length = lengths_ref[batch_idx]
    chunk_start = split * plan.chunk
    if plan.causal:
        # The tile's last real row sees keys up to offset + its position; nothing later is read.
        last_t = jnp.minimum(plan.seq_q - 1, lax.div((row_block + 1) * rows - 1, plan.q_per_kv))
        end = jnp.minimum(kv_length, offsets_ref[batch_idx] + last_t + 1)
    else:
        end = kv_length
    num_blocks = jnp.clip(lax.div(end - chunk_start + block_kv - 1, block_kv), 0,
                          plan.chunk // block_kv)
    q = q_ref[...]
    q_pos = qpos_ref[...]  # [rows, 1]

    def body(j, carry):
        acc, m, l = carry
        # j is 0 (a Python int) in the one-block branch below: Triton's lowering of multiple_of
        # fails on a constant ("'TypedInt' object has no attribute 'owner'"; a cache of at most
        # block_kv positions on a GPU, e.g. one shard's of a short cache).
        start = j * block_kv if isinstance(j, int) else pl.multiple_of(j * block_kv, block_kv)
        k = k_ref[pl.ds(start, block_kv), :]
        v = v_ref[pl.ds(start, block_kv), :]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * plan.scale  # [rows, block_kv]
        kv_pos = chunk_start + start + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
        mask = kv_pos < kv_length
        if plan.causal:
            mask = jnp.logical_and(mask, kv_pos <= q_pos)
        s = jnp.where(mask, s, _MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))  # [rows, 1]
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new)
        l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
        return acc * alpha + pv, m_new, l

    head_dim = q_ref.shape[-1]
    carry = (jnp.zeros((rows, head_dim), jnp.float32),
             jnp.full((rows, 1), _MASK_VALUE, jnp.float32), jnp.zeros((rows, 1), jnp.float32))
    if plan.chunk == block_kv:  # one block per program (the TPU layout): a branch, not a loop
        acc, m, l = lax.cond(num_blocks > 0, lambda: body(0, carry), lambda: carry)
    else:
        acc, m, l = lax.fori_loop(0, num_blocks, body, carry)
    seen = l > 0  # a split past the sequence's end saw nothing: weight 0 in the merge
    o_ref[...] = acc / jnp.where(seen, l, 1.0)
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), _MASK_VALUE)


# ----------------------------------------------------------------------------- pallas_call


def _call_triton(plan, lengths, offsets, q_rows, qpos, k, v, num_splits):
    batch, num_kv_heads, rows_pad, head_dim = q_rows.shape
    grid = (batch, num_kv_heads, rows_pad // plan.block_rows, num_splits)
    rows = plan.block_rows
    whole = pl.no_block_spec  # the [batch] lengths and offsets, read as scalars
    compiler_params = None
    if not plan.interpret:
        from jax.experimental.pallas import triton as pl_triton  # noqa: PLC0415 (GPU-only module)
        compiler_params = pl_triton.CompilerParams(num_warps=4, num_stages=2)
    return pl.pallas_call(
        functools.partial(_decode_kernel, plan=plan),
        grid=grid,
        in_specs=[
            whole, whole,
            pl.BlockSpec((None, None, rows, head_dim), lambda b, h, r, s: (b, h, r, 0)),
            pl.BlockSpec((None, rows, 1), lambda b, h, r, s: (b, r, 0)),
            pl.BlockSpec((None, None, plan.chunk, head_dim), lambda b, h, r, s: (b, h, s, 0)),
            pl.BlockSpec((None, None, plan.chunk, head_dim), lambda b, h, r, s: (b, h, s, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, r, s: (b, h, s, r, 0)),
            pl.BlockSpec((None, None, None, rows, 1), lambda b, h, r, s: (b, h, s, r, 0)),
        ],
        out_shape=_out_shape(batch, num_kv_heads, num_splits, rows_pad, head_dim),
        compiler_params=compiler_params,
        interpret=plan.interpret,
        name="gqa_decode",
    )(lengths, offsets, q_rows, qpos, k, v)


def _call_mosaic_tpu(plan, lengths, offsets, q_rows, qpos, k, v, num_splits):
    from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415 (TPU-only module)
    batch, num_kv_heads, rows_pad, head_dim = q_rows.shape
    rows = plan.block_rows

    def kv_map(b, h, r, s, lengths_ref, offsets_ref):
        # Splits past this sequence's length re-point at its last useful chunk: the pipeline skips
        # a fetch whose block index did not change, so those chunks are never read.
        last = jnp.maximum(lax.div(lengths_ref[b] + plan.chunk - 1, plan.chunk) - 1, 0)
        return b, h, jnp.minimum(s, last), 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(batch, num_kv_heads, rows_pad // rows, num_splits),
        in_specs=[
            pl.BlockSpec((None, None, rows, head_dim), lambda b, h, r, s, *_: (b, h, r, 0)),
            pl.BlockSpec((None, rows, 1), lambda b, h, r, s, *_: (b, r, 0)),
            pl.BlockSpec((None, None, plan.chunk, head_dim), kv_map),
            pl.BlockSpec((None, None, plan.chunk, head_dim), kv_map),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, head_dim),
                         lambda b, h, r, s, *_: (b, h, s, r, 0)),
            pl.BlockSpec((None, None, None, rows, 1), lambda b, h, r, s, *_: (b, h, s, r, 0)),
        ],
    )
    return pl.pallas_call(
        functools.partial(_decode_kernel, plan=plan),
        grid_spec=grid_spec,
        out_shape=_out_shape(batch, num_kv_heads, num_splits, rows_pad, head_dim),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if plan.interpret else False,
        name="gqa_decode_tpu",
    )(lengths, offsets, q_rows, qpos, k, v)


def _out_shape(batch, num_kv_heads, num_splits, rows_pad, head_dim):
    lead = (batch, num_kv_heads, num_splits, rows_pad)
    return [jax.ShapeDtypeStruct((*lead, head_dim), jnp.float32),
            jax.ShapeDtypeStruct((*lead, 1), jnp.float32)]


# ----------------------------------------------------------------------------- entry point


def default_backend() -> tuple[str, bool]:
    """(backend, interpret) for the current platform: Mosaic on a TPU, Triton elsewhere (interpret
    mode off a GPU)."""
    platform = jax.default_backend()
    if platform == "tpu":
        return "mosaic_tpu", False
    return "triton", platform != "gpu"


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, max(1, min(n, cap)) + 1) if n % d == 0)


def choose_tiles(batch, num_kv_heads, rows, max_len, *, backend, block_kv=None, num_splits=None):
    """(block_rows, rows_pad, block_kv, len_pad, num_splits): static tiling for one call."""
    block_rows = max(_MIN_ROWS, _next_pow2(rows)) if rows <= _MAX_ROWS else _MAX_ROWS
    rows_pad = _round_up(rows, block_rows)
    if block_kv is None:
        block_kv = 512 if backend == "mosaic_tpu" else 128
    # The largest power-of-two block <= block_kv that divides max_len (>= 16), so the cache needs
    # no padding; a length with no such divisor is padded (a copy of the cache: allocate caches
    # with max_len a multiple of 16 to avoid it).
    block = _next_pow2(block_kv)
    while block > _MIN_ROWS and max_len % block:
        block //= 2
    len_pad = _round_up(max_len, block)
    num_blocks = len_pad // block
    if backend == "mosaic_tpu":
        return block_rows, rows_pad, block, len_pad, num_blocks  # one block per program
    if num_splits is None:
        programs = batch * num_kv_heads * (rows_pad // block_rows)
        num_splits = min(-(-_TARGET_PROGRAMS // programs),
                         max(1, num_blocks // _MIN_BLOCKS_PER_SPLIT))
    return block_rows, rows_pad, block, len_pad, _largest_divisor_at_most(num_blocks, num_splits)


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    kv_lengths: jax.Array | None = None,
    q_offset: jax.Array | None = None,
    *,
    causal: bool = True,
    scale: float | None = None,
    block_kv: int | None = None,
    num_splits: int | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Attention of new tokens over a KV cache, native GQA, forward only.

    Args:
      q: [batch, seq_q, num_heads, head_dim] new tokens (seq_q = 1 when decoding).
      k, v: [batch, num_kv_heads, max_len, head_dim] the cache.
      kv_lengths: [batch] (or scalar) valid entries per sequence; None = max_len.
      q_offset: [batch] (or scalar) cache position of query 0; None = 0.
      causal: query i (at q_offset + i) sees keys at positions <= its own.
      scale: logit scale, default head_dim ** -0.5.
      block_kv: keys per inner step (GPU) or per program (TPU); num_splits: chunks along the cache
        (GPU; None = enough programs to fill an H200, by a rule of thumb).
      backend: 'triton' or 'mosaic_tpu'; None picks by platform. interpret: None = by platform.
    Returns:
      [batch, seq_q, num_heads, head_dim] in q's dtype.
    """
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"q must be [b, t, N, d] and k, v [b, K, len, d] alike; got {q.shape}, "
                         f"{k.shape}, {v.shape}")
    batch, seq_q, num_heads, head_dim = q.shape
    _, num_kv_heads, max_len, _ = k.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"q {q.shape} and cache {k.shape} disagree on batch or head_dim")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}")
    auto_backend, auto_interpret = default_backend()
    backend = auto_backend if backend is None else backend
    interpret = auto_interpret if interpret is None else interpret
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    scale = head_dim ** -0.5 if scale is None else float(scale)
    group = num_heads // num_kv_heads
    lengths, offsets = _lengths_offsets(kv_lengths, q_offset, batch, max_len)

    rows = seq_q * group
    block_rows, rows_pad, block, len_pad, splits = choose_tiles(
        batch, num_kv_heads, rows, max_len, backend=backend, block_kv=block_kv,
        num_splits=num_splits)
    # Rows ordered (position, head): [b, t, K, g, d] -> [b, K, t * g, d]. Free when seq_q == 1.
    q_rows = q.reshape(batch, seq_q, num_kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    q_rows = q_rows.reshape(batch, num_kv_heads, rows, head_dim)
    head_dim_pad = _next_pow2(head_dim) if backend == "triton" else head_dim
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, rows_pad - rows), (0, head_dim_pad - head_dim)))
    if len_pad != max_len or head_dim_pad != head_dim:
        pads = ((0, 0), (0, 0), (0, len_pad - max_len), (0, head_dim_pad - head_dim))
        k, v = jnp.pad(k, pads), jnp.pad(v, pads)
    qpos = offsets[:, None] + jnp.arange(rows_pad, dtype=jnp.int32)[None, :] // group
    qpos = qpos[:, :, None]  # [b, rows_pad, 1]

    plan = _Plan(causal=causal, scale=scale, q_per_kv=group, seq_q=seq_q, block_rows=block_rows,
                 block_kv=block, chunk=len_pad // splits, interpret=interpret)
    call = _call_mosaic_tpu if backend == "mosaic_tpu" else _call_triton
    o_part, lse_part = call(plan, lengths, offsets, q_rows, qpos, k, v, splits)
    # o_part [b, K, splits, rows_pad, d], lse_part [b, K, splits, rows_pad, 1]: merge the splits.
    if splits == 1:
        out = o_part[:, :, 0]
    else:
        weights = jnp.exp(lse_part - jnp.max(lse_part, axis=2, keepdims=True))
        out = jnp.sum(weights * o_part, axis=2) / jnp.sum(weights, axis=2)
    out = out[:, :, :rows, :head_dim].reshape(batch, num_kv_heads, seq_q, group, head_dim)
    return out.transpose(0, 2, 1, 3, 4).reshape(batch, seq_q, num_heads, head_dim).astype(q.dtype)

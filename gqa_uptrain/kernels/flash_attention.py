"""Flash attention for training with native grouped-query attention: Pallas forward and backward.

Shapes: q [batch, seq_q, num_heads, head_dim]; k, v [batch, seq_kv, num_kv_heads, head_dim].
Grouping is contiguous: query head n reads KV head n // q_per_kv.

Design (one program serves a whole query group, so every K/V block is loaded once per group):
  * A program's query tile is [block_q, q_per_kv, head_dim] — block_q positions of all q_per_kv
    heads that share one KV head — flattened in-kernel to `rows = block_q * q_per_kv` rows ordered
    (position, head). Row r sits at position q_start + r // q_per_kv.
  * forward: grid (query block, batch, KV head); a loop over KV blocks with an fp32 online softmax
    (in base 2: exp2 of logits pre-multiplied by log2(e)); outputs o and the log-sum-exp (base 2)
    per row, lse [batch, num_kv_heads, seq_q * q_per_kv].
  * backward, two kernels (the FlashAttention-2 split):
      dK/dV: grid (KV block, batch, KV head); loops over query blocks, and because each query block
        holds all q_per_kv heads of the group, dK and dV are summed over the group inside the
        kernel; they are written once with num_kv_heads heads.
      dQ: grid (query block, batch, KV head); loops over KV blocks.
    delta = rowsum(dO * O) is one fused XLA reduction before them.
  * residuals saved by the custom_vjp: q, k, v, segment ids, o and lse — O(seq), never [seq, seq].
  * causal: a query block loops only over KV blocks that are not fully masked (about half of them),
    and applies the mask only to the blocks that straddle the diagonal. The query-block axis runs
    in reverse so the longest programs start first.
  * any length: seq_q/seq_kv are padded to whole blocks outside the custom_vjp and the padded keys
    are masked; padded query rows are sliced off (their dO is zero, so they add nothing to dK/dV).

Backends. 'triton' is Pallas' Triton lowering (GPU): it needs power-of-2 tile sizes, so q_per_kv and
head_dim are zero-padded to powers of two (exact: zero heads are sliced off, zero dims add nothing
to q·k) and a tile has >= 16 rows (tl.dot's minimum). The same rules apply in interpret mode, so
the CPU tests run exactly the kernels a GPU runs. Fp32 inputs use TF32 matmuls on the GPU (Pallas
Triton's default precision): expect ~1e-3 relative error there instead of ~1e-6.
'splash' is the TPU path: the shipped splash attention kernel (kernels/tpu.py), see there for why.

Block sizes are parameters (BlockSizes). The defaults follow the Triton fused-attention tutorial's
configurations for head_dim 128 (forward 128 query rows × 64 keys; dK/dV 32 × 128; dQ 128 × 32);
they were NOT measured here (no GPU) — experiments/gpu_check.sh sweeps a few on a GPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

# The plan and the kernels' shared helpers (flash_tiles.py); BlockSizes and default_backend are
# part of this module's interface too.
from gqa_uptrain.kernels.flash_tiles import (BlockSizes, _dot_nn, _dot_nt, _dot_tn,
                                             _kv_loop_bounds, _mask, _next_pow2, _Plan,
                                             _round_up, _row_positions, _row_segments,
                                             default_backend)
from gqa_uptrain.masking import mask_value

_MASK_VALUE = mask_value(jnp.float32)  # logits are float32 in the kernels (masking.py)
_LOG2E = math.log2(math.e)
# tl.dot needs M, N, K >= 16.
_TRITON_MIN_DIM = 16
BACKENDS = ("triton", "splash")


# ----------------------------------------------------------------------------- reference


def flash_attention_reference(q, k, v, segment_ids=None, *, causal=True, scale=None):
    """Plain-JAX grouped attention with the same contract as flash_attention (fp32 softmax).

    q [b, t, N, H]; k, v [b, s, K, H]; segment_ids [b, t] (t == s) or None. Causal aligns query i
    with key i. Returns [b, t, N, H] in q's dtype.
    """
    batch, seq_q, num_heads, head_dim = q.shape
    seq_kv, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    qg = q.reshape(batch, seq_q, num_kv_heads, group, head_dim)  # [b, t, k, g, d]
    logits = jnp.einsum("btkgd,bskd->bkgts", qg.astype(jnp.float32), k.astype(jnp.float32)) * scale
    mask = jnp.ones((1, seq_q, seq_kv), bool)
    if causal:
        mask = mask & (jnp.arange(seq_kv)[None, None, :] <= jnp.arange(seq_q)[None, :, None])
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    logits = jnp.where(mask[:, None, None], logits, _MASK_VALUE)
    # Probabilities are rounded to v's dtype, as the kernels do before P·V. Products of bf16 values
    # are exact in fp32, so upcasting computes what a bf16 matmul with fp32 accumulation does (and
    # XLA:CPU cannot run every bf16 x bf16 -> fp32 dot).
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).astype(jnp.float32)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(jnp.float32))
    return out.reshape(batch, seq_q, num_heads, head_dim).astype(q.dtype)


# ----------------------------------------------------------------------------- forward kernel


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kvseg_ref, o_ref, lse_ref, *count_ref, plan: _Plan):
    # q_ref [block_q, q_per_kv, d]; k_ref, v_ref [seq_kv_pad, d] (this batch row's KV head);
    # qseg_ref [block_q], kvseg_ref [seq_kv_pad] or None; o_ref like q_ref; lse_ref [rows].
    block_q, block_kv, group = plan.block_q, plan.block_kv, plan.q_per_kv
    rows = block_q * group
    head_dim = q_ref.shape[-1]
    q_block = _q_block_index(pl.program_id(0), plan.num_q_blocks, plan.causal)
    q = q_ref[...].reshape(rows, head_dim)
    q_pos = _row_positions(q_block * block_q, rows, group)
    q_seg = None if qseg_ref is None else _row_segments(qseg_ref[...], group)
    logit_scale = plan.scale * _LOG2E

    def body(j, carry, masked):
        acc, m, l, n = carry
        start = pl.multiple_of(j * block_kv, block_kv)
        k = k_ref[pl.ds(start, block_kv), :]
        v = v_ref[pl.ds(start, block_kv), :]
        s = _dot_nt(q, k) * logit_scale  # [rows, block_kv], log2 units
        if masked:
            kv_seg = None if kvseg_ref is None else kvseg_ref[pl.ds(start, block_kv)]
            s = jnp.where(_mask(start, block_kv, q_pos, q_seg, kv_seg, causal=plan.causal,
                                seq_kv=plan.seq_kv), s, _MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))  # [rows]
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot_nn(p.astype(v.dtype), v)
        return acc, m_new, l, n + 1

    first_masked, end = _kv_loop_bounds(plan, q_block, block_q, block_kv, qseg_ref is not None)
    carry = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
             jnp.zeros((rows,), jnp.float32), jnp.int32(0))
    carry = lax.fori_loop(0, first_masked, functools.partial(body, masked=False), carry)
    acc, m, l, n = lax.fori_loop(first_masked, end, functools.partial(body, masked=True), carry)
    o_ref[...] = (acc / l[:, None]).reshape(block_q, group, head_dim).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log2(l)
    if count_ref:
        count_ref[0][...] = jnp.full((1,), n, jnp.int32)


def _q_block_index(program, num_q_blocks, causal):
    # Causal tiles near the end of the sequence loop the longest: launch them first.
    return num_q_blocks - 1 - program if causal else program


def _compiler_params(plan: _Plan, rows, cols):
    if plan.interpret:
        return None
    from jax.experimental.pallas import triton as pl_triton  # noqa: PLC0415 (GPU-only module)
    return pl_triton.CompilerParams(num_warps=4 if rows * cols < 128 * 128 else 8, num_stages=2)


def _fwd_call(q, k, v, segment_ids, plan: _Plan):
    """Padded inputs -> (o [b, t_pad, N, d], lse [b, K, t_pad * q_per_kv]) (+ block counts)."""
    batch, seq_q_pad, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group, block_q = plan.q_per_kv, plan.block_q
    rows = block_q * group
    nq = plan.num_q_blocks
    qb = functools.partial(_q_block_index, num_q_blocks=nq, causal=plan.causal)
    q_spec = pl.BlockSpec((None, block_q, group, head_dim), lambda i, b, h: (b, qb(i), h, 0))
    kv_spec = pl.BlockSpec((None, plan.seq_kv_pad, None, head_dim), lambda i, b, h: (b, 0, h, 0))
    qseg_spec = kvseg_spec = None
    qseg = kvseg = None
    if segment_ids is not None:
        qseg, kvseg = segment_ids
        qseg_spec = pl.BlockSpec((None, block_q), lambda i, b, h: (b, qb(i)))
        kvseg_spec = pl.BlockSpec((None, plan.seq_kv_pad), lambda i, b, h: (b, 0))
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, num_kv_heads, seq_q_pad * group), jnp.float32)]
    out_specs = [q_spec, pl.BlockSpec((None, None, rows), lambda i, b, h: (b, h, qb(i)))]
    if plan.count_blocks:
        out_shape.append(jax.ShapeDtypeStruct((batch, num_kv_heads, nq), jnp.int32))
        out_specs.append(pl.BlockSpec((None, None, 1), lambda i, b, h: (b, h, qb(i))))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, plan=plan),
        grid=(nq, batch, num_kv_heads),
        in_specs=[q_spec, kv_spec, kv_spec, qseg_spec, kvseg_spec],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(plan, rows, plan.block_kv),
        interpret=plan.interpret,
        name="gqa_flash_fwd",
    )(q, k, v, qseg, kvseg)


# ----------------------------------------------------------------------------- backward kernels


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref,
                dk_ref, dv_ref, *count_ref, plan: _Plan):
    # k_ref, v_ref, dk_ref, dv_ref [block_kv, d] (the resident tile); q_ref, do_ref
    # [seq_q_pad, q_per_kv, d] and lse_ref, delta_ref [seq_q_pad * q_per_kv] stream in blocks.
    block_q, block_kv, group = plan.block_q_dkv, plan.block_kv_dkv, plan.q_per_kv
    rows = block_q * group
    head_dim = k_ref.shape[-1]
    kv_block = pl.program_id(0)
    kv_start = kv_block * block_kv
    k = k_ref[...]
    v = v_ref[...]
    kv_seg = None if kvseg_ref is None else kvseg_ref[...]
    logit_scale = plan.scale * _LOG2E
    num_q_blocks = plan.seq_q_pad // block_q

    def body(i, carry, masked):
        dk, dv, n = carry
        q_start = pl.multiple_of(i * block_q, block_q)
        row_start = pl.multiple_of(i * rows, rows)
        q = q_ref[pl.ds(q_start, block_q), :, :].reshape(rows, head_dim)
        do = do_ref[pl.ds(q_start, block_q), :, :].reshape(rows, head_dim)
        lse = lse_ref[pl.ds(row_start, rows)]
        delta = delta_ref[pl.ds(row_start, rows)]
        s = _dot_nt(q, k) * logit_scale  # [rows, block_kv]
        if masked:
            q_seg = None if qseg_ref is None else _row_segments(qseg_ref[pl.ds(q_start, block_q)],
                                                                group)
            s = jnp.where(_mask(kv_start, block_kv, _row_positions(q_start, rows, group), q_seg,
                                kv_seg, causal=plan.causal, seq_kv=plan.seq_kv), s, _MASK_VALUE)
        p = jnp.exp2(s - lse[:, None])  # softmax probabilities, [rows, block_kv]
        dv = dv + _dot_tn(p.astype(do.dtype), do)  # sums over every head of the group
        dp = _dot_nt(do, v)
        ds = p * (dp - delta[:, None])
        dk = dk + _dot_tn(ds.astype(q.dtype), q)
        return dk, dv, n + 1

    if plan.causal:
        # Query blocks before the one holding position kv_start cannot see this KV block;
        # from the first block whose first position is >= our last key on, no mask is needed.
        start = lax.div(kv_start, block_q)
        first_clean = jnp.minimum(lax.div(kv_start + block_kv - 1 + block_q - 1, block_q),
                                  num_q_blocks)
    else:
        start, first_clean = 0, 0
    if qseg_ref is not None:
        first_clean = num_q_blocks
    # Padded keys need no mask here: only their own dK/dV rows see them, and those are sliced off.
    zeros = jnp.zeros((block_kv, head_dim), jnp.float32)
    carry = (zeros, zeros, jnp.int32(0))
    carry = lax.fori_loop(start, first_clean, functools.partial(body, masked=True), carry)
    dk, dv, n = lax.fori_loop(first_clean, num_q_blocks, functools.partial(body, masked=False),
                              carry)
    dk_ref[...] = (dk * plan.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    if count_ref:
        count_ref[0][...] = jnp.full((1,), n, jnp.int32)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kvseg_ref,
               dq_ref, *count_ref, plan: _Plan):
    # q_ref, do_ref, dq_ref [block_q, q_per_kv, d]; lse_ref, delta_ref [rows];
    # k_ref, v_ref [seq_kv_pad, d] stream in blocks.
    block_q, block_kv, group = plan.block_q_dq, plan.block_kv_dq, plan.q_per_kv
    rows = block_q * group
    head_dim = q_ref.shape[-1]
    num_q_blocks = plan.seq_q_pad // block_q
    q_block = _q_block_index(pl.program_id(0), num_q_blocks, plan.causal)
    q = q_ref[...].reshape(rows, head_dim)
    do = do_ref[...].reshape(rows, head_dim)
    lse = lse_ref[...]
    delta = delta_ref[...]
    q_pos = _row_positions(q_block * block_q, rows, group)
    q_seg = None if qseg_ref is None else _row_segments(qseg_ref[...], group)
    logit_scale = plan.scale * _LOG2E

    def body(j, carry, masked):
        dq, n = carry
        start = pl.multiple_of(j * block_kv, block_kv)
        k = k_ref[pl.ds(start, block_kv), :]
        v = v_ref[pl.ds(start, block_kv), :]
        s = _dot_nt(q, k) * logit_scale
        if masked:
            kv_seg = None if kvseg_ref is None else kvseg_ref[pl.ds(start, block_kv)]
            s = jnp.where(_mask(start, block_kv, q_pos, q_seg, kv_seg, causal=plan.causal,
                                seq_kv=plan.seq_kv), s, _MASK_VALUE)
        p = jnp.exp2(s - lse[:, None])
        ds = p * (_dot_nt(do, v) - delta[:, None])
        return dq + _dot_nn(ds.astype(k.dtype), k), n + 1

    first_masked, end = _kv_loop_bounds(plan, q_block, block_q, block_kv, qseg_ref is not None)
    carry = (jnp.zeros((rows, head_dim), jnp.float32), jnp.int32(0))
    carry = lax.fori_loop(0, first_masked, functools.partial(body, masked=False), carry)
    dq, n = lax.fori_loop(first_masked, end, functools.partial(body, masked=True), carry)
    dq_ref[...] = (dq * plan.scale).reshape(block_q, group, head_dim).astype(dq_ref.dtype)
    if count_ref:
        count_ref[0][...] = jnp.full((1,), n, jnp.int32)


def _bwd_call(q, k, v, segment_ids, o, lse, do, plan: _Plan):
    """Padded residuals and dO -> (dq, dk, dv) (+ (dkv counts, dq counts) when counting)."""
    batch, seq_q_pad, num_heads, head_dim = q.shape
    seq_kv_pad, num_kv_heads = k.shape[1], k.shape[2]
    group = plan.q_per_kv
    # delta = rowsum(dO * O), in the lse layout [b, K, t_pad * q_per_kv] (rows ordered (t, g)).
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [b, t, N]
    delta = delta.reshape(batch, seq_q_pad, num_kv_heads, group).transpose(0, 2, 1, 3)
    delta = delta.reshape(batch, num_kv_heads, seq_q_pad * group)
    qseg = kvseg = None
    if segment_ids is not None:
        qseg, kvseg = segment_ids

    # dK/dV: one program per (KV block, batch, KV head).
    bq, bkv = plan.block_q_dkv, plan.block_kv_dkv
    full_q = pl.BlockSpec((None, seq_q_pad, group, head_dim), lambda j, b, h: (b, 0, h, 0))
    full_rows = pl.BlockSpec((None, None, seq_q_pad * group), lambda j, b, h: (b, h, 0))
    kv_tile = pl.BlockSpec((None, bkv, None, head_dim), lambda j, b, h: (b, j, h, 0))
    seg_specs = [None, None]
    if qseg is not None:
        seg_specs = [pl.BlockSpec((None, seq_q_pad), lambda j, b, h: (b, 0)),
                     pl.BlockSpec((None, bkv), lambda j, b, h: (b, j))]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    out_specs = [kv_tile, kv_tile]
    if plan.count_blocks:
        out_shape.append(jax.ShapeDtypeStruct((batch, num_kv_heads, seq_kv_pad // bkv), jnp.int32))
        out_specs.append(pl.BlockSpec((None, None, 1), lambda j, b, h: (b, h, j)))
    dkv_out = pl.pallas_call(
        functools.partial(_dkv_kernel, plan=plan),
        grid=(seq_kv_pad // bkv, batch, num_kv_heads),
        in_specs=[full_q, kv_tile, kv_tile, full_q, full_rows, full_rows, *seg_specs],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(plan, bq * group, bkv),
        interpret=plan.interpret,
        name="gqa_flash_bwd_dkv",
    )(q, k, v, do, lse, delta, qseg, kvseg)

    # dQ: one program per (query block, batch, KV head), all heads of the group together.
    bq, bkv = plan.block_q_dq, plan.block_kv_dq
    rows = bq * group
    nq = seq_q_pad // bq
    qb = functools.partial(_q_block_index, num_q_blocks=nq, causal=plan.causal)
    q_tile = pl.BlockSpec((None, bq, group, head_dim), lambda i, b, h: (b, qb(i), h, 0))
    row_tile = pl.BlockSpec((None, None, rows), lambda i, b, h: (b, h, qb(i)))
    full_kv = pl.BlockSpec((None, seq_kv_pad, None, head_dim), lambda i, b, h: (b, 0, h, 0))
    seg_specs = [None, None]
    if qseg is not None:
        seg_specs = [pl.BlockSpec((None, bq), lambda i, b, h: (b, qb(i))),
                     pl.BlockSpec((None, seq_kv_pad), lambda i, b, h: (b, 0))]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    out_specs = [q_tile]
    if plan.count_blocks:
        out_shape.append(jax.ShapeDtypeStruct((batch, num_kv_heads, nq), jnp.int32))
        out_specs.append(pl.BlockSpec((None, None, 1), lambda i, b, h: (b, h, qb(i))))
    dq_out = pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan),
        grid=(nq, batch, num_kv_heads),
        in_specs=[q_tile, full_kv, full_kv, q_tile, row_tile, row_tile, *seg_specs],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(plan, rows, bkv),
        interpret=plan.interpret,
        name="gqa_flash_bwd_dq",
    )(q, k, v, do, lse, delta, qseg, kvseg)
    if plan.count_blocks:
        return dq_out[0], dkv_out[0], dkv_out[1], (dkv_out[2], dq_out[1])
    return dq_out[0], dkv_out[0], dkv_out[1]


# ----------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, segment_ids, plan):
    return _fwd_call(q, k, v, segment_ids, plan)[0]


def _flash_fwd(q, k, v, segment_ids, plan):
    o, lse = _fwd_call(q, k, v, segment_ids, plan)[:2]
    # Residuals: inputs, output and the per-row log-sum-exp. Nothing of size seq_q × seq_kv.
    return o, (q, k, v, segment_ids, o, lse)


def _flash_bwd(plan, residuals, do):
    q, k, v, segment_ids, o, lse = residuals
    dq, dk, dv = _bwd_call(q, k, v, segment_ids, o, lse, do, plan)[:3]
    seg_ct = None if segment_ids is None else (None, None)
    return dq, dk, dv, seg_ct


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- entry point


def _tile_positions(rows: int, q_per_kv: int, seq_q: int) -> int:
    """Query positions per tile for a target row count: a power of two giving >= 16 rows (tl.dot's
    minimum), and no more than the (power-of-two rounded) sequence needs."""
    min_positions = -(-_TRITON_MIN_DIM // q_per_kv)
    block_q = _next_pow2(max(rows // q_per_kv, min_positions))
    return min(block_q, _next_pow2(max(seq_q, min_positions)))


def _tile_keys(keys: int, seq_kv: int) -> int:
    return max(_TRITON_MIN_DIM, min(_next_pow2(keys), _next_pow2(seq_kv)))


def make_plan(q_shape, k_shape, *, causal, scale, block_sizes: BlockSizes, interpret: bool,
              count_blocks: bool = False) -> _Plan:
    """Resolves tiles and padded lengths for q [b, t, N', d'] / k [b, s, K, d'] (already padded to
    Triton's power-of-two head counts)."""
    _, seq_q, num_heads, _ = q_shape
    seq_kv, num_kv_heads = k_shape[1], k_shape[2]
    group = num_heads // num_kv_heads
    bs = block_sizes
    bq, bq_dkv, bq_dq = (_tile_positions(r, group, seq_q) for r in (bs.q_rows, bs.dkv_q_rows,
                                                                      bs.dq_q_rows))
    bkv, bkv_dkv, bkv_dq = (_tile_keys(n, seq_kv) for n in (bs.kv, bs.dkv_kv, bs.dq_kv))
    # All tiles are powers of two, so padding to the largest makes every kernel's grid exact.
    return _Plan(causal=causal, scale=scale, q_per_kv=group, seq_q=seq_q, seq_kv=seq_kv,
                 seq_q_pad=_round_up(seq_q, max(bq, bq_dkv, bq_dq)),
                 seq_kv_pad=_round_up(seq_kv, max(bkv, bkv_dkv, bkv_dq)),
                 block_q=bq, block_kv=bkv, block_q_dkv=bq_dkv, block_kv_dkv=bkv_dkv,
                 block_q_dq=bq_dq, block_kv_dq=bkv_dq, interpret=interpret,
                 count_blocks=count_blocks)


def validate(q, k, v, segment_ids):
    """Shape checks shared by the backends; raises ValueError naming the shapes."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be rank 4; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim")
    num_heads, num_kv_heads = q.shape[2], k.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}")
    if segment_ids is not None:
        if q.shape[1] != k.shape[1]:
            raise ValueError(f"segment_ids need seq_q == seq_kv; got {q.shape[1]} and {k.shape[1]}")
        if segment_ids.shape != q.shape[:2]:
            raise ValueError(f"segment_ids shape {segment_ids.shape} != [batch, seq] {q.shape[:2]}")


def pad_for_triton(q, k, v):
    """Zero-pads q_per_kv and head_dim to powers of two (Triton tiles must be). Exact: the padded
    query heads are sliced off and padded dims add 0 to every q·k and produce 0 outputs.
    Returns (q', k', v', unpad) where unpad maps an output [b, t, N', d'] back to [b, t, N, d]."""
    batch, seq_q, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    group_p, head_dim_p = _next_pow2(group), _next_pow2(head_dim)
    if group_p == group and head_dim_p == head_dim:
        return q, k, v, lambda o: o
    dpad = head_dim_p - head_dim
    q = q.reshape(batch, seq_q, num_kv_heads, group, head_dim)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, group_p - group), (0, dpad)))
    q = q.reshape(batch, seq_q, num_kv_heads * group_p, head_dim_p)
    k = jnp.pad(k, ((0, 0), (0, 0), (0, 0), (0, dpad)))
    v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, dpad)))

    def unpad(o):
        seq = o.shape[1]
        o = o.reshape(batch, seq, num_kv_heads, group_p, head_dim_p)[:, :, :, :group, :head_dim]
        return o.reshape(batch, seq, num_heads, head_dim)

    return q, k, v, unpad


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    causal: bool = True,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Flash attention with native GQA, differentiable (custom_vjp with Pallas backward kernels).

    Args:
      q: [batch, seq_q, num_heads, head_dim]; k, v: [batch, seq_kv, num_kv_heads, head_dim].
      segment_ids: [batch, seq] ints (needs seq_q == seq_kv); tokens attend within their segment.
      causal: query i sees keys 0..i.
      scale: logit scale, default head_dim ** -0.5.
      block_sizes: tiles (BlockSizes); default BlockSizes().
      backend: 'triton' (GPU; on CPU in interpret mode) or 'splash' (TPU, kernels/tpu.py).
        None picks by platform (default_backend()).
      interpret: run the Pallas kernels in the interpreter (CPU); None = by platform.
    Returns:
      [batch, seq_q, num_heads, head_dim] in q's dtype.
    """
    validate(q, k, v, segment_ids)
    auto_backend, auto_interpret = default_backend()
    backend = auto_backend if backend is None else backend
    interpret = auto_interpret if interpret is None else interpret
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "splash":
        from gqa_uptrain.kernels import tpu  # noqa: PLC0415 (TPU-only dependencies)
        return tpu.splash_attention(q, k, v, segment_ids, causal=causal, scale=scale,
                                    interpret=interpret)
    seq_q = q.shape[1]
    qp, kp, vp, unpad = pad_for_triton(q, k, v)
    plan = make_plan(qp.shape, kp.shape, causal=causal, scale=scale,
                     block_sizes=block_sizes or BlockSizes(), interpret=interpret)
    qp, kp, vp, segs = pad_sequences(qp, kp, vp, segment_ids, plan)
    out = _flash(qp, kp, vp, segs, plan)
    return unpad(out[:, :seq_q])


def pad_sequences(q, k, v, segment_ids, plan: _Plan):
    """Pads q to plan.seq_q_pad and k, v to plan.seq_kv_pad positions; segment ids become a
    (q ids [b, t_pad], kv ids [b, s_pad]) pair. Padded keys are masked by position in the kernels,
    so the ids' padding value does not matter."""
    dq_pad, dkv_pad = plan.seq_q_pad - plan.seq_q, plan.seq_kv_pad - plan.seq_kv
    if dq_pad:
        q = jnp.pad(q, ((0, 0), (0, dq_pad), (0, 0), (0, 0)))
    if dkv_pad:
        k = jnp.pad(k, ((0, 0), (0, dkv_pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, dkv_pad), (0, 0), (0, 0)))
    segs = None
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
        segs = (jnp.pad(segment_ids, ((0, 0), (0, dq_pad))),
                jnp.pad(segment_ids, ((0, 0), (0, dkv_pad))))
    return q, k, v, segs

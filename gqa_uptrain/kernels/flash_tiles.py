"""Flash attention's static plan (tile sizes, padded lengths, backend flags) and the in-kernel
helpers its forward and backward kernels share (flash_attention.py): dots in the three operand
orientations, row positions and segments of a tile, the mask, the KV loop bounds.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes. *_q_rows count query rows = query positions × q_per_kv (a tile holds every head
    of a group, so the positions per tile are max(1, rows // q_per_kv)); *_kv count keys.

    Not measured on a GPU (none was available): taken from the Triton tutorial's configurations.
    """

    q_rows: int = 128  # forward
    kv: int = 64
    dkv_q_rows: int = 32  # dK/dV kernel: keys are the resident tile, queries stream
    dkv_kv: int = 128
    dq_q_rows: int = 128  # dQ kernel: queries resident, keys stream
    dq_kv: int = 32


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one call: resolved tiles, padded lengths, backend flags."""

    causal: bool
    scale: float
    q_per_kv: int  # after padding to a power of two on the triton path
    seq_q: int  # real lengths
    seq_kv: int
    seq_q_pad: int
    seq_kv_pad: int
    block_q: int  # query positions per tile, per kernel
    block_kv: int
    block_q_dkv: int
    block_kv_dkv: int
    block_q_dq: int
    block_kv_dq: int
    interpret: bool
    count_blocks: bool = False  # tests only: kernels also return how many blocks each visited

    @property
    def num_q_blocks(self):
        return self.seq_q_pad // self.block_q

    @property
    def full_kv_blocks(self):
        """KV blocks (forward tiling) that hold no padding."""
        return self.seq_kv // self.block_kv


# ----------------------------------------------------------------------------- helpers


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def default_backend() -> tuple[str, bool]:
    """(backend, interpret) for the current default JAX platform: the Triton kernels on a GPU,
    splash attention on a TPU, and the Triton kernels in interpret mode anywhere else (CPU)."""
    platform = jax.default_backend()
    if platform == "tpu":
        return "splash", False
    return "triton", platform != "gpu"


def _dot_nt(a, b):
    """a [m, d] · b [n, d]^T -> [m, n] in fp32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    """a [m, n]^T · b [m, d] -> [n, d] in fp32."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _row_positions(q_start, rows, q_per_kv):
    """[rows, 1] int32 query position of each row of a tile starting at position q_start."""
    return q_start + lax.div(lax.broadcasted_iota(jnp.int32, (rows, 1), 0), q_per_kv)


def _row_segments(seg_block, q_per_kv):
    """[block_q] segment ids -> [rows, 1], one per (position, head) row."""
    block_q = seg_block.shape[0]
    rows = block_q * q_per_kv
    return jnp.broadcast_to(seg_block[:, None], (block_q, q_per_kv)).reshape(rows, 1)


def _mask(kv_start, block_kv, q_pos, q_seg, kv_seg, *, causal, seq_kv):
    """[rows, block_kv] bool: may this row see this key. Padded keys (>= seq_kv) are hidden."""
    kv_pos = kv_start + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
    mask = kv_pos < seq_kv
    if causal:
        mask = jnp.logical_and(mask, kv_pos <= q_pos)
    if q_seg is not None:
        mask = jnp.logical_and(mask, q_seg == kv_seg[None, :])
    return mask


def _kv_loop_bounds(plan: _Plan, q_block, block_q, block_kv, has_segments):
    """(first masked block, end) for a query tile: blocks [0, first_masked) are fully visible to
    every row (no mask needed), [first_masked, end) need the mask, blocks >= end are not visited."""
    num_kv_blocks = plan.seq_kv_pad // block_kv
    clean = plan.seq_kv // block_kv  # blocks without padded keys
    if plan.causal:
        # Last row sits at (q_block + 1) * block_q - 1: keys past it are masked for the whole tile.
        end = jnp.minimum(num_kv_blocks, lax.div((q_block + 1) * block_q + block_kv - 1, block_kv))
        # Block j is fully visible when its last key <= the tile's first position.
        first_masked = jnp.minimum(lax.div(q_block * block_q + 1, block_kv), clean)
        first_masked = jnp.minimum(first_masked, end)
    else:
        end = num_kv_blocks
        first_masked = clean
    if has_segments:
        first_masked = 0
    return first_masked, end

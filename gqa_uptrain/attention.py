"""The one attention entry point, with grouped-query attention (GQA) built in.

Letters used in the einsums below (MaxText's legend):
  b batch, t query position, s key/value position, k KV head, g query head within its group
  (q_per_kv of them), d head_dim, n query head (n = k * q_per_kv + g).

Grouping is contiguous everywhere in this codebase: query head n reads KV head n // q_per_kv.
K/V are never repeated up to num_heads; the query is reshaped to [b, t, k, g, d] instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from gqa_uptrain import heads
from gqa_uptrain.cpu.attention_vjp import attention_vjp
from gqa_uptrain.cpu.cache_attention import cache_attention
from gqa_uptrain.kernels import partition
from gqa_uptrain.masking import mask_value

MODES = ("train", "decode")
KV_LAYOUTS = ("bskd", "bksd")
_MASK_VALUE = mask_value(jnp.float32)  # logits and softmax are float32 here (masking.py)


def make_mask(
    seq_q: int,
    seq_kv: int,
    *,
    causal: bool,
    segment_ids: jax.Array | None = None,
    q_offset: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
) -> jax.Array | None:
    """Boolean mask [batch or 1, seq_q, seq_kv]; True = may attend. None when nothing is masked.

    q_offset [batch] (or scalar) is the cache position of query 0; kv_lengths [batch] the number of
    valid cache entries. segment_ids [batch, seq] applies when queries and keys are the same sequence.
    """
    mask = None

    def conj(a, b):
        return b if a is None else jnp.logical_and(a, b)

    q_pos = jnp.arange(seq_q)[None, :, None]  # [1, t, 1]
    kv_pos = jnp.arange(seq_kv)[None, None, :]  # [1, 1, s]
    if q_offset is not None:
        q_pos = q_pos + jnp.reshape(jnp.asarray(q_offset, jnp.int32), (-1, 1, 1))
    if causal:
        mask = conj(mask, kv_pos <= q_pos)
    if kv_lengths is not None:
        mask = conj(mask, kv_pos < jnp.reshape(jnp.asarray(kv_lengths, jnp.int32), (-1, 1, 1)))
    if segment_ids is not None:
        if seq_q != seq_kv:
            raise ValueError(
                f"segment_ids need seq_q == seq_kv (self-attention); got {seq_q} and {seq_kv}")
        mask = conj(mask, segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


def reference_attention(q, k, v, mask=None, *, kv_layout="bskd"):
    """Plain grouped einsum attention: the ground truth for every other implementation.

    q: [batch, seq_q, num_heads, head_dim]; k, v: [batch, seq_kv, num_kv_heads, head_dim] (or
    [batch, num_kv_heads, seq_kv, head_dim] with kv_layout='bksd'); mask: bool broadcastable to
    [batch, seq_q, seq_kv]. Logits and softmax in float32; returns q's dtype and shape.
    """
    batch, seq_q, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2] if kv_layout == "bskd" else k.shape[1]
    group = heads.group_size(num_heads, num_kv_heads)
    out_dtype = q.dtype
    # Low-precision inputs are upcast: the reference is the ground truth (fp32 throughout), and XLA's
    # CPU dot has no bf16 x bf16 -> f32 kernel for some of these layouts ("DotThunk" error).
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    qg = q.reshape(batch, seq_q, num_kv_heads, group, head_dim)  # [b, t, k, g, d]
    kv_spec = "bskd" if kv_layout == "bskd" else "bksd"
    logits = jnp.einsum(f"btkgd,{kv_spec}->bkgts", qg, k,
                        preferred_element_type=jnp.float32)  # [b, k, g, t, s]
    logits = logits * (head_dim ** -0.5)
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :, :], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum(f"bkgts,{kv_spec}->btkgd", probs, v)  # [b, t, k, g, d]
    return out.reshape(batch, seq_q, num_heads, head_dim).astype(out_dtype)


# ----------------------------------------------------------------------------- implementations
# Every run takes (q, k, v, *, mask, segment_ids, q_offset, kv_lengths, causal, call) and returns
# [batch, seq_q, num_heads, head_dim]. `mask` is attention()'s dense [batch, t, s] mask for the
# candidates that read one (Candidate.masked) and None for the kernels, which mask by position
# and segment themselves.


def _run_reference(q, k, v, *, mask, call, **_):
    return reference_attention(q, k, v, mask, kv_layout=call.kv_layout)


def _run_xla(q, k, v, *, mask, **_):
    # jax.nn.dot_product_attention takes BTNH with fewer KV heads natively (it reshapes the query
    # into groups internally; no repeat). Its mask is [batch, heads, t, s]; broadcast over heads.
    if mask is not None:
        mask = mask[:, None, :, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def _run_einsum_vjp(q, k, v, *, mask, causal, call, **_):
    # Query blocks may skip later keys only when the mask is causal self-attention.
    blocks_ok = call.mode == "train" and causal and q.shape[1] == k.shape[1]
    return attention_vjp(q, k, v, mask, causal=blocks_ok)


def _run_cache(q, k, v, *, mask, **_):
    return cache_attention(q, k, v, mask)


def _run_cudnn(q, k, v, *, causal, **_):
    # cuDNN's fused flash attention: BTNH with fewer KV heads natively; causal by its mask type.
    # Only calls without segment ids and cache positions get here (_cudnn_supports).
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")


def _run_pallas(q, k, v, *, segment_ids, q_offset, kv_lengths, causal, call, **_):
    # Imported here: the kernels pull in Pallas, which the other implementations do not need.
    from gqa_uptrain.kernels import decode_attention, flash_attention  # noqa: PLC0415

    # The backend follows call.platform, not jax.default_backend(), so that 'pallas@tpu' traced
    # on a CPU lowers the TPU kernels. Off a GPU/TPU the Triton kernels run in interpret mode.
    interpret = call.platform not in ("gpu", "tpu")
    if call.mode == "train":
        return flash_attention.flash_attention(
            q, k, v, segment_ids, causal=causal, interpret=interpret,
            backend="splash" if call.platform == "tpu" else "triton")
    # A KV cache (the model's decode and prefill): the decode kernel, over [b, kv_heads, len, d].
    if call.kv_layout == "bskd":
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    return decode_attention.decode_attention(
        q, k, v, kv_lengths, q_offset, causal=causal, interpret=interpret,
        backend="mosaic_tpu" if call.platform == "tpu" else "triton")


# ----------------------------------------------------------------------------- dispatch

PLATFORMS = ("cpu", "gpu", "tpu")
_PLATFORM_ALIASES = {"cuda": "gpu", "rocm": "gpu"}  # jax.export's names -> jax's backend names


@dataclasses.dataclass(frozen=True)
class Call:
    """What choosing an implementation looks at: static facts of one attention call.

    mode: 'train' (a sequence attends to itself: causal, segment ids; training and evaluation) or
    'decode' (queries at cache positions q_offset against a KV cache with kv_lengths).
    platform: jax's backend name ('cpu', 'gpu', 'tpu'). kv_layout: 'bskd' or 'bksd' (the decode
    cache's). segment_ids / cache_positions: whether segment ids / q_offset or kv_lengths were
    given. mesh: the abstract mesh of the surrounding jax.set_mesh (kernels/partition.py's
    context_mesh) or None; selection ignores it, the kernels' wrap runs them per shard over it.
    """

    mode: str
    platform: str
    kv_layout: str
    dtype: str
    head_dim: int
    seq_q: int
    segment_ids: bool = False
    cache_positions: bool = False
    mesh: Any = None


def _unwrapped(run: Callable, call: Call) -> Callable:
    return run


def _per_shard(run: Callable, call: Call) -> Callable:
    """run over call.mesh with shard_map (kernels/partition.py); run itself without a mesh."""
    if call.mesh is None:
        return run

    def sharded(q, k, v, *, mask, segment_ids, q_offset, kv_lengths, causal, call):
        if mask is not None:
            raise ValueError("a kernel run takes no dense mask")  # attention() never passes one
        per_shard = lambda q, k, v, **arrays: run(q, k, v, mask=None, causal=causal, call=call,
                                                  **arrays)
        return partition.shard_call(per_shard, call.mesh, kv_layout=call.kv_layout, q=q, k=k, v=v,
                                    segment_ids=segment_ids, q_offset=q_offset,
                                    kv_lengths=kv_lengths)

    return sharded


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One implementation: supports(call) says why it does not apply (None: it does); run
    computes it (the signature above); masked: attention() builds the dense mask for run (XLA
    ops, which XLA partitions itself); wrap(run, call) is where a call is wrapped over call.mesh:
    shard_map for the kernels (Pallas, which XLA cannot partition, and cuDNN), identity else."""

    run: Callable[..., jax.Array]
    supports: Callable[[Call], str | None]
    masked: bool = True
    wrap: Callable[[Callable, Call], Callable] = _unwrapped


def _needs_layout(layout: str, why: str) -> Callable[[Call], str | None]:
    return lambda c: None if c.kv_layout == layout else f"needs kv_layout={layout!r} ({why})"


def _pallas_supports(c: Call) -> str | None:
    if c.mode == "train" and c.kv_layout != "bskd":
        return "in mode='train' needs kv_layout='bskd' (the flash kernel)"
    if c.mode == "train" and c.cache_positions:
        return ("in mode='train' takes no q_offset/kv_lengths (those are the decode cache's): "
                "use mode='decode'")
    if c.mode == "decode" and c.segment_ids:
        return ("takes segment_ids only in mode='train' (the decode kernel masks by cache "
                "position)")
    return None


CUDNN_DTYPES = ("bfloat16", "float16")
# cuDNN's flash attention takes head_dim <= 256 on Hopper and later (128 before: jax raises at
# trace time there) and a multiple of 8 (jax._src.cudnn.fused_attention_stablehlo).
CUDNN_MAX_HEAD_DIM = 256


def _cudnn_supports(c: Call) -> str | None:
    if c.platform != "gpu":
        return f"runs only on a GPU (platform {c.platform!r})"
    if c.mode != "train" or c.kv_layout != "bskd":
        return "needs mode='train' and kv_layout='bskd' (decoding uses the decode kernel)"
    if c.dtype not in CUDNN_DTYPES:
        return f"needs {' or '.join(CUDNN_DTYPES)} inputs; got {c.dtype}"
    if c.head_dim > CUDNN_MAX_HEAD_DIM or c.head_dim % 8:
        return f"needs head_dim <= {CUDNN_MAX_HEAD_DIM} and a multiple of 8; got {c.head_dim}"
    if c.segment_ids:
        # jax.nn.dot_product_attention would take them only as a dense mask, which it turns into
        # a [batch, 1, seq, seq] bias that cuDNN reads: O(seq^2) memory per layer, the cost flash
        # attention exists to avoid. Packed batches run the Pallas flash kernel instead.
        return ("takes no segment_ids (jax.nn.dot_product_attention would need them as a dense "
                "[batch, 1, seq, seq] mask): packed batches use 'pallas'")
    if c.cache_positions:
        return "takes no q_offset/kv_lengths (use mode='decode')"
    return None


CANDIDATES: dict[str, Candidate] = {
    "reference": Candidate(_run_reference, lambda c: None),
    "xla": Candidate(_run_xla, _needs_layout(
        "bskd", "jax.nn.dot_product_attention has no [batch, kv_heads, seq, dim] layout")),
    "einsum_vjp": Candidate(_run_einsum_vjp, _needs_layout(
        "bskd", "it is the training form; the bksd decode cache uses 'cache'")),
    "cache": Candidate(_run_cache, _needs_layout("bksd", "the decode cache's layout")),
    "cudnn": Candidate(_run_cudnn, _cudnn_supports, masked=False, wrap=_per_shard),
    "pallas": Candidate(_run_pallas, _pallas_supports, masked=False, wrap=_per_shard),
}
IMPLEMENTATIONS = ("auto",) + tuple(CANDIDATES)

# 'auto': the first candidate that supports the call; 'reference' always does, and ends each list.
#   cpu   'pallas' would run in the interpreter; 'einsum_vjp' (attention_vjp's hand-written
#         backward) ran one layer's forward + backward 1.2-1.6x faster than jax.nn's; 'cache'
#         shapes the decode einsums for XLA:CPU by q_per_kv (cpu/cache_attention.py).
#   gpu   training: cuDNN's flash attention where it applies (bf16/fp16, head_dim <= 256, no
#         segment ids), else the Pallas flash kernel (Triton; packed batches, fp32), else
#         jax.nn's XLA attention (scores materialised). Decoding: the Pallas decode kernel.
#   tpu   splash attention for training (kernels/tpu.py, MaxText's TPU kernel); the Mosaic TPU
#         decode kernel for decoding.
# The kernels on GPU and TPU have passed interpret mode, lowering (jax.export) and per-shard
# shapes on a simulated mesh here; none has been timed against the others on a device
# (experiments/gpu_check.sh measures the GPU's).
AUTO: dict[tuple[str, str], tuple[str, ...]] = {
    ("cpu", "train"): ("einsum_vjp", "reference"),
    ("cpu", "decode"): ("cache", "reference"),
    ("gpu", "train"): ("cudnn", "pallas", "xla", "reference"),
    ("gpu", "decode"): ("pallas", "reference"),
    ("tpu", "train"): ("pallas", "xla", "reference"),
    ("tpu", "decode"): ("pallas", "reference"),
}


def parse_implementation(implementation: str) -> tuple[str, str | None]:
    """'name' -> (name, None); 'name@platform' -> (name, platform), platform one of PLATFORMS
    ('cuda'/'rocm' read as 'gpu'). The suffix selects and lowers as on that platform whatever
    jax.default_backend() is: jax.export(platforms=['tpu']) of a step traced on a CPU needs
    'auto@tpu'. It is part of the static implementation string, so jit caches keep it apart."""
    name, at, platform = implementation.partition("@")
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}: {name!r} is not one of "
                         f"{IMPLEMENTATIONS}")
    if not at:
        return name, None
    platform = _PLATFORM_ALIASES.get(platform, platform)
    if platform not in PLATFORMS:
        raise ValueError(f"implementation={implementation!r}: platform {platform!r} is not one "
                         f"of {PLATFORMS + tuple(_PLATFORM_ALIASES)}")
    return name, platform


def select(implementation: str, call: Call) -> str:
    """The implementation that runs `call`: `implementation` itself if it supports the call,
    the first supporting candidate of AUTO[(platform, mode)] for 'auto' (a platform suffix,
    'auto@tpu', is checked; call.platform decides). A pure function of its arguments;
    ValueError naming the implementation and why it does not apply."""
    name, _ = parse_implementation(implementation)
    if call.mode not in MODES:
        raise ValueError(f"mode={call.mode!r} is not one of {MODES}")
    if call.kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout={call.kv_layout!r} is not one of {KV_LAYOUTS}")
    if name != "auto":
        why = CANDIDATES[name].supports(call)
        if why is not None:
            raise ValueError(f"implementation={name!r} {why}")
        return name
    names = AUTO.get((call.platform, call.mode), ("reference",))
    return next(n for n in names if CANDIDATES[n].supports(call) is None)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mode: str = "train",
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    q_offset: jax.Array | None = None,
    kv_lengths: jax.Array | None = None,
    implementation: str = "auto",
    kv_layout: str | None = None,
) -> jax.Array:
    """Grouped-query attention.

    Args:
      q: [batch, seq_q, num_heads, head_dim].
      k, v: [batch, seq_kv, num_kv_heads, head_dim] (kv_layout='bskd', mode='train''s), or
        [batch, num_kv_heads, seq_kv, head_dim] (kv_layout='bksd', mode='decode''s cache).
      mode: 'train' (self-attention of a sequence: training, evaluation) or 'decode' (queries at
        cache positions against a KV cache). kv_layout defaults to the mode's.
      causal: query i (at position q_offset + i) sees keys at positions <= its own.
      segment_ids: [batch, seq] ints; tokens attend only within their segment (packed documents).
      q_offset: [batch] (or scalar) cache position of the first query, for decoding.
      kv_lengths: [batch] number of valid key/value positions per sequence.
      implementation: a CANDIDATES name or 'auto' (select(): AUTO's first candidate for the
        platform and mode), optionally '@platform' (parse_implementation). 'reference' (grouped
        einsum), 'xla' (jax.nn.dot_product_attention), 'einsum_vjp' (the reference's math with
        attention_vjp's backward), 'cache' (bksd: XLA einsums shaped for decode), 'cudnn'
        (jax.nn's cuDNN flash attention, GPU), 'pallas' (gqa_uptrain.kernels: in mode 'train'
        flash attention with a Pallas backward — splash on a TPU —, in mode 'decode' the
        split-K decode kernel, forward only; on CPU both run in interpret mode). Under a
        jax.set_mesh with sharding.MESH_AXES, 'cudnn' and 'pallas' run per shard in shard_map
        (kernels/partition.py). A run-time choice, never stored.
    Returns:
      [batch, seq_q, num_heads, head_dim] in q's dtype.
    """
    name, platform = parse_implementation(implementation)
    kv_layout = kv_layout or ("bskd" if mode == "train" else "bksd")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be rank 4; got shapes {q.shape}, {k.shape}, {v.shape}")
    call = Call(mode=mode, platform=platform or jax.default_backend(), kv_layout=kv_layout,
                dtype=jnp.dtype(q.dtype).name, head_dim=q.shape[3], seq_q=q.shape[1],
                segment_ids=segment_ids is not None,
                cache_positions=q_offset is not None or kv_lengths is not None,
                mesh=partition.context_mesh())
    impl = select(name, call)
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    seq_axis, head_axis = (1, 2) if kv_layout == "bskd" else (2, 1)
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head_dim")
    heads.group_size(q.shape[2], k.shape[head_axis])  # validates the head counts
    candidate = CANDIDATES[impl]
    mask = None
    if candidate.masked:
        mask = make_mask(q.shape[1], k.shape[seq_axis], causal=causal, segment_ids=segment_ids,
                         q_offset=q_offset, kv_lengths=kv_lengths)
        if mask is not None:
            mask = jnp.broadcast_to(mask, (q.shape[0],) + mask.shape[1:])
    run = candidate.wrap(candidate.run, call)
    return run(q, k, v, mask=mask, segment_ids=segment_ids, q_offset=q_offset,
               kv_lengths=kv_lengths, causal=causal, call=call)

"""30-second smoke check of the Pallas kernels on a GPU (or TPU), run by experiments/gpu_check.sh.

Compiles and runs the real (non-interpret) flash attention forward + backward and the decode
kernel once each at small shapes, then attention() as the trainer calls it — under jax.set_mesh,
so the kernels run inside shard_map (one device: a 1x1x1 mesh) — with 'auto' on packed rows (the
Pallas flash kernel) and without segment ids (cuDNN on a GPU), all against the plain-JAX
references at 'highest' precision. Exits non-zero if any check fails. Needs only jax and this
package (no flax, no pytest).
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp

from gqa_uptrain import attention as attention_lib
from gqa_uptrain import sharding
from gqa_uptrain.kernels import decode_attention as da
from gqa_uptrain.kernels import flash_attention as fa


def _err(a, b):
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def main() -> int:
    start = time.perf_counter()
    platform = jax.default_backend()
    print(f"jax {jax.__version__}, platform {platform}, devices {jax.devices()}")
    if platform not in ("gpu", "tpu"):
        print("smoke: no GPU/TPU visible to JAX (set JAX_PLATFORMS=cuda and install jax[cuda])",
              file=sys.stderr)
        return 1
    failures = 0
    batch, seq, num_heads, num_kv_heads, head_dim = 2, 256, 8, 2, 64
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    for dtype, atol in ((jnp.bfloat16, 5e-2), (jnp.float32, 5e-3)):  # fp32 runs as TF32 on a GPU
        q = jax.random.normal(keys[0], (batch, seq, num_heads, head_dim)).astype(dtype)
        k = jax.random.normal(keys[1], (batch, seq, num_kv_heads, head_dim)).astype(dtype)
        v = jax.random.normal(keys[2], (batch, seq, num_kv_heads, head_dim)).astype(dtype)
        do = jax.random.normal(keys[3], q.shape).astype(dtype)

        def both(attn):
            return jax.jit(lambda q, k, v, do: (lambda o, f: (o, *f(do)))(*jax.vjp(attn, q, k, v)))

        got = both(lambda q, k, v: fa.flash_attention(q, k, v, causal=True))(q, k, v, do)
        with jax.default_matmul_precision("highest"):
            f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
            want = both(lambda q, k, v: fa.flash_attention_reference(q, k, v, causal=True))(*f32)
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
            err = _err(g, w) / max(1.0, float(jnp.max(jnp.abs(w))))
            ok = err <= atol
            failures += not ok
            print(f"flash {jnp.dtype(dtype).name:8s} {name:3s} max rel err {err:.2e} "
                  f"{'ok' if ok else 'FAIL'}")
    cache_k = jax.random.normal(keys[1], (batch, num_kv_heads, 1024, head_dim)).astype(jnp.bfloat16)
    cache_v = jax.random.normal(keys[2], cache_k.shape).astype(jnp.bfloat16)
    q1 = jax.random.normal(keys[0], (batch, 1, num_heads, head_dim)).astype(jnp.bfloat16)
    lengths = jnp.array([300, 1024], jnp.int32)
    got = jax.jit(lambda *a: da.decode_attention(*a, lengths, lengths - 1))(q1, cache_k, cache_v)
    with jax.default_matmul_precision("highest"):
        want = da.decode_attention_reference(q1.astype(jnp.float32), cache_k.astype(jnp.float32),
                                             cache_v.astype(jnp.float32), lengths, lengths - 1)
    err = _err(got, want)
    failures += err > 3e-2
    print(f"decode   bfloat16 out max abs err {err:.2e} {'ok' if err <= 3e-2 else 'FAIL'}")
    failures += _attention_under_a_mesh(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                                        v.astype(jnp.bfloat16), do.astype(jnp.bfloat16))
    print(f"smoke: {'PASS' if not failures else f'{failures} FAILURES'} "
          f"in {time.perf_counter() - start:.1f} s")
    return 1 if failures else 0


def _attention_under_a_mesh(q, k, v, do) -> int:
    """attention(implementation='auto') inside jax.set_mesh (the trainer's way), bf16, with and
    without segment ids; returns the number of failed checks."""
    batch, seq = q.shape[:2]
    segments = (jnp.arange(seq)[None, :] >= seq // 3).astype(jnp.int32) * jnp.ones((batch, 1),
                                                                                 jnp.int32)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    failures = 0
    for seg in (segments, None):
        call = attention_lib.Call(mode="train", platform=jax.default_backend(), kv_layout="bskd",
                                  dtype="bfloat16", head_dim=q.shape[3], seq_q=seq,
                                  segment_ids=seg is not None)
        chosen = attention_lib.select("auto", call)
        attn = lambda q, k, v, seg=seg: attention_lib.attention(q, k, v, segment_ids=seg)
        both = jax.jit(lambda q, k, v, do: (lambda o, f: (o, *f(do)))(*jax.vjp(attn, q, k, v)))
        try:
            with jax.set_mesh(mesh):
                got = both(q, k, v, do)
        except Exception as e:  # noqa: BLE001 (reported, and counted as a failure)
            print(f"auto ({chosen}) under a mesh FAILED: {type(e).__name__}: "
                  f"{str(e).splitlines()[0][:200]}")
            failures += 1
            continue
        reference = lambda q, k, v, seg=seg: fa.flash_attention_reference(q, k, v, seg)
        f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
        with jax.default_matmul_precision("highest"):
            want = jax.jit(lambda q, k, v, do: (lambda o, f: (o, *f(do)))(
                *jax.vjp(reference, q, k, v)))(*f32)
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
            err = _err(g, w) / max(1.0, float(jnp.max(jnp.abs(w))))
            ok = err <= 5e-2
            failures += not ok
            print(f"auto={chosen:7s} {'packed' if seg is not None else 'causal':6s} {name:3s} "
                  f"max rel err {err:.2e} {'ok' if ok else 'FAIL'}")
    return failures


if __name__ == "__main__":
    sys.exit(main())

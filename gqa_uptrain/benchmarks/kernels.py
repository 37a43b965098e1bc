"""Pallas attention kernels against jax.nn.dot_product_attention (and cuDNN on a GPU).

    python -m gqa_uptrain.bench kernels [--quick] [--sweep-blocks]

The Pallas attention kernels (gqa_uptrain.kernels, through attention(..., implementation='pallas'))
against jax.nn.dot_product_attention ('xla', and 'cudnn' on a GPU) at
batch 4, seq 4096, 32 query heads, num_kv_heads in {32, 8, 1}, head_dim 128, bf16, causal:
  fwd       attention forward                          TFLOP/s (FLOPs of the causal half)
  fwd+bwd   forward and backward (jax.vjp)             TFLOP/s, counting backward = 2.5 x forward
  decode    one new token per sequence vs a full cache GB/s of KV cache read
            (of 4096 positions; also 'reference', the grouped einsum over the model's cache layout)
Ratios in the table are `pallas speed-up`: time(impl) / time(pallas) (> 1: pallas is faster).
Peaks: the spec sheet's dense peak for known devices, and the matmul peak / read bandwidth measured
in the same run (gqa_uptrain.perf). `--quick` shrinks everything (batch 1, seq 128, 4 heads,
num_kv_heads 4 and 1, head_dim 32, fp32) so that it runs on a CPU in Pallas interpret mode, where
times say nothing about kernel speed; CI runs it as a smoke test.

`kernels --sweep-blocks` times the pallas kernels over a few tile sizes at num_kv_heads 8 instead;
its JSON line holds {"bench": "kernels_sweep", "device", "best": {kernel: tiles}}.

Headline JSON keys (`kernels`): bench, device, platform, interpret, dtype, shape
{batch, seq, num_heads, head_dim}, peak_tflops / peak_gbps (spec sheet, null if unknown),
measured_tflops / measured_gbps, and per num_kv_heads (string keys):
  fwd_ms, fwd_bwd_ms, decode_us: the pallas times;
  fwd_bwd_tflops, fwd_bwd_vs_xla, fwd_bwd_vs_cudnn (time(other)/time(pallas); null if unavailable);
  fwd_vs_cudnn, decode_gbps, decode_hbm_fraction (of the spec peak, else of the measured bandwidth),
  decode_vs_reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gqa_uptrain.benchmarks.common import attempt, fmt

# Dense bf16 TFLOP/s and HBM GB/s from the vendors' spec sheets, by a substring of device_kind.
# fp32 peaks are taken as half (TF32 on GPUs). Ordered: the first match wins.
_SPEC_PEAKS = (
    ("H200", 989.0, 4800.0),
    ("H100 PCIe", 756.0, 2000.0),
    ("H100", 989.0, 3350.0),
    ("A100-SXM4-40GB", 312.0, 1555.0),
    ("A100", 312.0, 2039.0),
    ("L4", 121.0, 300.0),
    ("TPU v6 lite", 918.0, 1640.0),
    ("TPU v5 lite", 197.0, 819.0),
    ("TPU v5p", 459.0, 2765.0),
    ("TPU v5", 459.0, 2765.0),
    ("TPU v4", 275.0, 1228.0),
)


def spec_peaks(device_kind: str, dtype) -> tuple[float | None, float | None]:
    """(TFLOP/s, GB/s) of a known device from its spec sheet, else (None, None)."""
    for name, tflops, gbps in _SPEC_PEAKS:
        if name in device_kind:
            return (tflops if jnp.dtype(dtype) != jnp.float32 else tflops / 2), gbps
    return None, None


# ----------------------------------------------------------------------------- timing


def _compile(fn: Callable, *args):
    # In interpret mode (CPU) XLA's backend optimisations only slow the compile of the kernels'
    # interpreter loops; the times are meaningless there anyway.
    lowered = jax.jit(fn).lower(*args)
    if jax.default_backend() == "cpu":
        return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
    return lowered.compile()


def _time(compiled, args, iters: int, repeats: int = 3) -> float:
    """Median over `repeats` of the mean seconds per call of `iters` back-to-back calls."""
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(iters):
            out = compiled(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / iters)
    return float(np.median(times))


# ----------------------------------------------------------------------------- kernels


def _attention_fns(causal: bool = True):
    from gqa_uptrain import attention as attention_lib  # noqa: PLC0415

    def pallas(q, k, v):
        return attention_lib.attention(q, k, v, causal=causal, implementation="pallas")

    def dpa(impl):
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                            implementation=impl)

    fns = {"pallas": pallas, "xla": dpa("xla")}
    if jax.default_backend() == "gpu":
        fns["cudnn"] = dpa("cudnn")
    return fns


def _decode_fns():
    from gqa_uptrain import attention as attention_lib  # noqa: PLC0415

    def cache_path(impl):
        # The model's decode path: cache [b, K, S, d], query at position lengths - 1.
        return lambda q, k_bksd, v_bksd, k_bskd, v_bskd, lengths: attention_lib.attention(
            q, k_bksd, v_bksd, causal=True, q_offset=lengths - 1, kv_lengths=lengths,
            implementation=impl, mode="decode")

    def dpa(impl):
        return lambda q, k_bksd, v_bksd, k_bskd, v_bskd, lengths: jax.nn.dot_product_attention(
            q, k_bskd, v_bskd, key_value_seq_lengths=lengths, implementation=impl)

    fns = {"pallas": cache_path("pallas"), "reference": cache_path("reference"), "xla": dpa("xla")}
    if jax.default_backend() == "gpu":
        fns["cudnn"] = dpa("cudnn")
    return fns


def _fwd_bwd(attn, q, k, v, do):
    out, vjp = jax.vjp(attn, q, k, v)
    return out, vjp(do)


def _repeat_decode(fn, steps: int):
    """`steps` dependent decode calls in one executable (the next query is the last output), so that
    per-call dispatch does not hide a kernel of a few microseconds."""

    def run(q, *cache):
        for _ in range(steps):
            q = fn(q, *cache).astype(q.dtype)
        return q

    return run


def run_kernels(args) -> dict:
    quick = args.quick
    platform = jax.default_backend()
    device = jax.devices()[0].device_kind
    if quick:
        batch, seq, num_heads, head_dim, kv_heads = 1, 128, 4, 32, (4, 1)
        dtype, iters, decode_steps = jnp.float32, 1, 2
    else:
        batch, seq, num_heads, head_dim, kv_heads = 4, 4096, 32, 128, (32, 8, 1)
        dtype, iters, decode_steps = jnp.bfloat16, 10, 16
    interpret = platform not in ("gpu", "tpu")
    peak_tflops, peak_gbps = spec_peaks(device, dtype)
    from gqa_uptrain import perf  # noqa: PLC0415

    measured_tflops = perf.measure_peak_flops(256 if quick else 8192, dtype=dtype) / 1e12
    measured_gbps = perf.measure_bandwidth(1 << (24 if quick else 30)) / 1e9
    flop_peak = peak_tflops or measured_tflops
    byte_peak = peak_gbps or measured_gbps
    # Causal: seq (seq + 1) / 2 visible (query, key) pairs; 2 matmuls of 2 FLOPs per pair and dim.
    fwd_flops = 4 * batch * num_heads * head_dim * seq * (seq + 1) / 2

    info = dict(device=device, platform=platform, interpret=interpret,
                dtype=jnp.dtype(dtype).name, batch=batch, seq=seq, num_heads=num_heads,
                head_dim=head_dim, flop_peak=flop_peak, byte_peak=byte_peak,
                spec=peak_tflops is not None, measured_tflops=measured_tflops,
                measured_gbps=measured_gbps)
    # Rows are printed as they are measured (pallas first in each op), so a run cut short by a
    # timeout still leaves what it measured.
    _print_header(info)
    headline = {}
    key = jax.random.PRNGKey(0)
    for num_kv_heads in kv_heads:
        kq, kk, kv, kd = jax.random.split(jax.random.fold_in(key, num_kv_heads), 4)
        q = jax.random.normal(kq, (batch, seq, num_heads, head_dim), jnp.float32).astype(dtype)
        k = jax.random.normal(kk, (batch, seq, num_kv_heads, head_dim), jnp.float32).astype(dtype)
        v = jax.random.normal(kv, (batch, seq, num_kv_heads, head_dim), jnp.float32).astype(dtype)
        do = jax.random.normal(kd, q.shape, jnp.float32).astype(dtype)
        times = {}

        def ratio(op, other):
            a, b = times.get((op, other)), times.get((op, "pallas"))
            return None if a is None or b is None else a / b

        def record(op, impl, seconds, err, tflops=None, gbps=None):
            times[(op, impl)] = seconds
            _print_row(info, dict(num_kv_heads=num_kv_heads, op=op, impl=impl, seconds=seconds,
                                  error=err, tflops=tflops, gbps=gbps,
                                  speedup=None if impl == "pallas" else ratio(op, impl)))

        for op in ("fwd", "fwd+bwd"):
            flops = fwd_flops * (1 if op == "fwd" else 3.5)
            for impl, fn in _attention_fns().items():
                if op == "fwd":
                    target, call_args = fn, (q, k, v)
                else:
                    target = functools.partial(_fwd_bwd, fn)
                    call_args = (q, k, v, do)
                seconds, err = attempt(
                    lambda: _time(_compile(target, *call_args), call_args, iters))
                record(op, impl, seconds, err,
                       tflops=None if seconds is None else flops / seconds / 1e12)
        # Decode: a full cache of `seq` positions; the new token is the last one.
        cache_bksd = (jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))
        lengths = jnp.full((batch,), seq, jnp.int32)
        q1 = q[:, -1:]
        cache_bytes = 2 * batch * num_kv_heads * seq * head_dim * jnp.dtype(dtype).itemsize
        for impl, fn in _decode_fns().items():
            call_args = (q1, *cache_bksd, k, v, lengths)
            run = _repeat_decode(fn, decode_steps)
            seconds, err = attempt(
                lambda: _time(_compile(run, *call_args), call_args, 1) / decode_steps)
            record("decode", impl, seconds, err,
                   gbps=None if seconds is None else cache_bytes / seconds / 1e9)

        pallas_fb, pallas_dec = times.get(("fwd+bwd", "pallas")), times.get(("decode", "pallas"))
        decode_gbps = None if pallas_dec is None else cache_bytes / pallas_dec / 1e9
        headline[str(num_kv_heads)] = dict(
            fwd_ms=_ms(times.get(("fwd", "pallas"))), fwd_bwd_ms=_ms(pallas_fb),
            decode_us=None if pallas_dec is None else pallas_dec * 1e6,
            fwd_bwd_tflops=None if pallas_fb is None else 3.5 * fwd_flops / pallas_fb / 1e12,
            fwd_bwd_vs_xla=ratio("fwd+bwd", "xla"), fwd_bwd_vs_cudnn=ratio("fwd+bwd", "cudnn"),
            fwd_vs_cudnn=ratio("fwd", "cudnn"),
            decode_gbps=decode_gbps,
            decode_hbm_fraction=None if decode_gbps is None else decode_gbps / byte_peak,
            decode_vs_reference=ratio("decode", "reference"))
    print()
    return dict(bench="kernels", device=device, platform=platform, interpret=interpret,
                dtype=jnp.dtype(dtype).name,
                shape=dict(batch=batch, seq=seq, num_heads=num_heads, head_dim=head_dim),
                peak_tflops=peak_tflops, peak_gbps=peak_gbps, measured_tflops=measured_tflops,
                measured_gbps=measured_gbps, num_kv_heads=headline)


def _ms(seconds):
    return None if seconds is None else seconds * 1e3


def _print_header(info):
    source = "spec sheet" if info["spec"] else "measured in this run"
    caveat = ", Pallas interpret mode: times say nothing about kernel speed"
    print(f"## Attention kernels — {info['device']} ({info['platform']}"
          f"{caveat if info['interpret'] else ''})")
    print(f"batch {info['batch']}, seq {info['seq']}, {info['num_heads']} query heads, head_dim "
          f"{info['head_dim']}, {info['dtype']}, causal. Peaks ({source}): "
          f"{info['flop_peak']:.4g} TFLOP/s, {info['byte_peak']:.4g} GB/s; measured matmul "
          f"{info['measured_tflops']:.4g} TFLOP/s, read {info['measured_gbps']:.4g} GB/s. "
          "decode: one new token per sequence against a full cache; pallas speed-up = "
          "time(impl) / time(pallas).")
    print()
    print("| num_kv_heads | op | impl | time | TFLOP/s | % peak | GB/s | % peak BW "
          "| pallas speed-up |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|", flush=True)


def _print_row(info, r):
    if r["seconds"] is None:
        time_s = f"n/a ({r['error']})"
    elif r["op"] == "decode":
        time_s = f"{r['seconds'] * 1e6:.1f} µs"
    else:
        time_s = f"{r['seconds'] * 1e3:.3f} ms"
    tflops_pct = None if r["tflops"] is None else 100 * r["tflops"] / info["flop_peak"]
    gbps_pct = None if r["gbps"] is None else 100 * r["gbps"] / info["byte_peak"]
    print(f"| {r['num_kv_heads']} | {r['op']} | {r['impl']} | {time_s} | {fmt(r['tflops'])} | "
          f"{fmt(tflops_pct, '{:.0f}%')} | {fmt(r['gbps'], '{:.4g}')} | "
          f"{fmt(gbps_pct, '{:.0f}%')} | {fmt(r['speedup'], '{:.2f}×')} |", flush=True)


def sweep_blocks(quick: bool) -> dict:
    """Times the pallas kernels over a few tile sizes at num_kv_heads 8 (the defaults in
    kernels/flash_attention.BlockSizes and decode_attention were not measured on a GPU)."""
    from gqa_uptrain.kernels import decode_attention as da  # noqa: PLC0415
    from gqa_uptrain.kernels import flash_attention as fa  # noqa: PLC0415

    if quick:
        batch, seq, num_heads, num_kv_heads, head_dim = 1, 64, 4, 2, 32
        dtype, iters = jnp.float32, 1
    else:
        batch, seq, num_heads, num_kv_heads, head_dim = 4, 4096, 32, 8, 128
        dtype, iters = jnp.bfloat16, 5
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(1), 4)
    q = jax.random.normal(kq, (batch, seq, num_heads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (batch, seq, num_kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (batch, seq, num_kv_heads, head_dim), jnp.float32).astype(dtype)
    do = jax.random.normal(kd, q.shape, jnp.float32).astype(dtype)
    default = fa.BlockSizes()
    candidates = {
        "fwd": [(128, 64), (128, 128), (64, 64), (64, 128)],
        "dkv": [(32, 128), (64, 64), (64, 128), (32, 64)],
        "dq": [(128, 32), (64, 64), (128, 64), (64, 32)],
    }
    fields = {"fwd": ("q_rows", "kv"), "dkv": ("dkv_q_rows", "dkv_kv"),
              "dq": ("dq_q_rows", "dq_kv")}
    results, best = [], {}
    for kernel, tiles in candidates.items():
        for rows, keys in tiles:
            sizes = dataclasses.replace(default, **dict(zip(fields[kernel], (rows, keys))))
            attn = functools.partial(fa.flash_attention, causal=True, block_sizes=sizes)
            if kernel == "fwd":
                target, call_args = attn, (q, k, v)
            else:
                target = lambda q, k, v, do, attn=attn: jax.vjp(attn, q, k, v)[1](do)
                call_args = (q, k, v, do)
            seconds, err = attempt(lambda: _time(_compile(target, *call_args), call_args, iters))
            results.append((kernel, f"q_rows {rows}, kv {keys}", seconds, err))
            if seconds is not None and (kernel not in best or seconds < best[kernel][1]):
                best[kernel] = ([rows, keys], seconds)
    cache = (jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))
    lengths = jnp.full((batch,), seq, jnp.int32)
    for block_kv, splits in [(128, None), (64, None), (256, None), (128, 4), (128, 16)]:
        fn = functools.partial(lambda q, k, v, block_kv, splits: da.decode_attention(
            q, k, v, lengths, lengths - 1, block_kv=block_kv, num_splits=splits),
            block_kv=block_kv, splits=splits)
        run = _repeat_decode(lambda q, k, v: fn(q, k, v), 2 if quick else 16)
        call_args = (q[:, -1:], *cache)
        seconds, err = attempt(lambda: _time(_compile(run, *call_args), call_args, 1)
                            / (2 if quick else 16))
        tiles = f"block_kv {block_kv}, num_splits {splits or 'auto'}"
        results.append(("decode", tiles, seconds, err))
        if seconds is not None and ("decode" not in best or seconds < best["decode"][1]):
            best["decode"] = ([block_kv, splits], seconds)
    print(f"## Tile sweep — {jax.devices()[0].device_kind}: batch {batch}, seq {seq}, "
          f"{num_heads} heads, num_kv_heads {num_kv_heads}, head_dim {head_dim}, "
          f"{jnp.dtype(dtype).name}, causal (fwd: forward time; dkv/dq: forward+backward time, "
          "the other tiles at their defaults; decode: per step)")
    print()
    print("| kernel | tiles | time |")
    print("|---|---|---:|")
    for kernel, tiles, seconds, err in results:
        shown = f"n/a ({err})" if seconds is None else (
            f"{seconds * 1e6:.1f} µs" if kernel == "decode" else f"{seconds * 1e3:.3f} ms")
        print(f"| {kernel} | {tiles} | {shown} |")
    print()
    return dict(bench="kernels_sweep", device=jax.devices()[0].device_kind,
                best={name: tiles for name, (tiles, _) in best.items()})


def run(args) -> dict:
    return sweep_blocks(args.quick) if args.sweep_blocks else run_kernels(args)


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, runs on CPU in interpret mode (CI smoke test)")
    parser.add_argument("--sweep-blocks", action="store_true",
                        help="time the pallas kernels over a few tile sizes instead")

"""Decode step per KV-head count, against its roofline and against `transformers`.

    python -m gqa_uptrain.bench decode [--quick] [--batch 8] [--contexts 2048,8192]
        [--num_kv_heads 16,8,4,2,1] [--repeats 7] [--implementation auto] [--no_peer]

Model (random weights, fp32, KV cache fp32): d_model 1024, 4 layers, 16 query heads of head_dim
64, mlp 2816, vocab 4096 (small, so that the KV cache rather than the output head dominates),
untied; batch 8; cached contexts 2048 and 8192; num_kv_heads G = every divisor of 16, from 16
(MHA) down to 1 (MQA). At 8192 the MHA cache is 2 GiB (8 sequences x 8192 tokens x 32 KiB).

What is timed: one decode step of the whole model (all layers, cache in place, one new token per
sequence) through perf.decode_step_setup + perf.measure_decode, the same measurement the
experiment suite uses; beside it, the peer peers.hf_decode_step: `transformers`' Llama on PyTorch
CPU with its StaticCache filled directly to the same context, one-token forward (what `generate`
runs per token), same shapes, dtype and thread count (torch uses every core, as XLA's CPU client
does). Memory: one (G, context) is built at a time — ours and the peer — measured with the two
ALTERNATED round-robin (warm-up, then `repeats` rounds, median per step), then freed before the
next. So "ours vs transformers" is a side-by-side ratio, while "speed-up vs MHA" compares
measurements taken one after the other (order: G from MHA down, contexts in the given order).

Columns, per (context, G): ms/token (ours, transformers); KV cache MiB (the `context` valid
tokens); bytes moved per step = weights read + whole KV cache read + the new token's K/V written,
and FLOPs per step (perf.decode_cost); roofline = max(bytes / bandwidth, FLOPs / peak) with the
read bandwidth (a sum over 1 GiB) and fp32 matmul peak (2048^3) measured in this run
(perf.measure_bandwidth / measure_peak_flops); % of roofline = roofline / measured time;
speed-up vs MHA = t(MHA) / t(G) at the same context, beside the ideal = roofline(MHA) /
roofline(G); ours vs transformers = t(transformers) / t(ours) (> 1: ours is faster).

`--quick` (CI smoke test, times meaningless): d_model 128, 2 layers, 4 heads, mlp 352, vocab 512,
num_kv_heads 4 and 1, batch 2, contexts 128 and 512, 2 repeats, bandwidth over 16 MiB, peak from
a 256^3 matmul.

Headline JSON keys: bench ("decode"), quick, machine {date_utc, cpu, cpu_count, platform,
device, jax, python}, config (ModelConfig.to_dict of the MHA model), batch, contexts, repeats,
implementation, torch_threads (null without the peer), bandwidth_gbps, peak_gflops, rows: one per
(context, num_kv_heads) {context, num_kv_heads, ms_per_token, hf_ms_per_token (null: peer not
run or failed; then hf_error), kv_cache_mib, bytes_per_step, flops_per_step, roofline_ms,
roofline_fraction, speedup_vs_mha (null without an MHA row), ideal_speedup, speedup_vs_hf},
targets {all_ge_70pct_roofline_at_long_context, faster_than_hf_every_g (every row; null without
the peer), monotonic (at every context, ms/token never rises as G falls), half_ideal_speedup_at_long
(at the longest context, every G's speed-up >= half its ideal; null without an MHA row)}: booleans;
under --quick each is "not judged (--quick)" (bench.py).
"""

from __future__ import annotations

import argparse
import gc
import sys
from typing import Any

from gqa_uptrain import peers, perf
from gqa_uptrain.benchmarks.common import (BenchError, attempt, fmt, machine_info,
                                           machine_line)
from gqa_uptrain.model import ModelConfig

MODEL = ModelConfig(vocab_size=4096, d_model=1024, num_layers=4, num_heads=16, num_kv_heads=16,
                    mlp_dim=2816)
BATCH, CONTEXTS, REPEATS = 8, (2048, 8192), 7
QUICK_MODEL = ModelConfig(vocab_size=512, d_model=128, num_layers=2, num_heads=4, num_kv_heads=4,
                          mlp_dim=352)
QUICK_BATCH, QUICK_CONTEXTS, QUICK_KV_HEADS, QUICK_REPEATS = 2, (128, 512), (4, 1), 2
MIB = 2 ** 20

HEADERS = ("context", "num_kv_heads", "ms/token ours", "ms/token transformers", "KV cache MiB",
           "MB moved/step", "GFLOP/step", "roofline ms", "% of roofline", "speed-up vs MHA",
           "ideal speed-up", "ours vs transformers")


def kv_head_counts(num_heads: int) -> list[int]:
    """Every valid num_kv_heads, MHA first: the divisors of num_heads, descending."""
    return [g for g in range(num_heads, 0, -1) if num_heads % g == 0]


def measure_point(config: ModelConfig, batch: int, context: int, *, repeats: int,
                  bandwidth: float, peak_flops: float, peer: bool = True,
                  implementation: str = "auto") -> dict[str, Any]:
    """One (G, context) point: ours (and the peer, alternated with it) timed, plus the cost model.

    Builds both, measures, and drops them (the caller's gc.collect frees the caches). Returns the
    row dict of the module docstring without the MHA-relative entries.
    """
    cost = perf.decode_cost(config, batch, context)
    variants = [("ours", perf.decode_step_setup(config, batch, context,
                                                implementation=implementation))]
    hf_error = None
    if peer:  # torch is imported only now (peers.py imports it lazily)
        hf_step, hf_error = attempt(lambda: peers.hf_decode_step(config, batch, context))
        if hf_step is not None:
            variants.append(("transformers", hf_step))
    seconds = perf.measure_decode(variants, repeats=repeats)
    del variants
    roofline = cost.roofline_seconds(bandwidth, peak_flops)
    ours, theirs = seconds["ours"], seconds.get("transformers")
    row = dict(context=context, num_kv_heads=config.num_kv_heads, ms_per_token=ours * 1e3,
               hf_ms_per_token=None if theirs is None else theirs * 1e3,
               kv_cache_mib=cost.kv_read_bytes / MIB, bytes_per_step=cost.total_bytes,
               flops_per_step=cost.flops, roofline_ms=roofline * 1e3,
               roofline_fraction=roofline / ours,
               speedup_vs_hf=None if theirs is None else theirs / ours)
    if hf_error is not None:
        row["hf_error"] = hf_error
    return row


def _table_row(r: dict[str, Any]) -> str:
    cells = (r["context"], r["num_kv_heads"], fmt(r["ms_per_token"], "{:.1f}"),
             fmt(r["hf_ms_per_token"], "{:.1f}") or f"n/a ({r.get('hf_error', 'not run')})",
             fmt(r["kv_cache_mib"], "{:.0f}"), fmt(r["bytes_per_step"] / 1e6, "{:.0f}"),
             fmt(r["flops_per_step"] / 1e9, "{:.2f}"), fmt(r["roofline_ms"], "{:.1f}"),
             fmt(100 * r["roofline_fraction"], "{:.0f}%"),
             fmt(r["speedup_vs_mha"], "{:.2f}×"), fmt(r["ideal_speedup"], "{:.2f}×"),
             fmt(r["speedup_vs_hf"], "{:.2f}×"))
    return "| " + " | ".join(str(c) for c in cells) + " |"


def targets(rows: list[dict[str, Any]], num_heads: int) -> dict[str, bool | None]:
    """The issue's targets as booleans (null where the run lacks what one needs)."""
    long = max(r["context"] for r in rows)
    at_long = [r for r in rows if r["context"] == long]
    monotonic = True
    for context in {r["context"] for r in rows}:
        ms = [r["ms_per_token"] for r in sorted(rows, key=lambda r: -r["num_kv_heads"])
              if r["context"] == context]
        monotonic &= all(b <= a for a, b in zip(ms, ms[1:]))
    has_peer = all(r["speedup_vs_hf"] is not None for r in rows)
    has_mha = any(r["num_kv_heads"] == num_heads for r in at_long)
    return {
        "all_ge_70pct_roofline_at_long_context": all(r["roofline_fraction"] >= 0.7
                                                     for r in at_long),
        "faster_than_hf_every_g": all(r["speedup_vs_hf"] > 1 for r in rows) if has_peer else None,
        "monotonic": monotonic,
        "half_ideal_speedup_at_long": (all(r["speedup_vs_mha"] >= 0.5 * r["ideal_speedup"]
                                           for r in at_long) if has_mha else None),
    }


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers")
    return values


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--quick", action="store_true",
                        help="tiny model and contexts (CI smoke test; times meaningless)")
    parser.add_argument("--batch", type=int, default=None, help=f"sequences (default {BATCH})")
    parser.add_argument("--contexts", type=_ints, default=None,
                        help="cached tokens, comma-separated (default 2048,8192)")
    parser.add_argument("--num_kv_heads", type=_ints, default=None,
                        help="G values, comma-separated (default: every divisor of 16, MHA first)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed rounds per point (default {REPEATS})")
    parser.add_argument("--implementation", default="auto",
                        help="attention implementation of our decode step (attention.py)")
    parser.add_argument("--no_peer", action="store_true", help="do not run transformers")


def run(args) -> dict[str, Any]:
    quick = args.quick
    config = QUICK_MODEL if quick else MODEL
    pick = lambda given, quick_default, default: (
        given if given is not None else quick_default if quick else default)
    batch = pick(args.batch, QUICK_BATCH, BATCH)
    contexts = pick(args.contexts, QUICK_CONTEXTS, CONTEXTS)
    repeats = pick(args.repeats, QUICK_REPEATS, REPEATS)
    kv_heads = pick(args.num_kv_heads, QUICK_KV_HEADS, kv_head_counts(config.num_heads))
    for g in kv_heads:  # fail before measuring anything
        if config.num_heads % g:
            raise BenchError(f"--num_kv_heads {g} does not divide num_heads={config.num_heads}")
    if batch < 1 or repeats < 1:
        raise BenchError(f"--batch {batch} and --repeats {repeats} must be >= 1")
    peer = not args.no_peer
    info = machine_info()
    bandwidth = perf.measure_bandwidth(1 << (24 if quick else 30))
    peak = perf.measure_peak_flops(256 if quick else 2048)

    print(f"## Decode step vs roofline and transformers{' (--quick: times meaningless)' * quick}")
    print(f"{machine_line(info)} Memory read {bandwidth / 1e9:.1f} GB/s, fp32 matmul "
          f"{peak / 1e9:.0f} GFLOP/s (measured in this run).")
    print(f"Model: d_model {config.d_model}, {config.num_layers} layers, {config.num_heads} query "
          f"heads x head_dim {config.head_dim}, mlp {config.mlp_dim}, vocab {config.vocab_size}, "
          f"{config.dtype}; batch {batch}; median of {repeats} alternated rounds (ours, "
          "transformers) per point.")
    print()
    print("| " + " | ".join(HEADERS) + " |")
    print("|" + "|".join("---:" for _ in HEADERS) + "|", flush=True)

    rows, mha_ms = [], {}
    mha_config = config.replace(num_kv_heads=config.num_heads)
    for g in kv_heads:
        config_g = config.replace(num_kv_heads=g)
        for context in contexts:
            row = measure_point(config_g, batch, context, repeats=repeats, bandwidth=bandwidth,
                                peak_flops=peak, peer=peer, implementation=args.implementation)
            gc.collect()  # free this point's caches (GiBs at long contexts) before the next
            if g == config.num_heads:
                mha_ms[context] = row["ms_per_token"]
            mha_roofline = perf.decode_cost(mha_config, batch, context).roofline_seconds(
                bandwidth, peak)
            row["ideal_speedup"] = mha_roofline * 1e3 / row["roofline_ms"]
            row["speedup_vs_mha"] = (mha_ms[context] / row["ms_per_token"]
                                     if context in mha_ms else None)
            rows.append(row)
            print(_table_row(row), flush=True)
    torch = sys.modules.get("torch")  # imported by the peer, which set its thread count
    torch_threads = torch.get_num_threads() if peer and torch is not None else None
    print()
    peer_line = (f"transformers: PyTorch CPU, {torch_threads} threads" if torch_threads else
                 "transformers: not run")
    print(f"{peer_line}; ours: jax on {info['platform']}.")
    print()
    return dict(bench="decode", quick=quick, machine=info, config=mha_config.to_dict(),
                batch=batch, contexts=list(contexts), repeats=repeats,
                implementation=args.implementation, torch_threads=torch_threads,
                bandwidth_gbps=bandwidth / 1e9, peak_gflops=peak / 1e9, rows=rows,
                targets=targets(rows, config.num_heads))

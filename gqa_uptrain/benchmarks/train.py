"""Training step tokens/s and model FLOP utilisation, against `transformers`.

    python -m gqa_uptrain.bench train [--quick] [--shapes d256,d512_gqa] [--repeats 5]
        [--implementation auto] [--no_peer]

Ours: this project's real training step, train_step.make_train_step (forward, backward over the
micro-batch scan, the global-norm clip at 1.0, optax AdamW from optim.make_optimizer with a
constant learning rate, b1 0.9, b2 0.95, weight decay 0.1 on matrices, as configs/pretrain.py),
jitted with params and optimizer state donated, on a batch of random tokens with the loader's
keys (data.BATCH_KEYS: one document per row, every target scored). The peer:
peers.hf_train_step, `transformers`' LlamaForCausalLM of the same shape with `sdpa` attention and
torch.optim.AdamW (weight decay 0.1, no clipping), on PyTorch CPU with as many threads as cores
(XLA's CPU client uses every core too). Both fp32, same batch and sequence length. The two
steps are ALTERNATED round-robin (one warm-up step each, then `repeats` rounds; median per step,
perf.measure_alternating), one shape at a time.

Shapes (vocab 256, untied embeddings, head_dim d_model / heads):
  d256      d_model 256, 4 layers, 8 heads, 8 KV heads (MHA), mlp 768,  batch 16 x seq 256
            (configs/pretrain.py's CPU model)
  d512_gqa  d_model 512, 4 layers, 8 heads, 2 KV heads (GQA), mlp 1536, batch 8 x seq 256

Model FLOPs per token (perf.train_flops_per_token, PaLM appendix B):
    6 · matmul params + 12 · layers · seq_len · num_heads · head_dim
(matmul params: all but the input embedding; the attention term counts the full seq_len x seq_len
score matrix, as is conventional). MFU = FLOPs per token x tokens/s / the fp32 matmul peak
measured in this run (perf.measure_peak_flops, 2048^3), for ours and the peer alike.

`--quick` (CI smoke test, times meaningless): one shape, d_model 64, 2 layers, 4 heads, mlp 192,
batch 4 x seq 64; 2 repeats; peak from a 256^3 matmul.

Headline JSON keys: bench ("train"), quick, machine {date_utc, cpu, cpu_count, platform,
device, jax, python}, peak_gflops, repeats, implementation, torch_threads (null without the
peer), rows: one per shape {shape, config (ModelConfig.to_dict), batch, seq_len, params,
flops_per_token, step_ms, tokens_per_s, mfu, hf_step_ms, hf_tokens_per_s, hf_mfu (the hf_* null
when the peer did not run; then hf_error), speedup_vs_hf (= our tokens/s / theirs)}, targets
{ahead_of_hf_every_shape (null without the peer), mfu_ge_70pct_every_shape}: booleans; under --quick
each is "not judged (--quick)" (bench.py).
"""

from __future__ import annotations

import argparse
import gc
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from gqa_uptrain import data, optim, peers, perf
from gqa_uptrain import train_step as train_step_lib
from gqa_uptrain.benchmarks.common import (BenchError, attempt, fmt, machine_info,
                                           machine_line)
from gqa_uptrain.model import (ModelConfig, abstract_params, build_model, count_params,
                               get_params)

# name -> (model, batch, seq_len)
SHAPES: dict[str, tuple[ModelConfig, int, int]] = {
    "d256": (ModelConfig(vocab_size=256, d_model=256, num_layers=4, num_heads=8, num_kv_heads=8,
                         mlp_dim=768), 16, 256),
    "d512_gqa": (ModelConfig(vocab_size=256, d_model=512, num_layers=4, num_heads=8,
                             num_kv_heads=2, mlp_dim=1536), 8, 256),
}
QUICK_SHAPES = {
    "quick": (ModelConfig(vocab_size=256, d_model=64, num_layers=2, num_heads=4, num_kv_heads=4,
                          mlp_dim=192), 4, 64),
}
REPEATS, QUICK_REPEATS = 5, 2
# The optimizer of configs/pretrain.py; the learning rate only scales the update.
ADAMW = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0)

HEADERS = ("shape", "params", "tokens/step", "ms/step ours", "ms/step transformers",
           "tokens/s ours", "tokens/s transformers", "MFU ours", "MFU transformers",
           "ours vs transformers")


def random_batch(config: ModelConfig, batch: int, seq_len: int, seed: int = 0
                 ) -> dict[str, jax.Array]:
    """data.BATCH_KEYS arrays, each [1 (grad_accum_steps), batch, seq_len] int32: random tokens,
    one document per row, every target scored."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (1, batch, seq_len + 1), dtype=np.int32)
    ones = np.ones((1, batch, seq_len), np.int32)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (1, batch, seq_len))
    arrays = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "segment_ids": ones,
              "positions": positions, "loss_mask": ones}
    return {k: jnp.asarray(arrays[k]) for k in data.BATCH_KEYS}  # exactly the loader's keys


def train_step_setup(config: ModelConfig, batch: int, seq_len: int, *, seed: int = 0,
                     implementation: str = "auto") -> Callable[[], Any]:
    """This project's jitted training step on a fixed random batch; returns a no-arg callable
    that runs one step (params and optimizer state carried from call to call, donated)."""
    params = get_params(build_model(config, seed=seed))
    schedule = optim.make_schedule("constant", peak_lr=1e-4, warmup_steps=0, total_steps=1,
                                   decay_fraction=0.0, min_lr_ratio=1.0)
    tx = optim.make_optimizer(schedule, params, **ADAMW)
    step = jax.jit(train_step_lib.make_train_step(config, tx, implementation=implementation),
                   donate_argnums=(0, 1))
    state = {"params": params, "opt_state": tx.init(params)}
    tokens = random_batch(config, batch, seq_len, seed)

    def run():
        state["params"], state["opt_state"], metrics = step(state["params"], state["opt_state"],
                                                            tokens)
        return state["params"], metrics  # waited for: the whole update is done

    jax.block_until_ready(run())  # compile
    return run


def measure_shape(name: str, config: ModelConfig, batch: int, seq_len: int, *, repeats: int,
                  peak_flops: float, peer: bool = True, implementation: str = "auto"
                  ) -> dict[str, Any]:
    """Ours and the peer alternated at one shape; the row dict of the module docstring."""
    variants = [("ours", train_step_setup(config, batch, seq_len, implementation=implementation))]
    hf_error = None
    if peer:  # torch is imported only now (peers.py imports it lazily)
        hf_step, hf_error = attempt(lambda: peers.hf_train_step(config, batch, seq_len))
        if hf_step is not None:
            variants.append(("transformers", hf_step))
    seconds = perf.measure_alternating(variants, repeats=repeats)
    del variants
    gc.collect()
    tokens = batch * seq_len
    flops_per_token = perf.train_flops_per_token(config, seq_len)
    ours, theirs = seconds["ours"], seconds.get("transformers")

    def per_s(s):
        return None if s is None else tokens / s

    def mfu(s):
        return None if s is None else flops_per_token * tokens / s / peak_flops

    row = dict(shape=name, config=config.to_dict(), batch=batch, seq_len=seq_len,
               params=count_params(abstract_params(config)), flops_per_token=flops_per_token,
               step_ms=ours * 1e3, tokens_per_s=per_s(ours), mfu=mfu(ours),
               hf_step_ms=None if theirs is None else theirs * 1e3,
               hf_tokens_per_s=per_s(theirs), hf_mfu=mfu(theirs),
               speedup_vs_hf=None if theirs is None else theirs / ours)
    if hf_error is not None:
        row["hf_error"] = hf_error
    return row


def _table_row(r: dict[str, Any]) -> str:
    hf_missing = f"n/a ({r.get('hf_error', 'not run')})"
    cells = (r["shape"], f"{r['params'] / 1e6:.2f}M", r["batch"] * r["seq_len"],
             fmt(r["step_ms"], "{:.0f}"), fmt(r["hf_step_ms"], "{:.0f}") or hf_missing,
             fmt(r["tokens_per_s"], "{:.0f}"), fmt(r["hf_tokens_per_s"], "{:.0f}"),
             fmt(100 * r["mfu"], "{:.0f}%"),
             fmt(None if r["hf_mfu"] is None else 100 * r["hf_mfu"], "{:.0f}%"),
             fmt(r["speedup_vs_hf"], "{:.2f}×"))
    return "| " + " | ".join(str(c) for c in cells) + " |"


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--quick", action="store_true",
                        help="one tiny shape (CI smoke test; times meaningless)")
    parser.add_argument("--shapes", default=None,
                        help=f"comma-separated, of {', '.join(SHAPES)} (default: all)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed rounds per shape (default {REPEATS})")
    parser.add_argument("--implementation", default="auto",
                        help="attention implementation of our step (attention.py)")
    parser.add_argument("--no_peer", action="store_true", help="do not run transformers")


def run(args) -> dict[str, Any]:
    quick = args.quick
    shapes = QUICK_SHAPES if quick else SHAPES
    if args.shapes is not None:
        names = [s for s in args.shapes.split(",") if s]
        unknown = [s for s in names if s not in shapes]
        if unknown or not names:
            raise BenchError(f"--shapes {args.shapes!r}: unknown {unknown} (known: "
                             f"{', '.join(shapes)})")
        shapes = {s: shapes[s] for s in names}
    repeats = (QUICK_REPEATS if quick else REPEATS) if args.repeats is None else args.repeats
    if repeats < 1:
        raise BenchError(f"--repeats {repeats} must be >= 1")
    peer = not args.no_peer
    info = machine_info()
    peak = perf.measure_peak_flops(256 if quick else 2048)

    print(f"## Training step vs transformers{' (--quick: times meaningless)' * quick}")
    print(f"{machine_line(info)} fp32 matmul peak {peak / 1e9:.0f} GFLOP/s (measured in this "
          f"run). fp32; median of {repeats} alternated rounds (ours, transformers) per shape; "
          "MFU = (6 · matmul params + 12 · layers · seq · heads · head_dim) x tokens/s "
          "/ peak.")
    print()
    print("| " + " | ".join(HEADERS) + " |")
    print("|---|" + "|".join("---:" for _ in HEADERS[1:]) + "|", flush=True)
    rows = []
    for name, (config, batch, seq_len) in shapes.items():
        row = measure_shape(name, config, batch, seq_len, repeats=repeats, peak_flops=peak,
                            peer=peer, implementation=args.implementation)
        rows.append(row)
        print(_table_row(row), flush=True)
    torch = sys.modules.get("torch")  # imported by the peer, which set its thread count
    torch_threads = torch.get_num_threads() if peer and torch is not None else None
    print()
    peer_line = (f"transformers: PyTorch CPU, {torch_threads} threads, sdpa attention"
                 if torch_threads else "transformers: not run")
    print(f"{peer_line}; ours: jax on {info['platform']}.")
    print()
    has_peer = all(r["speedup_vs_hf"] is not None for r in rows)
    return dict(bench="train", quick=quick, machine=info, peak_gflops=peak / 1e9,
                repeats=repeats, implementation=args.implementation, torch_threads=torch_threads,
                rows=rows, targets={
                    "ahead_of_hf_every_shape": (all(r["speedup_vs_hf"] >= 1 for r in rows)
                                                if has_peer else None),
                    "mfu_ge_70pct_every_shape": all(r["mfu"] >= 0.7 for r in rows),
                })

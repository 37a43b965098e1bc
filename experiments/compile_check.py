"""Compiles the real train step of a Llama-2-7B-width GQA model on simulated devices, without
allocating it, and prints how long that took and what XLA:CPU's memory analysis says per device.

    python -m experiments.compile_check                       # 32 layers, fsdp=8, scanned, remat=dots
    python -m experiments.compile_check --layers=2 --layers=32  # compile size vs depth
    python -m experiments.compile_check --no_scan --layers=8    # the per-layer loop, for contrast

The step is train_step.build's, the one the trainer runs: stacked layers in one jax.lax.scan,
the remat policy, the chunked loss, float32 master weights and optimizer state, bf16 compute.
Nothing is allocated: params, optimizer state and batch are ShapeDtypeStructs with their
shardings. XLA:CPU's figures are not an accelerator's (no reduce-scatter on CPU, attention as
O(seq^2) XLA ops where a device runs a flash kernel); they are printed as measured.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, action="append", help="depths to compile "
                        "(repeatable; default 32)")
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    parser.add_argument("--fsdp", type=int, default=-1, help="fsdp axis size (-1: all devices)")
    parser.add_argument("--micro_batch", type=int, default=8, help="sequences per step, all "
                        "devices together")
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--num_kv_heads", type=int, default=8)
    parser.add_argument("--remat", default="dots", choices=("none", "full", "dots"))
    parser.add_argument("--compute_dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--loss_chunk_size", type=int, default=512)
    parser.add_argument("--no_scan", action="store_true", help="the per-layer Python loop")
    args = parser.parse_args(argv)
    # Before jax is imported: the simulated devices.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import ml_collections

    from gqa_uptrain import optim, sharding, train_step
    from gqa_uptrain.model import ModelConfig

    if len(jax.devices()) != args.devices:
        print(f"error: asked for {args.devices} simulated devices, jax has {len(jax.devices())} "
              "(was jax imported before XLA_FLAGS was set?)", file=sys.stderr)
        return 2
    optimizer = ml_collections.ConfigDict(dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                                               clip_norm=1.0))
    schedule = optim.make_schedule("cosine", peak_lr=3e-5, warmup_steps=10, total_steps=1000,
                                   decay_fraction=0.0, min_lr_ratio=0.1)
    mesh = sharding.make_mesh(-1 if args.fsdp != -1 else 1, args.fsdp, 1)
    print(f"mesh {dict(mesh.shape)}; micro-batch {args.micro_batch} x {args.seq_len} tokens; "
          f"remat={args.remat}; {args.compute_dtype} compute; "
          f"{'per-layer loop' if args.no_scan else 'scanned layers'}")
    for layers in args.layers or [32]:
        # Llama-2-7B's shapes (config.json of meta-llama/Llama-2-7b-hf), K/V pooled to G heads.
        config = ModelConfig(vocab_size=32000, d_model=4096, num_layers=layers, num_heads=32,
                             num_kv_heads=args.num_kv_heads, mlp_dim=11008, norm_eps=1e-5,
                             param_dtype="float32", dtype=args.compute_dtype)
        setup = train_step.build(config, mesh, schedule, optimizer, implementation="auto",
                                 remat=args.remat, scan_layers=not args.no_scan,
                                 loss_chunk_size=args.loss_chunk_size)
        start = time.perf_counter()
        with jax.set_mesh(mesh):  # as the trainer traces it: activation constraints on this mesh
            lowered = setup.step.lower(*setup.abstract_args(1, args.micro_batch, args.seq_len))
        lowered_at = time.perf_counter()
        compiled = lowered.compile()
        done = time.perf_counter()
        mem = compiled.memory_analysis()
        gib = 2 ** 30
        print(f"{layers:3d} layers: lowered in {lowered_at - start:5.1f} s, compiled in "
              f"{done - lowered_at:5.1f} s (total {done - start:5.1f} s); optimized HLO "
              f"{len(compiled.as_text()):,} chars; per device (XLA:CPU): arguments "
              f"{mem.argument_size_in_bytes / gib:.2f} GiB, outputs "
              f"{mem.output_size_in_bytes / gib:.2f} GiB (aliased "
              f"{mem.alias_size_in_bytes / gib:.2f}), temporaries "
              f"{mem.temp_size_in_bytes / gib:.2f} GiB")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

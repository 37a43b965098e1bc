"""The HF -> HF converter against a plain copy of the same files: time and peak memory.

    python -m gqa_uptrain.bench convert [--quick] [--cache_dir DIR] [--repeats 3]

Input: a synthetic Llama-shaped Hugging Face checkpoint, generated once into the cache folder
(default $XDG_CACHE_HOME/gqa_uptrain/bench_convert, else ~/.cache/gqa_uptrain/bench_convert;
never in the repository) and reused by later runs: LlamaForCausalLM, d_model 2048, 22 layers,
32 heads of 64 (MHA), mlp 5632, vocab 32000 (TinyLlama-1.1B's shape, but MHA), bf16, untied: 1.26B
parameters, 2.5 GB, in 3 shards of at most 1 GB with model.safetensors.index.json, like
`save_pretrained` writes them. Weights are random N(0, 0.02) values (only their size matters).
Needs about 2.2x the checkpoint's size free on the cache folder's disk (the checkpoint plus one
output at a time); the benchmark refuses to start with less and says how much it needs.

Timed, each in a subprocess, ALTERNATED over `repeats` rounds after one untimed round (which also
brings the input into the page cache, so every timed run reads it from memory, both sides alike):
  copy     `cp -r INPUT OUTPUT`, the plain copy of the same files
  convert  `python -m gqa_uptrain.convert --input INPUT --output OUTPUT --num_kv_heads 8`
           (HF -> HF, mean pooling: streaming, one tensor in memory at a time)
Each output goes on the same disk beside the input and is deleted after its run; then `sync`, so
that no run pays for the previous one's write-back. Neither side fsyncs: both times are what a
user waits for. Peak resident memory (ru_maxrss of that child alone, from os.wait4) is reported
for both; the converter's includes the Python interpreter and its imports.
Figures: median seconds per side, time ratio = convert / copy (target <= 2), peak RSS of the
converter / checkpoint bytes (target <= 25%).

`--quick` (CI smoke test, times meaningless): the same layout at d_model 256, 4 layers, 8 heads,
mlp 688, vocab 32000: 39 MB in 3 shards of at most 16 MB, converted to 2 KV heads, 1 repeat.

Headline JSON keys: bench ("convert"), quick, machine {date_utc, cpu, cpu_count, platform, device,
jax, python}, checkpoint {path, bytes, files, generated (true: made by this run),
generate_s, hf_config: {hidden_size, num_hidden_layers, num_attention_heads,
num_key_value_heads, intermediate_size, vocab_size, dtype}}, num_kv_heads_before,
num_kv_heads_after, method, repeats, copy_s, convert_s (medians), copy_runs_s, convert_runs_s
(every timed run), time_ratio, copy_peak_rss_mib, convert_peak_rss_mib (max over runs),
convert_output_bytes, rss_fraction (convert peak RSS / checkpoint bytes), targets
{time_le_2x_copy, rss_le_25pct_of_checkpoint}: booleans; under --quick each is
"not judged (--quick)" (bench.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from gqa_uptrain import hf, outputs, safetensors_io
from gqa_uptrain.benchmarks.common import (BenchError, fmt, machine_info, machine_line,
                                           markdown_table)
from gqa_uptrain.hf_config import hf_config_from_model_config
from gqa_uptrain.model import ModelConfig

# TinyLlama-1.1B's shape with as many KV heads as query heads (what GQA is made from).
MODEL = ModelConfig(vocab_size=32000, d_model=2048, num_layers=22, num_heads=32, num_kv_heads=32,
                    mlp_dim=5632, param_dtype="bfloat16", dtype="bfloat16")
MAX_SHARD_BYTES = 10 ** 9
QUICK_MODEL = ModelConfig(vocab_size=32000, d_model=256, num_layers=4, num_heads=8,
                          num_kv_heads=8, mlp_dim=688, param_dtype="bfloat16", dtype="bfloat16")
QUICK_MAX_SHARD_BYTES = 16 * 10 ** 6
REPEATS, QUICK_REPEATS = 3, 1
METHOD = "mean"
MIB = 2 ** 20
_BF16_BYTES = 2
# Free space beyond the checkpoint and one output (what else writes to that disk meanwhile).
_DISK_MARGIN = 0.2


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gqa_uptrain", "bench_convert")


def checkpoint_name(config: ModelConfig) -> str:
    c = config
    return (f"llama_d{c.d_model}_l{c.num_layers}_h{c.num_heads}_kv{c.num_kv_heads}_f{c.mlp_dim}"
            f"_v{c.vocab_size}_{c.param_dtype}")


def _plan(config: ModelConfig, max_shard_bytes: int):
    """(hf config dict, [(file, [(name, shape)])]): tensors in natural name order, cut into
    shards of at most max_shard_bytes (a larger tensor gets one of its own), like export_hf."""
    hf_config = hf_config_from_model_config(config)
    shapes = hf.hf_layout(hf_config).expected_shapes()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name in sorted(shapes, key=hf.natural_key):
        nbytes = math.prod(shapes[name]) * _BF16_BYTES
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shapes[name]))
        size += nbytes
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    return hf_config, list(zip(files, shards))


def checkpoint_bytes(config: ModelConfig, max_shard_bytes: int) -> int:
    """Bytes of the planned tensors (the files add a few KB of headers and JSON)."""
    _, shards = _plan(config, max_shard_bytes)
    return sum(math.prod(shape) for _, tensors in shards for _, shape in tensors) * _BF16_BYTES


def generate_checkpoint(folder: str, config: ModelConfig, max_shard_bytes: int,
                        seed: int = 0) -> None:
    """Writes a random bf16 Llama folder (config.json, shards, index) atomically to `folder`.

    Values: a pool of 16M N(0, 0.02) draws, tiled into each tensor from a per-tensor offset
    (drawing 1.26B normals would take longer than the benchmark; the bytes' values do not matter).
    """
    import ml_dtypes  # noqa: PLC0415

    hf_config, shards = _plan(config, max_shard_bytes)
    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(1 << 24, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    weight_map, total = {}, 0
    with outputs.atomic_folder(folder) as tmp:
        for file, tensors in shards:
            entries = [(name, "BF16", shape) for name, shape in tensors]
            with safetensors_io.SafetensorsWriter(os.path.join(tmp, file), entries,
                                                  {"format": "pt"}) as writer:
                for name, shape in tensors:
                    size = math.prod(shape)
                    start = int(rng.integers(len(pool)))
                    writer.write(name, np.resize(np.roll(pool, -start), size).reshape(shape))
                    weight_map[name] = file
                    total += size * _BF16_BYTES
        with open(os.path.join(tmp, hf.WEIGHTS_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, hf.CONFIG_FILE), "w") as f:
            json.dump(hf_config, f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"_from_model_config": True}, f)


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(folder) for f in files)


# Runs argv[2:] and writes "seconds peak_rss_kib exit_code" to argv[1]. A small process of its own
# starts the command because a child's ru_maxrss includes what it had before exec: a child forked
# (or vforked) straight from this benchmark, which holds jax, would report this process's size.
_TIMER = """
import resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL).returncode
seconds = time.perf_counter() - start
with open(sys.argv[1], "w") as f:
    f.write(f"{seconds} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss} {code}")
"""


def run_child(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Runs cmd to completion; (wall seconds, peak RSS bytes of cmd's process).

    The peak includes the small timer process's own few MB at the moment it started cmd (see
    _TIMER), a floor of ~10 MB."""
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as result:
        proc = subprocess.run([sys.executable, "-S", "-c", _TIMER, result.name, *cmd], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        fields = result.read().split()
    err = proc.stderr.decode(errors="replace").strip()
    code = int(fields[2]) if len(fields) == 3 else proc.returncode
    if code != 0 or len(fields) != 3:
        last = err.splitlines()[-1] if err else ""
        raise BenchError(f"{' '.join(cmd[:4])} ... exited {code}: {last}")
    return float(fields[0]), int(fields[1]) * 1024  # ru_maxrss is in KiB on Linux


def _converter_env() -> dict[str, str]:
    # The subprocess must import this very package, installed or not.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--quick", action="store_true",
                        help="a 39 MB checkpoint (CI smoke test; times meaningless)")
    parser.add_argument("--cache_dir", default=None,
                        help="where the synthetic checkpoint is kept "
                             f"(default {default_cache_dir()})")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed rounds (default {REPEATS})")


def run(args) -> dict[str, Any]:
    quick = args.quick
    config = QUICK_MODEL if quick else MODEL
    max_shard = QUICK_MAX_SHARD_BYTES if quick else MAX_SHARD_BYTES
    repeats = (QUICK_REPEATS if quick else REPEATS) if args.repeats is None else args.repeats
    if repeats < 1:
        raise BenchError(f"--repeats {repeats} must be >= 1")
    num_kv_heads = config.num_heads // 4
    cache_dir = os.path.abspath(args.cache_dir or default_cache_dir())
    source = os.path.join(cache_dir, checkpoint_name(config))
    os.makedirs(cache_dir, exist_ok=True)
    size = checkpoint_bytes(config, max_shard)
    exists = os.path.isdir(source)
    need = int(size * (1 + _DISK_MARGIN) + (0 if exists else size))
    free = shutil.disk_usage(cache_dir).free
    if free < need:
        raise BenchError(f"{cache_dir} has {free / 1e9:.1f} GB free; the benchmark needs "
                         f"{need / 1e9:.1f} GB (checkpoint {size / 1e9:.2f} GB"
                         f"{'' if exists else ' to generate'} + one output + margin); "
                         "pass --cache_dir on a larger disk")
    info = machine_info()
    generate_s = None
    if not exists:
        start = time.perf_counter()
        generate_checkpoint(source, config, max_shard)
        generate_s = time.perf_counter() - start
    checkpoint_total = _folder_bytes(source)
    files = sorted(os.listdir(source))

    cmds = {
        "copy": lambda out: ["cp", "-r", source, out],
        "convert": lambda out: [sys.executable, "-m", "gqa_uptrain.convert", "--input", source,
                                "--output", out, "--num_kv_heads", str(num_kv_heads),
                                "--method", METHOD],
    }
    env = _converter_env()
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in cmds}
    output_bytes = None
    work = tempfile.mkdtemp(prefix=".bench-out-", dir=cache_dir)  # same disk as the input
    try:
        for round_index in range(repeats + 1):  # round 0: warm-up, untimed
            for name, cmd in cmds.items():
                out = os.path.join(work, name)
                seconds, rss = run_child(cmd(out), env=env)
                if round_index > 0:
                    runs[name].append((seconds, rss))
                if name == "convert":
                    output_bytes = _folder_bytes(out)
                shutil.rmtree(out)
                os.sync()  # no write-back of this run's output left for the next run to pay
    finally:
        shutil.rmtree(work, ignore_errors=True)

    copy_s = float(np.median([s for s, _ in runs["copy"]]))
    convert_s = float(np.median([s for s, _ in runs["convert"]]))
    copy_rss = max(r for _, r in runs["copy"])
    convert_rss = max(r for _, r in runs["convert"])
    time_ratio, rss_fraction = convert_s / copy_s, convert_rss / checkpoint_total

    hf_config = hf_config_from_model_config(config)
    print(f"## Converter vs a plain copy{' (--quick: times meaningless)' * quick}")
    print(f"{machine_line(info)} Input: synthetic LlamaForCausalLM, d_model {config.d_model}, "
          f"{config.num_layers} layers, {config.num_heads} heads (MHA), mlp {config.mlp_dim}, "
          f"vocab {config.vocab_size}, bf16: {checkpoint_total / 1e9:.2f} GB in "
          f"{sum(f.endswith('.safetensors') for f in files)} shards ({source}"
          f"{f', generated in {generate_s:.0f} s' if generate_s is not None else ', cached'}). "
          f"Convert: HF -> HF, {config.num_heads} -> {num_kv_heads} KV heads, --method {METHOD}. "
          f"Median of {repeats} alternated runs after one untimed round; input in the page "
          "cache; outputs on the same disk, not fsynced.")
    print()
    rows = []
    for label, key, seconds, rss in (("copy (cp -r)", "copy", copy_s, copy_rss),
                                     ("convert", "convert", convert_s, convert_rss)):
        rows.append((label, fmt(seconds, "{:.2f}"), ", ".join(f"{t:.2f}" for t, _ in runs[key]),
                     fmt(checkpoint_total / seconds / 1e9, "{:.2f}"), fmt(rss / MIB, "{:.0f}"),
                     fmt(100 * rss / checkpoint_total, "{:.1f}%"),
                     fmt(seconds / copy_s, "{:.2f}×")))
    print(markdown_table(("run", "median s", "runs s", "input GB/s", "peak RSS MiB",
                          "peak RSS / checkpoint", "time vs copy"), rows))
    print()
    return dict(
        bench="convert", quick=quick, machine=info,
        checkpoint=dict(path=source, bytes=checkpoint_total, files=files,
                        generated=generate_s is not None, generate_s=generate_s,
                        hf_config={k: hf_config[k] for k in (
                            "hidden_size", "num_hidden_layers", "num_attention_heads",
                            "num_key_value_heads", "intermediate_size", "vocab_size", "dtype")}),
        num_kv_heads_before=config.num_heads, num_kv_heads_after=num_kv_heads, method=METHOD,
        repeats=repeats, copy_s=copy_s, convert_s=convert_s,
        copy_runs_s=[s for s, _ in runs["copy"]], convert_runs_s=[s for s, _ in runs["convert"]],
        time_ratio=time_ratio, copy_peak_rss_mib=copy_rss / MIB,
        convert_peak_rss_mib=convert_rss / MIB, convert_output_bytes=output_bytes,
        rss_fraction=rss_fraction,
        targets={"time_le_2x_copy": time_ratio <= 2.0,
                 "rss_le_25pct_of_checkpoint": rss_fraction <= 0.25})

r"""Does a training run's memory grow with its corpus? Anonymous resident memory (RssAnon: the
token store's memory-mapped pages are file-backed and do not count) of the same training run on
local-file corpora of ~10M and ~100M tokens.

    python experiments/data_memory.py                   # ~1-2 minutes on 2 CPU cores, ~0.5 GB of disk
    python experiments/data_memory.py --tokens=1e6,1e7 --steps=10

For each size: a jsonl corpus of printable ASCII documents of 4,095 characters (4,096 byte-level
tokens with the BOS) is written, plus one fixed validation file (the same for every size, so only
the training corpus grows); `python -m gqa_uptrain.data prepare` tokenizes it into the token
store; then `python -m gqa_uptrain.train --config=configs/pretrain.py:smoke` on it runs --steps
steps (no checkpoints). Each command's RssAnon is sampled from /proc/PID/status every 10 ms and
its peak printed; the last line is the ratio of the training peaks, largest corpus over smallest.
Linux only (/proc).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# The corpus and the sampling are the data benchmark's (`python -m gqa_uptrain.bench data` runs the
# same measurement as one of its targets).
from gqa_uptrain.benchmarks.data import measure_memory  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="1e7,1e8",
                        help="comma-separated training corpus sizes in tokens (default %(default)s)")
    parser.add_argument("--steps", type=int, default=20,
                        help="training steps of each run (default %(default)s)")
    parser.add_argument("--output_dir", default="/tmp/gqa_data_memory",
                        help="corpora, stores and workdirs (replaced; default %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep --output_dir afterwards")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if not os.path.exists("/proc/self/status"):
        raise SystemExit("needs Linux /proc (RssAnon)")
    sizes = [int(float(s)) for s in args.tokens.split(",")]
    out = os.path.abspath(args.output_dir)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    try:
        rows = measure_memory(out, tuple(sizes), args.steps)
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    print(f"\ntraining: configs/pretrain.py:smoke, {args.steps} steps; RssAnon peaks sampled every "
          "10 ms")
    print("| train tokens | store (.bin) MiB | prepare s | prepare RssAnon MiB | train s | "
          "train RssAnon MiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['train_tokens']:,} | {r['store_mb']:,.1f} | {r['prepare_s']:.1f} | "
              f"{r['prepare_rss_anon_mib']:,.1f} | {r['train_s']:.1f} | "
              f"{r['train_rss_anon_mib']:,.1f} |")
    first, last = rows[0], rows[-1]
    print(f"train RssAnon peak, {last['train_tokens']:,} over {first['train_tokens']:,} tokens: "
          f"{last['train_rss_anon_mib'] / first['train_rss_anon_mib']:.3f} (prepare: "
          f"{last['prepare_rss_anon_mib'] / first['prepare_rss_anon_mib']:.3f})")


if __name__ == "__main__":
    main()

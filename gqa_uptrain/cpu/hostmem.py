"""glibc malloc settings for long CPU computations, applied by re-executing the process once.

XLA's CPU runtime allocates its large temporary buffers afresh at every execution. glibc serves
blocks above its mmap threshold (32 MiB at most) with a fresh mmap and unmaps them on free, so
each execution touches new pages: a training step of the d_model 256 benchmark model (batch
16 x 256) took ~218,000 minor page faults (~850 MB of first touches), counted with getrusage.
With one arena, no mmap for large blocks and freed memory kept (the ENV below) the faults fell to
~0 and the step got 5-7% faster (measured in separate processes on the 2-core EPYC: d_model 256
2,822 -> 2,645 ms, d_model 512 3,420 -> 3,233 ms). (A lone jitted op with a 32 MiB output was less
regular: under the settings its faults per call varied from 0 to all 8,192 between identical
runs.) Set with mallopt(3) from inside the running process the same values only partly took
effect (100k+ faults a step remained), so they go in the environment before the process starts: the
training command lines (`python -m gqa_uptrain.train`, `python -m gqa_uptrain.bench train`) call
reexec_with_tuned_malloc() first thing, which re-runs the same command line once with ENV added.

Not applied elsewhere, for measured reasons. Decode: after a large cache was freed, a decode step
with new, smaller buffers ran much slower under these settings (the decode benchmark, num_kv_heads
8 at a 2K cache right after MHA at 8K: 105.7 ms against 70.9 ms with glibc's defaults), so the
decode benchmark and the experiment suite (which times decode after training) keep the defaults.
The converter benchmark measures peak memory, which these settings would change: memory freed by
the process is kept for reuse rather than returned to the system.
"""

from __future__ import annotations

import os
import platform
import sys

ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "2147483647"}
OPT_OUT = "GQA_UPTRAIN_KEEP_MALLOC"  # set to 1 to run with glibc's defaults


def in_force(environ=os.environ) -> dict[str, str]:
    """Those of ENV's variables that are set, with their values ({} = glibc's defaults)."""
    return {k: environ[k] for k in ENV if k in environ}


def wanted(environ=os.environ) -> bool:
    """True when the process should re-run with ENV: glibc Linux, not opted out, and none of
    ENV's variables already set (whoever set one chose their own settings)."""
    return (sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
            and not environ.get(OPT_OUT) and not any(k in environ for k in ENV))


def reexec_with_tuned_malloc() -> None:
    """Replaces this process by the same command line (sys.orig_argv) with ENV set, or returns
    at once when not wanted(). Call it before any work: nothing done so far survives."""
    if not wanted():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **ENV})

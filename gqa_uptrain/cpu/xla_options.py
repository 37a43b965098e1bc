"""Per-computation XLA compiler options for the CPU backend, each chosen from a measurement.

jax 0.10's CPU backend sends dots through YNNPACK fusions by default. For the decode step's
matmuls (a few rows, the batch, against a whole weight matrix) XLA's other dot path is faster:
measured side by side on the 2-core EPYC of these machines, [8, 1024] x [1024, 2816] 1.8 vs
1.2 ms, [8, 2816] x [2816, 1024] 2.6 vs 1.5 ms, [8, 1024] x [1024, 4096] 5.4 vs 2.2 ms; the whole
decode step (d_model 1024, 4 layers, batch 8, 16-token cache) 44 vs 27 ms, at an 8K cache 0-6%
faster depending on num_kv_heads. The training step was mixed (two side-by-side runs: d_model 256
7-10% faster, d_model 512 0-2% slower), so training keeps the default. Small heads keep the default too: the project's
experiment model (d_model 128, 8 heads of 16) decoded 2-13% slower without the fusions at every
num_kv_heads (batch 8, 2K and 8K caches; its weights are tiny, its step is attention), so the
option applies from head_dim 17 up (measured at 16 and 64 only). Options go to one jax.jit at a
time (`compiler_options`), not to the process's XLA_FLAGS, so nothing else is affected.
"""

from __future__ import annotations

import functools
from typing import Any

import jax

YNN_FUSIONS_OFF = {"xla_cpu_experimental_ynn_fusion_type": ""}
YNN_KEPT_MAX_HEAD_DIM = 16  # up to this head_dim the decode step keeps XLA's YNNPACK fusions


def decode_options(head_dim: int) -> dict[str, Any] | None:
    """compiler_options for the decode step's jax.jit: YNNPACK fusions off on CPU for head_dim >
    YNN_KEPT_MAX_HEAD_DIM, else None (XLA's defaults).

    None too when this XLA does not know the option (it is experimental): a tiny computation is
    compiled with it once to find out, so a renamed flag costs speed, never a failure.
    """
    if head_dim <= YNN_KEPT_MAX_HEAD_DIM or jax.default_backend() != "cpu":
        return None
    return dict(YNN_FUSIONS_OFF) if _ynn_option_known() else None


@functools.cache
def _ynn_option_known() -> bool:
    return accepted(YNN_FUSIONS_OFF)


def accepted(options: dict[str, Any]) -> bool:
    """Whether this jax/XLA compiles a tiny computation with these compiler_options."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(1.0).compile()
    except Exception:  # noqa: BLE001 (any rejection means: not available here)
        return False
    return True

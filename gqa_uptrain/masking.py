"""The one value that masked attention logits take, for every implementation and kernel.

A large finite negative number rather than -inf: a fully masked row (a padding query) then gets a
uniform, finite distribution instead of NaN (exp(-inf - -inf)); such rows are never read. 0.7 of
the dtype's largest finite value leaves room for adding a logit (|logit| << 0.3 x max) without
overflowing to -inf. Per dtype, because the precision policy computes in bf16 or fp16 too (fp16's
max is 65504: a fixed -1e30 would be -inf there).
"""

from __future__ import annotations

import jax.numpy as jnp


def mask_value(dtype=jnp.float32) -> float:
    """-0.7 x the largest finite value of `dtype` (the logits' dtype; float32 by default)."""
    return -0.7 * float(jnp.finfo(dtype).max)

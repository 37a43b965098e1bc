"""Optimizer and learning-rate schedules: optax AdamW with warmup and cosine / constant /
warmup-stable-decay, and gradient clipping by global norm.

Gradient accumulation is not an optax wrapper here: the train step scans over micro-batches and
applies one update per step (train.py), so a step is always one optimizer update and a checkpoint
never holds half-accumulated gradients.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

SCHEDULES = ("cosine", "constant", "wsd")
# The learning-rate schedules' version, saved with every run (run_config.config_dict) so that a
# workdir trained under another version refuses to resume instead of silently changing its rates.
#   1  (unrecorded) warmup linear from 0 at step 0: step 0 was a no-op update.
#   2  warmup linear from peak/warmup_steps at step 0 to the peak at step warmup_steps - 1.
SCHEDULE_VERSION = 2


def make_schedule(name: str, *, peak_lr: float, warmup_steps: int, total_steps: int,
                  decay_fraction: float, min_lr_ratio: float) -> optax.Schedule:
    """Learning rate as a function of the optimizer step (0-based).

    All schedules warm up linearly over warmup_steps W: lr(s) = peak_lr * (s + 1) / W for s < W,
    so step 0 already moves the weights (at peak_lr / W; version 1 started at 0, a wasted step
    that was a quarter of a 4-step warmup) and step W - 1 is the first at the peak. Then, from
    step W:
      cosine    cosine decay to min_lr_ratio * peak_lr at total_steps;
      constant  stay at peak_lr;
      wsd       stay at peak_lr, then decay linearly to min_lr_ratio * peak_lr over the last
                decay_fraction of total_steps (warmup-stable-decay; the decay starts no earlier
                than the end of warmup).
    """
    if name not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={name!r} is not one of {SCHEDULES}")
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be >= 1")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} must be in [0, total_steps={total_steps}]")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio={min_lr_ratio} must be in [0, 1]")
    end_lr = peak_lr * min_lr_ratio
    # peak/W at count 0 to peak at count W-1: lr(s) = peak (s + 1) / W (W = 1: the peak at once).
    warmup = optax.linear_schedule(peak_lr / max(warmup_steps, 1), peak_lr,
                                   max(warmup_steps - 1, 1))
    rest = total_steps - warmup_steps
    if name == "cosine":
        after = optax.cosine_decay_schedule(peak_lr, max(rest, 1), alpha=min_lr_ratio)
    elif name == "constant":
        after = optax.constant_schedule(peak_lr)
    else:
        if not 0.0 <= decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction={decay_fraction} must be in [0, 1]")
        decay_steps = min(int(round(decay_fraction * total_steps)), rest)
        stable = optax.constant_schedule(peak_lr)
        decay = optax.linear_schedule(peak_lr, end_lr, max(decay_steps, 1))
        after = optax.join_schedules([stable, decay], [rest - decay_steps])
    if warmup_steps == 0:
        return after
    return optax.join_schedules([warmup, after], [warmup_steps])


def decay_mask(params: dict[str, Any]) -> dict[str, bool]:
    """Weight decay on matrices only; norm scales and biases (1-D, or [heads, head_dim] biases)
    are not decayed, as is usual for AdamW on transformers."""
    return {name: ("_bias" not in name and len(x.shape) >= 2) for name, x in params.items()}


def make_optimizer(schedule: optax.Schedule, params: dict[str, Any], *, b1: float, b2: float,
                   eps: float, weight_decay: float, clip_norm: float) -> optax.GradientTransformation:
    """AdamW on a flat params dict, after clipping the gradient's global norm to clip_norm
    (clip_norm <= 0: no clipping)."""
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                        mask=decay_mask(params))
    if clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(clip_norm), adamw)
    return adamw


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: dict[str, Any],
                        param_shardings: dict[str, Any], replicated: Any) -> Any:
    """Shardings for tx's state: moments like their params, counters replicated."""
    abstract_state = jax.eval_shape(tx.init, abstract_params)
    return optax.tree_map_params(tx, lambda _, s: s, abstract_state, param_shardings,
                                 transform_non_params=lambda _: replicated)

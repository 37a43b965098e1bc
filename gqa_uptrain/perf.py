"""Speed measurement shared by the benchmarks and the experiment suite.

- The machine's limits, measured in the same run as what they judge: memory bandwidth as a read-only
  reduction over a buffer much larger than the last-level cache, peak FLOP/s as a large matmul.
- A bytes/FLOPs model of one decode step (all layers, KV cache of `context` tokens), and its
  roofline time max(bytes / bandwidth, flops / peak).
- `measure_decode`: seconds per decode step (one new token for each of `batch` sequences) of
  this project's decode step, variants alternated, median of repeats. It is
  `measure_alternating`, the timer every benchmark uses (training steps, converter runs too);
  `measure_alternating_samples` keeps every repeat, from which the experiment suite reports each
  median with its confidence interval (`median_ci`) and each speed-up as the median of the
  per-round ratios (`paired_ratio`: a round times every variant back to back, so the machine's
  slow phases cancel in the ratio).
"""

from __future__ import annotations

import dataclasses
import math
import platform
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gqa_uptrain import model as model_lib


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure_bandwidth(num_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of a read-only float32 sum over `num_bytes` (default 1 GiB, >> any LLC here)."""
    buf = jnp.ones((num_bytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    jax.block_until_ready(total(buf))
    return num_bytes / _median_seconds(lambda: total(buf), repeats)


def measure_peak_flops(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
    """FLOP/s of an n×n×n matmul (2·n³ FLOPs), the practical peak of this device and dtype."""
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    mm = jax.jit(jnp.matmul)
    jax.block_until_ready(mm(a, b))
    return 2 * n ** 3 / _median_seconds(lambda: mm(a, b), repeats)


@dataclasses.dataclass(frozen=True)
class DecodeCost:
    """Bytes moved and FLOPs of one decode step (one new token for each of `batch` sequences)."""

    weight_bytes: int  # every weight read once (the embedding: only the batch's rows)
    kv_read_bytes: int  # the whole valid cache, K and V, all layers
    kv_write_bytes: int  # the new token's K and V, all layers
    flops: int  # matmuls: 2 · batch · (non-embedding params) + attention 4 · layers · batch · heads · context · head_dim

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_read_bytes + self.kv_write_bytes

    def roofline_seconds(self, bandwidth: float, peak_flops: float) -> float:
        return max(self.total_bytes / bandwidth, self.flops / peak_flops)


def decode_cost(config: model_lib.ModelConfig, batch: int, context: int,
                cache_dtype=None) -> DecodeCost:
    """The bytes/FLOPs model of one decode step at `context` cached tokens (see DecodeCost)."""
    c = config
    param_bytes = jnp.dtype(c.param_dtype).itemsize
    params = model_lib.abstract_params(c)
    total = model_lib.count_params(params)
    embed = int(np.prod(params["embed"].shape))
    # A step gathers `batch` rows of the embedding; a tied embedding is also read whole as the head.
    read_embed = batch * c.d_model + (embed if c.tie_embeddings else 0)
    weight_bytes = (total - embed + read_embed) * param_bytes
    per_token = model_lib.kv_cache_bytes_per_token(c, cache_dtype)  # 2 · layers · kv_heads · head_dim · bytes
    # Every non-embedding weight is one multiply-add per sequence; a tied embedding is the head too.
    matmul_params = total - embed + (embed if c.tie_embeddings else 0)
    flops = 2 * batch * matmul_params + 4 * c.num_layers * batch * c.num_heads * context * c.head_dim
    return DecodeCost(weight_bytes=int(weight_bytes), kv_read_bytes=int(batch * context * per_token),
                      kv_write_bytes=int(batch * per_token), flops=int(flops))


def matmul_params(config: model_lib.ModelConfig) -> int:
    """Parameters that are matmul weights for every token: all but the input embedding (a gather),
    which a tied embedding is anyway as the output head. Norm scales are counted (negligible)."""
    params = model_lib.abstract_params(config)
    embed = int(np.prod(params["embed"].shape))
    return model_lib.count_params(params) - (0 if config.tie_embeddings else embed)


def train_flops_per_token(config: model_lib.ModelConfig, seq_len: int) -> int:
    """Model FLOPs of one trained token, forward + backward (PaLM, appendix B):

        6 · matmul_params + 12 · layers · seq_len · num_heads · head_dim

    the second term being q·k and p·v (2 matmuls x 2 FLOPs x 3 for forward + backward) over the
    whole sequence, as is conventional (a causal kernel may skip half of it). What MFU divides by.
    """
    c = config
    return 6 * matmul_params(c) + 12 * c.num_layers * seq_len * c.num_heads * c.head_dim


def decode_step_setup(config: model_lib.ModelConfig, batch: int, context: int, *, seed: int = 0,
                      cache_dtype=None, implementation: str = "auto"):
    """A model with random weights and a cache holding `context` tokens; returns a no-arg step.

    The cache is filled with random values directly (no prefill: only its size matters for speed),
    and every call decodes one token at position `context`, reusing the same cache slot, so repeated
    calls measure the same step.
    """
    model = model_lib.build_model(config, seed=seed)
    step = model_lib.decode_fn(model, implementation)
    cache = model.init_cache(batch, context + 1, cache_dtype)
    keys = jax.random.split(jax.random.PRNGKey(seed), 2 * config.num_layers)
    fill = lambda key, like: jax.random.normal(key, like.shape, like.dtype)
    cache = cache._replace(
        k=tuple(fill(keys[i], a) for i, a in enumerate(cache.k)),
        v=tuple(fill(keys[config.num_layers + i], a) for i, a in enumerate(cache.v)),
        lengths=jnp.full((batch,), context, jnp.int32))
    tokens = jnp.zeros((batch, 1), jnp.int32)
    state = {"cache": cache}

    def run():
        logits, new_cache = step(tokens, state["cache"])
        # Rewind so the next call writes the same slot (the cache was donated and updated in place).
        state["cache"] = new_cache._replace(lengths=new_cache.lengths - 1)
        return logits

    jax.block_until_ready(run())  # compile
    return run


def measure_alternating_samples(variants: Sequence[tuple[str, Callable[[], object]]],
                                repeats: int = 5, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of every call of each named no-arg callable, variants alternated round-robin:
    {name: [seconds of round 0, round 1, ...]} (`repeats` rounds after `warmup` untimed ones).

    Alternating spreads the machine's slow phases over all variants, so their ratios are fair.
    A callable's result is waited for with jax.block_until_ready (a no-op for anything that is not
    a jax array: a torch step on CPU is done when it returns).
    """
    for _ in range(warmup):
        for _, fn in variants:
            jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    for _ in range(repeats):
        for name, fn in variants:
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return times


def measure_alternating(variants: Sequence[tuple[str, Callable[[], object]]], repeats: int = 5,
                        warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each named no-arg callable, variants alternated round-robin
    (measure_alternating_samples)."""
    samples = measure_alternating_samples(variants, repeats, warmup)
    return {name: float(np.median(t)) for name, t in samples.items()}


def median_ci(samples: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median: order statistics x_(k), x_(n+1-k)
    with the largest k for which P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2, so it assumes
    only independent repeats. Needs n >= 6 at 95% (fewer: ValueError naming n)."""
    x = np.sort(np.asarray(samples, np.float64))
    n = len(x)
    tail = (1.0 - confidence) / 2
    k, below = 0, 0.0  # below: P(B <= k), accumulated as k grows
    while True:
        below += math.comb(n, k) / 2.0 ** n
        if below > tail:
            break
        k += 1
    if k < 1:
        raise ValueError(f"{n} repeats are too few for a {confidence:.0%} interval of the median "
                         "(need >= 6 at 95%)")
    return float(x[k - 1]), float(x[n - k])


def paired_ratio(reference: Sequence[float], other: Sequence[float],
                 confidence: float = 0.95) -> dict[str, float]:
    """Speed-up of `other` over `reference` from rounds timed back to back (the same index is the
    same round): {'median', 'lo', 'hi'} of the per-round ratios reference / other (median_ci)."""
    if len(reference) != len(other):
        raise ValueError(f"paired samples differ in length: {len(reference)} vs {len(other)}")
    ratios = np.asarray(reference, np.float64) / np.asarray(other, np.float64)
    lo, hi = median_ci(ratios, confidence)
    return {"median": float(np.median(ratios)), "lo": lo, "hi": hi}


def measure_decode(variants: Sequence[tuple[str, Callable[[], object]]], repeats: int = 5,
                   warmup: int = 1) -> dict[str, float]:
    """Median seconds per decode step of each named no-arg step (e.g. from decode_step_setup or
    peers.hf_decode_step), variants alternated round-robin (measure_alternating)."""
    return measure_alternating(variants, repeats, warmup)


def decode_ms_per_step(config: model_lib.ModelConfig, batch: int, context: int,
                       repeats: int = 5, **setup_kw) -> float:
    """ms for one decode step: one new token for each of `batch` sequences at `context` cached
    tokens (median of repeats). Per generated token it is this / batch."""
    run = decode_step_setup(config, batch, context, **setup_kw)
    return measure_decode([("step", run)], repeats=repeats)["step"] * 1e3


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

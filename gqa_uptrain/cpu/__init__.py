"""CPU tuning, each piece chosen by a measurement on the 2-core machines this project is tested on,
behind one entry: `cpu.enable()`, which the command lines call (train, evaluate, bench,
experiments/reproduce.py). Without it the model is the plain textbook decoder everywhere.

  dense.py            the projections' custom gradient (x^T materialised for XLA:CPU's layout)
  xla_options.py      the decode step's compiler options (YNNPACK fusions off for large heads)
  hostmem.py          glibc malloc settings, applied by re-running the training commands once
  attention_vjp.py    'einsum_vjp', the CPU training attention (attention.AUTO picks it)
  cache_attention.py  'cache', the CPU decode attention over the bksd cache (attention.AUTO)

The two attention forms are implementations like any other, chosen by attention.select on CPU;
enable() turns on the rest. Importing this package imports nothing heavy: hostmem must run before
jax is loaded.
"""

from __future__ import annotations

_enabled = False


def enable(*, tune_malloc: bool = False) -> None:
    """Turns the CPU tuning on for this process (it applies only when jax's backend is the CPU).

    tune_malloc: first re-run this process with hostmem's malloc settings, where wanted (the
    training commands; call it before any other work, since nothing done so far survives).
    """
    global _enabled
    if tune_malloc:
        from gqa_uptrain.cpu import hostmem  # noqa: PLC0415

        hostmem.reexec_with_tuned_malloc()
    _enabled = True


def enabled() -> bool:
    """Whether enable() was called and jax runs on the CPU (read while tracing)."""
    if not _enabled:
        return False
    import jax  # noqa: PLC0415

    return jax.default_backend() == "cpu"

"""What the benchmarks share: table formatting, the machine's description, failures as reasons."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any, Callable, Sequence


def fmt(x: float | None, spec: str = "{:.3g}") -> str:
    """A number for a table cell; '' for None (not measured)."""
    return "" if x is None else spec.format(x)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                   align: str | None = None) -> str:
    """A Markdown table; align: one of 'l'/'r' per column (default: first left, the rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def attempt(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    """Runs fn(); returns (value, None), or (None, a one-line reason) when it fails."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 (a missing baseline is reported, not fatal)
        first_line = str(e).splitlines()[0][:120] if str(e) else ""
        return None, f"{type(e).__name__}: {first_line}".replace("|", "/")  # keep tables intact


def machine_info() -> dict[str, Any]:
    """Where and when a benchmark ran: what the README's tables cite beside the command."""
    import jax  # noqa: PLC0415

    from gqa_uptrain import perf  # noqa: PLC0415 (perf imports jax, like the line above)
    from gqa_uptrain.cpu import hostmem  # noqa: PLC0415

    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cpu": perf.cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "python": platform.python_version(),
        # glibc malloc settings in force (hostmem.py: the train benchmark re-runs itself with
        # them); {} = the C library's defaults.
        "malloc_env": hostmem.in_force(),
    }


def machine_line(info: dict[str, Any]) -> str:
    malloc = " ".join(f"{k}={v}" for k, v in info.get("malloc_env", {}).items())
    return (f"Measured {info['date_utc']} UTC on {info['cpu']} ({info['cpu_count']} cores), "
            f"jax {info['jax']} on {info['platform']} ({info['device']}); "
            f"malloc: {malloc or 'glibc defaults'}.")


class BenchError(ValueError):
    """A benchmark that cannot run as asked (bad values, no disk space): one line, exit 1."""

"""The argument after the colon of `--config=configs/x.py:ARG`, shared by every config file."""

from __future__ import annotations

from typing import Any


def parse_config_arg(arg: str | None, **defaults: Any) -> dict[str, Any]:
    """'smoke,num_kv_heads=2' -> {'smoke': True, 'num_kv_heads': 2, ...}; unknown keys are errors.

    Each value takes the type of its default; a bare key sets a bool to True.
    """
    out = dict(defaults)
    for token in filter(None, (arg or "").split(",")):
        key, _, value = token.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r} (known: {sorted(defaults)})")
        kind = type(defaults[key])
        out[key] = (value in ("", "1", "true", "True")) if kind is bool else kind(value)
    return out

"""The argument after the colon of `--config=configs/x.py:ARG`, shared by every config file."""

from __future__ import annotations

import difflib
from typing import Any


def parse_config_arg(arg: str | None, **defaults: Any) -> dict[str, Any]:
    """'smoke,num_kv_heads=2' -> {'smoke': True, 'num_kv_heads': 2, ...}; unknown keys are errors.

    Each value takes the type of its default; a bare key sets a bool to True.
    """
    out = dict(defaults)
    for token in filter(None, (arg or "").split(",")):
        key, _, value = token.partition("=")
        if key not in defaults:
            near = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"unknown config argument {key!r}{hint} "
                             f"(known: {', '.join(sorted(defaults))})")
        kind = type(defaults[key])
        if kind is bool:
            out[key] = value in ("", "1", "true", "True")
            continue
        try:
            out[key] = kind(value)
        except ValueError:
            raise ValueError(f"config argument {key}={value!r} is not a valid {kind.__name__}"
                             ) from None
    return out

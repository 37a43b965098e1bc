"""Two layouts of the same parameters: one entry per layer, or each layer's entries stacked.

    per layer   'layers.3.attn.k_proj'  [d_model, num_kv_heads, head_dim]   (L entries)
    stacked     'layers.attn.k_proj'    [num_layers, d_model, num_kv_heads, head_dim]

Checkpoints, the converters, Hugging Face import/export, calibration and decoding use the per-layer
layout. The trainer with config.scan_layers keeps its params and optimizer state stacked, so the
layers run as one jax.lax.scan whose body compiles once (model.Transformer(scan_layers=True)):
stacked on load, unstacked on save, so the checkpoint on disk is the same either way. Names outside
`layers.` (embed, final_norm.scale, lm_head) are the same in both layouts.

Works on numpy arrays, jax arrays (also inside jit) and jax.ShapeDtypeStruct alike.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

_PER_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def is_stacked_name(name: str) -> bool:
    """'layers.attn.k_proj' (stacked) -> True; 'layers.0.attn.k_proj' or 'embed' -> False."""
    parts = name.split(".")
    return len(parts) > 1 and parts[0] == "layers" and not parts[1].isdigit()


def _stack(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(values),) + tuple(first.shape), first.dtype)
    if isinstance(first, np.ndarray):
        return np.stack(values)
    return jnp.stack(values)


def _row(value: Any, i: int) -> Any:
    if isinstance(value, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(tuple(value.shape[1:]), value.dtype)
    return value[i]


def stack(params: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Per-layer -> stacked. Raises ValueError when a layer entry is missing or out of range.

    A host (numpy) dict is consumed entry by entry, so at most one stacked group is held twice.
    """
    out: dict[str, Any] = {}
    groups: dict[str, dict[int, Any]] = {}
    for name, value in params.items():
        m = _PER_LAYER.match(name)
        if m is None:
            out[name] = value
        else:
            groups.setdefault(m[2], {})[int(m[1])] = value
    for rest, layers in groups.items():
        if sorted(layers) != list(range(num_layers)):
            raise ValueError(f"layers.*.{rest}: expected layers 0..{num_layers - 1}, got "
                             f"{sorted(layers)}")
        out[f"layers.{rest}"] = _stack([layers.pop(i) for i in range(num_layers)])
    return out


def unstack(params: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Stacked -> per-layer (the inverse of `stack`)."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        if not is_stacked_name(name):
            out[name] = value
            continue
        if value.shape[0] != num_layers:
            raise ValueError(f"{name}: leading axis {value.shape[0]} != num_layers={num_layers}")
        rest = name[len("layers."):]
        for i in range(num_layers):
            out[f"layers.{i}.{rest}"] = _row(value, i)
    return out


def per_layer_shapes(shapes: dict[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
    """The same names, each stacked entry with the shape of one layer (what rules written for one
    layer's shapes read: the weight-decay mask, the partition rules)."""
    return {name: jax.ShapeDtypeStruct(tuple(x.shape[1:]) if is_stacked_name(name)
                                       else tuple(x.shape), x.dtype)
            for name, x in shapes.items()}


def map_param_dicts(tree: Any, names: set[str] | frozenset[str],
                    fn: Callable[[dict[str, Any]], dict[str, Any]],
                    other: Callable[[Any], Any] = lambda x: x) -> Any:
    """Applies fn to every dict in `tree` whose keys are exactly `names` (an optimizer state's
    per-parameter entries: optax's mu, nu, ...) and `other` to every other leaf."""
    names = set(names)

    def is_params(x):
        return isinstance(x, dict) and set(x) == names

    return jax.tree.map(lambda x: fn(x) if is_params(x) else other(x), tree, is_leaf=is_params)

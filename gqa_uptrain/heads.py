"""The two checks on head counts, with the names that keep their two ratios apart.

  group_size(num_heads, num_kv_heads)  query heads per KV head (q_per_kv) of one model: G must
                                       divide the query heads (model.py, attention, hf.py)
  pool_ratio(current, num_kv_heads)    old KV heads per new one in a conversion: G must divide
                                       the current KV heads (pooling, merging, the converter)

Plain Python (no jax, no numpy): the streaming HF -> HF converter checks with the same functions.
"""

from __future__ import annotations


def group_size(num_heads: int, num_kv_heads: int) -> int:
    """num_heads // num_kv_heads; raises ValueError naming both numbers if invalid."""
    if num_kv_heads < 1 or num_heads < 1:
        raise ValueError(
            f"num_heads={num_heads} and num_kv_heads={num_kv_heads} must both be >= 1")
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}")
    return num_heads // num_kv_heads


def pool_ratio(current: int, num_kv_heads: int) -> int:
    """current // num_kv_heads for a conversion from `current` KV heads to num_kv_heads.

    Raises ValueError naming both numbers if num_kv_heads < 1, > current, or does not divide
    current.
    """
    if num_kv_heads < 1:
        raise ValueError(f"num_kv_heads={num_kv_heads} must be >= 1 (the model has {current} KV "
                         "heads)")
    if num_kv_heads > current:
        raise ValueError(f"num_kv_heads={num_kv_heads} is more than the model's {current} KV heads "
                         "(pooling can only reduce them)")
    if current % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} does not divide the model's {current} KV "
                         "heads")
    return current // num_kv_heads

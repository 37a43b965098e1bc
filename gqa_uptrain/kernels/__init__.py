"""Pallas attention kernels with native grouped-query attention.

flash_attention.py: training (forward + backward, custom_vjp) — Triton kernels on a GPU (the same
  kernels in interpret mode on CPU); tpu.py wraps splash attention for a TPU.
decode_attention.py: new tokens against a [batch, kv_heads, max_len, head_dim] KV cache, split over
  the sequence (flash-decoding).
partition.py: the shard_map wrap attention() runs these kernels (and cuDNN's) in over a device mesh.
Each kernel file carries a plain-JAX reference of its op. Import from the modules, e.g.
`from gqa_uptrain.kernels.flash_attention import flash_attention`.
"""

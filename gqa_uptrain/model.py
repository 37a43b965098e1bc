"""A Llama-family decoder-only LM in Flax NNX with grouped-query attention.

Token embedding, RMSNorm, rotary position embedding in the rotate-half layout Hugging Face Llama uses
(so imported weights need no permutation), SwiGLU MLP, optional tied embeddings, optional q/k/v biases
(Qwen2) and o bias (Llama's attention_bias). Projection kernels keep a head axis
(`q_proj` [d_model, num_heads, head_dim], `k_proj` [d_model, num_kv_heads, head_dim]) so that pooling
K/V heads is an operation on one axis.

Parameters are exchanged as a flat dict {dotted name: array} (`get_params` / `set_params`); that
dict is what checkpoints hold and what the converters map to and from Hugging Face names.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gqa_uptrain import attention as attention_lib
from gqa_uptrain import heads
from gqa_uptrain.sharding import constrain
from gqa_uptrain import cpu
from gqa_uptrain.cpu import dense as cpu_dense
from gqa_uptrain.cpu import xla_options

_DTYPES = ("float32", "bfloat16", "float16")
# Rematerialisation policies of the blocks' backward pass (Transformer.__call__'s remat):
#   none  store every activation the backward pass needs (fastest, most memory);
#   full  store only each block's input and recompute the block (least memory, ~1/3 more compute);
#   dots  store the results of matmuls without batch dimensions (the projections and the MLP) and
#         recompute the rest (norms, rope, attention scores): most of full's saving at a fraction
#         of its recompute; MaxText's and levanter's usual choice for large models.
REMAT_POLICIES = ("none", "full", "dots")
# Rope scalings the model implements; anything else is refused by name (see hf.py).
ROPE_SCALING_TYPES = ("linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of the decoder. Frozen and hashable: it is static under jit.

    rope_scaling is None or a sorted tuple of (key, value) pairs, e.g.
    (('factor', 8.0), ('rope_type', 'llama3'), ...), kept hashable for the same reason.
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    mlp_dim: int
    head_dim: int | None = None  # None -> d_model // num_heads
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype of activations and matmuls

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "mlp_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        heads.group_size(self.num_heads, self.num_kv_heads)
        if self.head_dim is None:
            if self.d_model % self.num_heads:
                raise ValueError(f"d_model={self.d_model} is not divisible by "
                                 f"num_heads={self.num_heads}; set head_dim explicitly")
            object.__setattr__(self, "head_dim", self.d_model // self.num_heads)
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {_DTYPES}")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if self.rope_scaling is not None:
            kind = dict(self.rope_scaling).get("rope_type")
            if kind not in ROPE_SCALING_TYPES:
                raise ValueError(f"rope_scaling type {kind!r} is not supported "
                                 f"(supported: {ROPE_SCALING_TYPES})")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.rope_scaling is not None:
            d["rope_scaling"] = dict(self.rope_scaling)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)


def kv_cache_bytes_per_token(config: ModelConfig, dtype: Any = None) -> int:
    """Bytes of K and V cache one token costs across all layers: 2 · layers · kv_heads · head_dim · bytes."""
    itemsize = jnp.dtype(dtype or config.dtype).itemsize
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * itemsize


# ----------------------------------------------------------------------------- rotary embedding


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim // 2], float64 then float32, as Hugging Face computes them."""
    head_dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if config.rope_scaling is None:
        return inv_freq.astype(np.float32)
    scaling = dict(config.rope_scaling)
    if scaling["rope_type"] == "linear":
        return (inv_freq / scaling["factor"]).astype(np.float32)
    # 'llama3': long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half RoPE. x: [batch, seq, heads, head_dim]; positions: [batch, seq] ints."""
    freqs = positions[..., None].astype(jnp.float32) * inv_freq  # [b, t, d/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]  # [b, t, 1, d]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------- modules

# Logical axes of the activations (sharding.LOGICAL_RULES maps them to mesh axes; sharding.constrain
# applies them under a jax.set_mesh and is the identity without one).
BTD = ("batch", "seq", "act_embed")  # the residual stream [batch, seq, d_model]
BTNH = ("batch", "seq", "heads", "head_dim")  # queries and the attention output
BTKH = ("batch", "seq", "kv_heads", "head_dim")  # keys and values
BTF = ("batch", "seq", "mlp")  # the MLP's hidden activations


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., d_in] @ w [d_in, d_out] -> [..., d_out]: every projection of the model (with
    cpu.enable(), a custom gradient measured faster on XLA:CPU: gqa_uptrain/cpu/dense.py)."""
    return cpu_dense.dense(x, w) if cpu.enabled() else x @ w


def _init(rngs: nnx.Rngs, shape, fan_in: int, dtype) -> nnx.Param:
    # Drawn flat, then reshaped: with jax_threefry_partitionable, a rank-3 draw took 6-9 s to
    # compile here against ~1 s for the flat one (same values either way is not promised).
    flat = jax.random.normal(rngs.params(), (math.prod(shape),), dtype)
    return nnx.Param(flat.reshape(shape) * (fan_in ** -0.5))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        # Normalise in float32 and cast back before the scale, as Hugging Face Llama does.
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


class KVCache(NamedTuple):
    """Decode cache holding only num_kv_heads heads.

    k, v: tuples of num_layers arrays, each [batch, num_kv_heads, max_len, head_dim] — the bksd
      layout, measured ~8× faster than [batch, max_len, kv_heads, head_dim] for MHA decode on CPU
      (each (b, k) slab is contiguous). One array per layer, not one stacked array: with the cache
      donated, each layer's write is an in-place update, where slicing and re-stacking a
      [layers, ...] array copied the whole cache every step (measured: 2.0 s vs ~0.3 s per token).
    lengths: [batch] int32, valid entries per sequence (the next token's position).
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    lengths: jax.Array


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c = config
        dt = jnp.dtype(c.param_dtype)
        self.config = c
        self.q_proj = _init(rngs, (c.d_model, c.num_heads, c.head_dim), c.d_model, dt)
        self.k_proj = _init(rngs, (c.d_model, c.num_kv_heads, c.head_dim), c.d_model, dt)
        self.v_proj = _init(rngs, (c.d_model, c.num_kv_heads, c.head_dim), c.d_model, dt)
        self.o_proj = _init(rngs, (c.num_heads, c.head_dim, c.d_model), c.num_heads * c.head_dim, dt)
        if c.qkv_bias:
            self.q_bias = nnx.Param(jnp.zeros((c.num_heads, c.head_dim), dt))
            self.k_bias = nnx.Param(jnp.zeros((c.num_kv_heads, c.head_dim), dt))
            self.v_bias = nnx.Param(jnp.zeros((c.num_kv_heads, c.head_dim), dt))
        if c.o_bias:
            self.o_bias = nnx.Param(jnp.zeros((c.d_model,), dt))

    def _project(self, x, name):
        """x [b, t, d_model] -> [b, t, heads, head_dim] (q: num_heads; k, v: num_kv_heads)."""
        dt = jnp.dtype(self.config.dtype)
        kernel = getattr(self, name + "_proj")[...].astype(dt)  # [d_model, heads, head_dim]
        d_model, heads, head_dim = kernel.shape
        y = dense(x, kernel.reshape(d_model, heads * head_dim))
        y = y.reshape(x.shape[:-1] + (heads, head_dim))
        if self.config.qkv_bias:
            y = y + getattr(self, name + "_bias")[...].astype(dt)
        return y

    def _output(self, out):
        """out [b, t, num_heads, head_dim] -> [b, t, d_model]."""
        dt = jnp.dtype(self.config.dtype)
        kernel = self.o_proj[...].astype(dt)  # [num_heads, head_dim, d_model]
        heads, head_dim, d_model = kernel.shape
        y = dense(out.reshape(out.shape[:-2] + (heads * head_dim,)),
                  kernel.reshape(heads * head_dim, d_model))
        if self.config.o_bias:
            y = y + self.o_bias[...].astype(dt)
        return y

    def _qkv(self, x, positions, inv_freq):
        q = constrain(apply_rope(self._project(x, "q"), positions, inv_freq), BTNH)  # [b, t, n, h]
        k = constrain(apply_rope(self._project(x, "k"), positions, inv_freq), BTKH)  # [b, t, k, h]
        v = constrain(self._project(x, "v"), BTKH)  # [b, t, k, h]
        return q, k, v

    def __call__(self, x, positions, inv_freq, segment_ids, implementation):
        q, k, v = self._qkv(x, positions, inv_freq)
        out = attention_lib.attention(q, k, v, mode="train", causal=True,
                                      segment_ids=segment_ids, implementation=implementation)
        return self._output(constrain(out, BTNH))

    def decode(self, x, positions, inv_freq, cache_k, cache_v, lengths, implementation):
        """x: [b, t, d]; cache_k/v: [b, kv_heads, max_len, head_dim]; writes t entries at `lengths`."""
        q, k, v = self._qkv(x, positions, inv_freq)
        cache_dtype = cache_k.dtype

        def write(cache_b, new_b, start):  # [k, S, h] <- [t, k, h] at start
            return jax.lax.dynamic_update_slice(
                cache_b, jnp.swapaxes(new_b, 0, 1).astype(cache_dtype), (0, start, 0))

        cache_k = jax.vmap(write)(cache_k, k, lengths)
        cache_v = jax.vmap(write)(cache_v, v, lengths)
        out = attention_lib.attention(
            q, cache_k.astype(q.dtype), cache_v.astype(q.dtype), causal=True, q_offset=lengths,
            kv_lengths=lengths + x.shape[1], implementation=implementation, mode="decode")
        return self._output(out), cache_k, cache_v


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c = config
        dt = jnp.dtype(c.param_dtype)
        self.dtype = jnp.dtype(c.dtype)
        self.gate_proj = _init(rngs, (c.d_model, c.mlp_dim), c.d_model, dt)
        self.up_proj = _init(rngs, (c.d_model, c.mlp_dim), c.d_model, dt)
        self.down_proj = _init(rngs, (c.mlp_dim, c.d_model), c.mlp_dim, dt)

    def __call__(self, x):
        gate = constrain(dense(x, self.gate_proj[...].astype(self.dtype)), BTF)
        up = constrain(dense(x, self.up_proj[...].astype(self.dtype)), BTF)
        return dense(jax.nn.silu(gate) * up, self.down_proj[...].astype(self.dtype))


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        dt = jnp.dtype(config.param_dtype)
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps, dt)
        self.attn = Attention(config, rngs)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps, dt)
        self.mlp = MLP(config, rngs)


def project_logits(hidden: jax.Array, head: jax.Array) -> jax.Array:
    """hidden [batch, seq, d_model] (compute dtype) @ head [d_model, vocab] -> float32 logits
    [batch, seq, vocab]: the matmul runs in the compute dtype and accumulates in float32."""
    return jnp.einsum("btd,dv->btv", hidden, head.astype(hidden.dtype),
                      preferred_element_type=jnp.float32)


def remat_policy(remat: bool | str) -> str:
    """A REMAT_POLICIES name from a name or a bool (True = 'full', False = 'none')."""
    if isinstance(remat, bool):
        return "full" if remat else "none"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r} is not one of {REMAT_POLICIES}")
    return remat


def _remat(fn, remat: bool | str):
    policy = remat_policy(remat)
    if policy == "none":
        return fn
    saveable = (jax.checkpoint_policies.nothing_saveable if policy == "full" else
                jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    return jax.checkpoint(fn, policy=saveable)


def _stack_blocks(blocks: list[Block]) -> Block:
    """One Block whose every Param has a leading [num_layers] axis (layer_stack's layout)."""
    graphdef = nnx.split(blocks[0])[0]
    states = [nnx.split(b)[1] for b in blocks]
    return nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))


class Transformer(nnx.Module):
    """Decoder-only causal LM. Construct with `Transformer(config, rngs=nnx.Rngs(seed))`.

    scan_layers=True holds the blocks as one Block with stacked params ('layers.attn.k_proj'
    [num_layers, ...], layer_stack.py) and runs them as one jax.lax.scan, so the compiled step does
    not grow with depth; its initial values equal the per-layer model's for the same seed. Decoding
    (per-layer KV cache) needs the per-layer layout.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, scan_layers: bool = False):
        c = config
        dt = jnp.dtype(c.param_dtype)
        self.config = c
        self.scan_layers = scan_layers
        self.embed = nnx.Param(jax.random.normal(rngs.params(), (c.vocab_size, c.d_model), dt))
        blocks = [Block(c, rngs) for _ in range(c.num_layers)]
        self.layers = _stack_blocks(blocks) if scan_layers else nnx.List(blocks)
        self.final_norm = RMSNorm(c.d_model, c.norm_eps, dt)
        if not c.tie_embeddings:
            self.lm_head = _init(rngs, (c.d_model, c.vocab_size), c.d_model, dt)

    def _embed(self, tokens):
        return self.embed[...][tokens].astype(jnp.dtype(self.config.dtype))

    def head(self) -> jax.Array:
        """The output projection [d_model, vocab] in its param dtype (the embedding's transpose
        when tied)."""
        return self.embed[...].T if self.config.tie_embeddings else self.lm_head[...]

    def _logits(self, x):
        return project_logits(self.final_norm(x), self.head())

    def hidden(self, tokens, *, segment_ids=None, positions=None, implementation="auto",
               remat: bool | str = "none") -> jax.Array:
        """The final-normed residual stream [batch, seq, d_model] in the compute dtype: what the
        logits are `hidden @ head()` of (losses.py computes them in chunks from it)."""
        batch, seq = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        inv_freq = rope_inv_freq(self.config)

        def block_fn(graphdef, state, x):
            block = nnx.merge(graphdef, state)
            x = constrain(x + block.attn(block.attn_norm(x), positions, inv_freq, segment_ids,
                                         implementation), BTD)
            return constrain(x + block.mlp(block.mlp_norm(x)), BTD)

        # A pure function of (state, x) under jax.checkpoint: the Block is rebuilt inside it.
        x = constrain(self._embed(tokens), BTD)
        if self.scan_layers:
            graphdef, state = nnx.split(self.layers)
            step = _remat(lambda s, x: block_fn(graphdef, s, x), remat)
            x, _ = jax.lax.scan(lambda x, s: (step(s, x), None), x, state)
        else:
            for block in self.layers:
                graphdef, state = nnx.split(block)
                x = _remat(lambda s, x, g=graphdef: block_fn(g, s, x), remat)(state, x)
        return constrain(self.final_norm(x), BTD)

    def __call__(self, tokens, *, segment_ids=None, positions=None, implementation="auto",
                 remat: bool | str = "none"):
        """Training/scoring forward. tokens: [batch, seq] ints -> logits [batch, seq, vocab] float32.

        segment_ids [batch, seq] keep packed documents apart; positions [batch, seq] default to
        0..seq-1 (pass per-segment positions for packed data). remat (REMAT_POLICIES, or a bool)
        chooses what each block's backward pass recomputes instead of storing; the forward values
        are unchanged.
        """
        return project_logits(self.hidden(tokens, segment_ids=segment_ids, positions=positions,
                                          implementation=implementation, remat=remat),
                              self.head())

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> KVCache:
        """Empty cache for `batch` sequences of up to `max_len` tokens (dtype defaults to compute)."""
        c = self.config
        shape = (batch, c.num_kv_heads, max_len, c.head_dim)
        dt = jnp.dtype(dtype or c.dtype)
        zeros = lambda: tuple(jnp.zeros(shape, dt) for _ in range(c.num_layers))
        return KVCache(zeros(), zeros(), jnp.zeros((batch,), jnp.int32))

    def decode(self, tokens, cache: KVCache, *, num_valid=None, implementation="auto"):
        """Prefill or step: tokens [batch, t] are written at positions cache.lengths + 0..t-1.

        num_valid [batch] (default t) says how many of the t tokens are real (ragged prefill with
        right padding); the new lengths are cache.lengths + num_valid, so padding entries are
        overwritten by the next step. Returns (logits [batch, t, vocab] float32, new cache).
        The caller must keep lengths + t <= max_len (dynamic_update_slice would clamp).
        """
        if self.scan_layers:
            raise ValueError("decoding needs the per-layer layout (Transformer(scan_layers=False))")
        batch, seq = tokens.shape
        positions = cache.lengths[:, None] + jnp.arange(seq, dtype=jnp.int32)[None, :]
        inv_freq = rope_inv_freq(self.config)
        x = self._embed(tokens)
        new_k, new_v = [], []
        for i, block in enumerate(self.layers):
            h, ck, cv = block.attn.decode(block.attn_norm(x), positions, inv_freq, cache.k[i],
                                          cache.v[i], cache.lengths, implementation)
            new_k.append(ck)
            new_v.append(cv)
            x = x + h
            x = x + block.mlp(block.mlp_norm(x))
        if num_valid is None:
            num_valid = jnp.full((batch,), seq, jnp.int32)
        cache = KVCache(tuple(new_k), tuple(new_v), cache.lengths + num_valid)
        return self._logits(x), cache


# ----------------------------------------------------------------------------- params as a flat dict


def _path_name(path) -> str:
    return ".".join(str(p) for p in path)


def get_params(model: nnx.Module) -> dict[str, jax.Array]:
    """Flat {dotted name: array} of every nnx.Param, e.g. 'layers.0.attn.k_proj'."""
    state = nnx.state(model, nnx.Param)
    return {_path_name(path): var.get_value() for path, var in nnx.to_flat_state(state)}


def set_params(model: nnx.Module, params: dict[str, Any]) -> None:
    """Strictly loads a flat params dict: a missing/unexpected name or a shape mismatch raises."""
    state = nnx.state(model, nnx.Param)
    flat = {_path_name(path): var for path, var in nnx.to_flat_state(state)}
    check_params_match({k: v.get_value() for k, v in flat.items()}, params)
    for name, var in flat.items():
        var.set_value(jnp.asarray(params[name], var.get_value().dtype))


def check_params_match(expected: dict[str, Any], got: dict[str, Any], what: str = "params") -> None:
    """Raises ValueError naming missing or unexpected names and shape mismatches."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{what} do not match the model: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    for name in sorted(expected):
        if tuple(np.shape(expected[name])) != tuple(np.shape(got[name])):
            raise ValueError(f"{what}: shape mismatch for {name!r}: model expects "
                             f"{tuple(np.shape(expected[name]))}, got {tuple(np.shape(got[name]))}")


def abstract_params(config: ModelConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Names, shapes and dtypes of the params of a model with this config, without allocating."""
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    return get_params(model)


def build_model(config: ModelConfig, params: dict[str, Any] | None = None, seed: int = 0) -> Transformer:
    """A Transformer with random params from `seed`, or with `params` loaded strictly."""
    model = Transformer(config, rngs=nnx.Rngs(seed))
    if params is not None:
        set_params(model, params)
    return model


def count_params(params: dict[str, Any]) -> int:
    return int(sum(np.prod(np.shape(v)) for v in params.values()))


# ----------------------------------------------------------------------------- decoding


@functools.partial(jax.jit, static_argnames=("graphdef", "implementation"))
def _forward_jit(graphdef, state, tokens, segment_ids, positions, implementation):
    model = nnx.merge(graphdef, state)
    return model(tokens, segment_ids=segment_ids, positions=positions,
                 implementation=implementation)


def forward_fn(model: Transformer, implementation: str = "auto"):
    """A jitted (tokens, segment_ids=None, positions=None) -> logits closure over the model."""
    graphdef, state = nnx.split(model)

    def forward(tokens, segment_ids=None, positions=None):
        return _forward_jit(graphdef, state, tokens, segment_ids, positions, implementation)

    return forward


def _decode(graphdef, state, tokens, cache, num_valid, implementation):
    model = nnx.merge(graphdef, state)
    return model.decode(tokens, cache, num_valid=num_valid, implementation=implementation)


@functools.cache
def _decode_jit(options: tuple[tuple[str, Any], ...]):
    # One jit per set of compiler options (cpu/xla_options.py: they depend on the backend and the
    # head size), built on first use: importing this module must not initialise a backend.
    return jax.jit(_decode, static_argnames=("graphdef", "implementation"),
                   donate_argnames=("cache",), compiler_options=dict(options) or None)


def decode_fn(model: Transformer, implementation: str = "auto"):
    """A jitted (tokens, cache, num_valid) -> (logits, cache) closure; the cache is donated."""
    graphdef, state = nnx.split(model)
    options = (xla_options.decode_options(model.config.head_dim) if cpu.enabled() else None) or {}
    jitted = _decode_jit(tuple(sorted(options.items())))

    def step(tokens, cache, num_valid=None):
        if num_valid is None:
            num_valid = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
        return jitted(graphdef, state, tokens, cache, num_valid, implementation)

    return step


def generate(
    model: Transformer,
    prompt: jax.Array,
    prompt_lengths: jax.Array,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    rng: jax.Array | None = None,
    cache_dtype: Any = None,
    implementation: str = "auto",
) -> jax.Array:
    """Greedy (temperature 0) or sampled continuation.

    prompt: [batch, prompt_len] right-padded; prompt_lengths: [batch]. Returns the new tokens
    [batch, max_new_tokens]. The cache holds prompt_len + max_new_tokens entries per sequence.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if temperature > 0 and rng is None:
        raise ValueError("sampling with temperature > 0 needs rng")
    prompt = jnp.asarray(prompt, jnp.int32)
    prompt_lengths = jnp.asarray(prompt_lengths, jnp.int32)
    batch, prompt_len = prompt.shape
    step = decode_fn(model, implementation)
    cache = model.init_cache(batch, prompt_len + max_new_tokens, cache_dtype)
    logits, cache = step(prompt, cache, prompt_lengths)
    # The last real prompt token's logits predict the first new token.
    last = jnp.take_along_axis(logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
    out = []
    for i in range(max_new_tokens):
        if temperature == 0:
            token = jnp.argmax(last, axis=-1)
        else:
            token = jax.random.categorical(jax.random.fold_in(rng, i), last / temperature)
        out.append(token)
        if i + 1 < max_new_tokens:
            logits, cache = step(token[:, None].astype(jnp.int32), cache)
            last = logits[:, 0]
    return jnp.stack(out, axis=1)

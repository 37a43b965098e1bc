"""The model's loss, shared by training (train_step.make_train_step) and scoring (evaluate.py): the
forward pass as a pure function of the flat params dict (make_apply), the summed negative
log-likelihood of a batch's predicted tokens (nll_sum, its logits in chunks: chunked_nll), and the
jitted scoring step built from them (make_eval_step).

Logits, softmax and loss are float32 whatever the compute dtype: the final hidden states (compute
dtype) meet the output projection in a matmul that accumulates in float32.

Chunked cross-entropy: the full [batch, seq, vocab] float32 logits of a long batch are the largest
tensor of a step (4 x 4096 tokens x 32k vocabulary: 2 GiB, and as much again for their gradient),
so with loss_chunk_size = c < seq the sequence is cut into chunks of c positions, scanned, and each
chunk's logits are recomputed in the backward pass (jax.checkpoint) instead of stored: at most
[batch, c, vocab] of them exist at a time. The same loss and gradients as the plain path to fp32
rounding (tests/test_losses.py).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gqa_uptrain.model import ModelConfig, Transformer


def make_apply(config: ModelConfig, *, scan_layers: bool = False) -> Callable[..., tuple]:
    """apply(params, tokens, *, segment_ids, positions, implementation, remat) -> (hidden, head).

    A pure function of the flat params dict (the pytree the trainer shards and differentiates; in
    layer_stack's stacked layout when scan_layers): it rebuilds the NNX module from the params
    inside the trace. tokens [batch, seq] -> hidden [batch, seq, d_model] (final-normed, compute
    dtype) and head [d_model, vocab] (param dtype): the logits are hidden @ head.
    """
    graphdef, state = nnx.split(nnx.eval_shape(
        lambda: Transformer(config, rngs=nnx.Rngs(0), scan_layers=scan_layers)))
    flat = list(nnx.to_flat_state(state))
    names = [".".join(str(p) for p in path) for path, _ in flat]

    def apply(params, tokens, *, segment_ids=None, positions=None, implementation="auto",
              remat="none"):
        state = nnx.from_flat_state(
            [(path, var.replace(params[name])) for (path, var), name in zip(flat, names)])
        model = nnx.merge(graphdef, state)
        hidden = model.hidden(tokens, segment_ids=segment_ids, positions=positions,
                              implementation=implementation, remat=remat)
        return hidden, model.head()

    return apply


def _nll_of_chunk(head, hidden, targets, mask):
    """Masked nll sum of one chunk: hidden [b, c, d], targets/mask [b, c] -> float32 scalar."""
    logits = jnp.einsum("btd,dv->btv", hidden, head.astype(hidden.dtype),
                        preferred_element_type=jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(nll * mask)


def chunked_nll(hidden: jax.Array, head: jax.Array, targets: jax.Array, mask: jax.Array,
                chunk_size: int = 0) -> jax.Array:
    """Sum over positions of mask * -log softmax(hidden @ head)[target], float32.

    hidden [batch, seq, d_model]; head [d_model, vocab]; targets [batch, seq] ints; mask
    [batch, seq] float32. chunk_size <= 0 or >= seq: the plain computation (all logits at once);
    else chunks of chunk_size positions (the last one padded with mask 0), each chunk's logits
    recomputed in the backward pass. The batch axis is kept whole, so a batch split over devices
    stays split.
    """
    batch, seq, d_model = hidden.shape
    if chunk_size <= 0 or chunk_size >= seq:
        return _nll_of_chunk(head, hidden, targets, mask)
    num_chunks = -(-seq // chunk_size)
    pad = num_chunks * chunk_size - seq
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))

    def chunks(x):  # [b, n * c, ...] -> [n, b, c, ...]
        return jnp.swapaxes(x.reshape((batch, num_chunks, chunk_size) + x.shape[2:]), 0, 1)

    one = jax.checkpoint(_nll_of_chunk)

    def body(total, xs):
        return total + one(head, *xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                            (chunks(hidden), chunks(targets), chunks(mask)))
    return total


def nll_sum(apply, params, batch: dict[str, jax.Array], *, implementation: str = "auto",
            remat: bool | str = "none", loss_chunk_size: int = 0
            ) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p(target) over tokens with loss_mask, number of such tokens), float32 scalars.

    batch: data.BATCH_KEYS, each [batch, seq] int32.
    """
    hidden, head = apply(params, batch["inputs"], segment_ids=batch["segment_ids"],
                         positions=batch["positions"], implementation=implementation,
                         remat=remat)
    mask = batch["loss_mask"].astype(jnp.float32)
    return chunked_nll(hidden, head, batch["targets"], mask, loss_chunk_size), jnp.sum(mask)


def make_eval_step(config: ModelConfig, implementation: str, out_sharding=None, *,
                   scan_layers: bool = False, loss_chunk_size: int = 0):
    """Jitted (params, batch) -> (nll sum, token count); params in the stacked layout when
    scan_layers."""
    apply = make_apply(config, scan_layers=scan_layers)

    def step(params, batch):
        return nll_sum(apply, params, batch, implementation=implementation,
                       loss_chunk_size=loss_chunk_size)

    return jax.jit(step, out_shardings=out_sharding)

"""The model's loss, shared by training (train.make_train_step) and scoring (evaluate.py): the
forward pass as a pure function of the flat params dict (make_apply), the summed negative
log-likelihood of a batch's predicted tokens (nll_sum), and the jitted scoring step built from them
(make_eval_step).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gqa_uptrain.model import ModelConfig, Transformer


def make_apply(config: ModelConfig) -> Callable[..., jax.Array]:
    """apply(params, tokens, *, segment_ids, positions, implementation, remat) -> logits.

    A pure function of the flat params dict (the pytree the trainer shards and differentiates):
    it rebuilds the NNX module from the params inside the trace. tokens [batch, seq] ->
    logits [batch, seq, vocab] float32.
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))
    flat = list(nnx.to_flat_state(state))
    names = [".".join(str(p) for p in path) for path, _ in flat]

    def apply(params, tokens, *, segment_ids=None, positions=None, implementation="auto",
              remat=False):
        state = nnx.from_flat_state(
            [(path, var.replace(params[name])) for (path, var), name in zip(flat, names)])
        model = nnx.merge(graphdef, state)
        return model(tokens, segment_ids=segment_ids, positions=positions,
                     implementation=implementation, remat=remat)

    return apply


def nll_sum(apply, params, batch: dict[str, jax.Array], *, implementation: str = "auto",
            remat: bool = False) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p(target) over tokens with loss_mask, number of such tokens), float32 scalars.

    batch: data.BATCH_KEYS, each [batch, seq] int32.
    """
    logits = apply(params, batch["inputs"], segment_ids=batch["segment_ids"],
                   positions=batch["positions"], implementation=implementation, remat=remat)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])  # [b, t]
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def make_eval_step(config: ModelConfig, implementation: str, out_sharding=None):
    """Jitted (params, batch) -> (nll sum, token count)."""
    apply = make_apply(config)

    def step(params, batch):
        return nll_sum(apply, params, batch, implementation=implementation)

    return jax.jit(step, out_shardings=out_sharding)

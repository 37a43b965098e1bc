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

Distillation (chunked_distill, distill_sums): beside each chunk's nll, KL(teacher || student) of the
softmaxes at temperature T, the teacher's logits of the same chunk computed from its final hidden
states (no gradient) in the same chunk, so neither model's full logits exist; train_step weighs the
two sums as (1 - lambda) nll + lambda T^2 KL (tests/test_distill.py).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gqa_uptrain.model import ModelConfig, Transformer, project_logits


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


def _chunked_sums(fn, shared: tuple[jax.Array, ...], per_position: tuple[jax.Array, ...],
                  chunk_size: int, *, num_sums: int) -> tuple[jax.Array, ...]:
    """fn(*shared, *per_position) summed over sequence chunks: `shared` (the output projections)
    is passed whole to every call, each of `per_position` [batch, seq, ...] cut into chunks
    [batch, c, ...]; fn returns a scalar (num_sums == 1) or a tuple of num_sums float32 scalars. chunk_size <= 0 or >= seq: one call
    on the whole sequence. Else the sequence axis (1) is padded with zeros to whole chunks (a
    zero mask scores nothing), the chunks are scanned in order, and fn is recomputed in the
    backward pass (jax.checkpoint), so only one chunk's intermediates (its logits) exist at a
    time. The batch axis is kept whole, so a batch split over devices stays split."""
    def as_tuple(x):
        return (x,) if num_sums == 1 else tuple(x)

    batch, seq = per_position[0].shape[:2]
    if chunk_size <= 0 or chunk_size >= seq:
        return as_tuple(fn(*shared, *per_position))
    num_chunks = -(-seq // chunk_size)
    pad = num_chunks * chunk_size - seq

    def chunks(x):  # [b, seq, ...] -> [n, b, c, ...]
        if pad:
            x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return jnp.swapaxes(x.reshape((batch, num_chunks, chunk_size) + x.shape[2:]), 0, 1)

    one = jax.checkpoint(fn)

    def body(totals, xs):
        return tuple(t + v for t, v in zip(totals, as_tuple(one(*shared, *xs)))), None

    zeros = tuple(jnp.zeros((), jnp.float32) for _ in range(num_sums))
    totals, _ = jax.lax.scan(body, zeros, tuple(chunks(x) for x in per_position))
    return totals


def _nll_of_chunk(head, hidden, targets, mask):
    """Masked nll sum of one chunk: hidden [b, c, d], targets/mask [b, c] -> float32 scalar."""
    logits = project_logits(hidden, head)
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
    return _chunked_sums(_nll_of_chunk, (head,), (hidden, targets, mask), chunk_size,
                         num_sums=1)[0]


def _distill_of_chunk(temperature, head, teacher_head, hidden, teacher_hidden, targets, mask):
    """(masked nll sum, masked KL(teacher || student) sum at `temperature`) of one chunk: hidden
    [b, c, d], teacher_hidden [b, c, d_teacher], targets/mask [b, c] -> two float32 scalars."""
    logits = project_logits(hidden, head)  # [b, c, vocab]
    teacher_logits = project_logits(teacher_hidden, teacher_head)  # [b, c, vocab]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    log_p_teacher = jax.nn.log_softmax(teacher_logits / temperature)
    log_p_student = jax.nn.log_softmax(logits / temperature)
    kl = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)  # [b, c]
    return jnp.sum(nll * mask), jnp.sum(kl * mask)


def chunked_distill(hidden: jax.Array, head: jax.Array, teacher_hidden: jax.Array,
                    teacher_head: jax.Array, targets: jax.Array, mask: jax.Array,
                    temperature: float, chunk_size: int = 0) -> tuple[jax.Array, jax.Array]:
    """(sum of mask * nll, sum of mask * KL(softmax(t / T) || softmax(s / T))), float32, where s =
    hidden @ head are the student's logits and t = teacher_hidden @ teacher_head the teacher's.

    hidden [batch, seq, d_model]; head [d_model, vocab]; teacher_hidden [batch, seq, d_teacher];
    teacher_head [d_teacher, vocab]; targets [batch, seq] ints; mask [batch, seq] float32. Chunked
    as chunked_nll (same chunk_size rule, the last chunk padded with mask 0): both models' logits
    of one chunk at a time, recomputed in the backward pass. The nll sum is chunked_nll's formula
    (equal to its rounding, not necessarily bit for bit: XLA fuses it with the KL). No gradient flows into the teacher's arguments that the caller does not ask
    for (train_step stops it at the teacher's hidden states).
    """
    nll, kl = _chunked_sums(functools.partial(_distill_of_chunk, temperature), (head, teacher_head),
                            (hidden, teacher_hidden, targets, mask), chunk_size, num_sums=2)
    return nll, kl


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


def distill_sums(apply, params, teacher_apply, teacher_params, batch: dict[str, jax.Array], *,
                 temperature: float, implementation: str = "auto", remat: bool | str = "none",
                 loss_chunk_size: int = 0) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p(target), sum of KL(teacher || student) at `temperature`) over the tokens
    with loss_mask, float32 scalars: the teacher's forward (teacher_apply, teacher_params) on the
    same batch, its hidden states under stop_gradient, then chunked_distill.

    batch: data.BATCH_KEYS, each [batch, seq] int32.
    """
    teacher_hidden, teacher_head = teacher_apply(
        teacher_params, batch["inputs"], segment_ids=batch["segment_ids"],
        positions=batch["positions"], implementation=implementation)
    teacher_hidden, teacher_head = jax.lax.stop_gradient((teacher_hidden, teacher_head))
    hidden, head = apply(params, batch["inputs"], segment_ids=batch["segment_ids"],
                         positions=batch["positions"], implementation=implementation,
                         remat=remat)
    mask = batch["loss_mask"].astype(jnp.float32)
    return chunked_distill(hidden, head, teacher_hidden, teacher_head, batch["targets"], mask,
                           temperature, loss_chunk_size)


def make_eval_step(config: ModelConfig, implementation: str, out_sharding=None, *,
                   scan_layers: bool = False, loss_chunk_size: int = 0):
    """Jitted (params, batch) -> (nll sum, token count); params in the stacked layout when
    scan_layers."""
    apply = make_apply(config, scan_layers=scan_layers)

    def step(params, batch):
        return nll_sum(apply, params, batch, implementation=implementation,
                       loss_chunk_size=loss_chunk_size)

    return jax.jit(step, out_shardings=out_sharding)

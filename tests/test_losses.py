"""Chunked cross-entropy (losses.chunked_nll) against the plain computation (chunk_size 0: all
logits at once), in value and gradient, fp32; and inside the real loss of the model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gqa_uptrain import losses
from gqa_uptrain.model import ModelConfig, Transformer, get_params


def rel_err(got, want) -> float:
    """||got - want|| / ||want||: relative error of a whole array (elementwise relative error is
    meaningless for the entries near 0 that a gradient always has)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _inputs(batch=3, seq=37, d_model=24, vocab=211, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(k[0], (batch, seq, d_model), jnp.float32)
    head = jax.random.normal(k[1], (d_model, vocab), jnp.float32) * 0.5
    targets = jax.random.randint(k[2], (batch, seq), 0, vocab)
    mask = (jax.random.uniform(k[3], (batch, seq)) > 0.2).astype(jnp.float32)
    return hidden, head, targets, mask


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 36])  # 5 and 8 pad the last chunk; 36 pads 35
def test_chunked_nll_equals_the_plain_loss_and_its_gradient(chunk_size):
    hidden, head, targets, mask = _inputs()

    def loss(h, w, c):
        return losses.chunked_nll(h, w, targets, mask, c)

    plain, (gh, gw) = jax.value_and_grad(loss, argnums=(0, 1))(hidden, head, 0)
    got, (ch, cw) = jax.value_and_grad(loss, argnums=(0, 1))(hidden, head, chunk_size)
    # The plain path, written out: log-softmax of every logit at once.
    logits = hidden @ head
    ref = -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
                   * mask)
    np.testing.assert_allclose(plain, ref, rtol=1e-6)
    np.testing.assert_allclose(got, plain, rtol=1e-6)
    assert rel_err(ch, gh) < 1e-6 and rel_err(cw, gw) < 1e-6, (rel_err(ch, gh), rel_err(cw, gw))
    assert float(jnp.abs(gw).max()) > 1e-2  # a gradient worth comparing


def test_no_full_logits_exist_in_the_chunked_gradient():
    """The compiled gradient with chunks holds no [batch, seq, vocab] buffer (the point of it):
    XLA's memory analysis of the temporaries is below one full logits array."""
    hidden, head, targets, mask = _inputs(batch=2, seq=256, d_model=16, vocab=4096)
    full_bytes = 2 * 256 * 4096 * 4

    def temp_bytes(chunk):
        fn = jax.jit(jax.grad(lambda h, w: losses.chunked_nll(h, w, targets, mask, chunk),
                              argnums=(0, 1)))
        return fn.lower(hidden, head).compile().memory_analysis().temp_size_in_bytes

    plain, chunked = temp_bytes(0), temp_bytes(32)
    assert plain >= full_bytes, plain  # the plain gradient does materialise them
    assert chunked < full_bytes / 2, (chunked, full_bytes)


def test_the_model_loss_is_the_same_chunked_and_plain():
    config = ModelConfig(vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         mlp_dim=64)
    params = get_params(Transformer(config, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(1), (2, 3, 20), 0, 97)
    batch = {"inputs": tokens[0], "targets": tokens[1], "segment_ids": jnp.ones((3, 20), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(20), (3, 20)),
             "loss_mask": jnp.ones((3, 20), jnp.int32)}
    apply = losses.make_apply(config)

    def loss(p, chunk):
        return losses.nll_sum(apply, p, batch, loss_chunk_size=chunk)[0]

    plain, g_plain = jax.value_and_grad(loss)(params, 0)
    chunked, g_chunked = jax.value_and_grad(loss)(params, 6)
    np.testing.assert_allclose(chunked, plain, rtol=1e-6)
    for name in params:
        assert rel_err(g_chunked[name], g_plain[name]) < 1e-6, name
    # And the logits path the loss replaced: the model's own forward.
    logits = Transformer(config, rngs=nnx.Rngs(0))(batch["inputs"])
    ref = -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None],
                                       -1))
    np.testing.assert_allclose(plain, ref, rtol=1e-5)

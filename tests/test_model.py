"""The GQA decoder: grouping convention, no repeated K/V, decoding, causality, bad head counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_uptrain import attention as attention_lib
from gqa_uptrain import cpu
from gqa_uptrain import model as model_lib
from gqa_uptrain.cpu import dense as cpu_dense

NUM_HEADS = 4


def tiny_config(num_kv_heads, **kw):
    base = dict(vocab_size=61, d_model=32, num_layers=2, num_heads=NUM_HEADS,
                num_kv_heads=num_kv_heads, mlp_dim=48)
    base.update(kw)
    return model_lib.ModelConfig(**base)


def _tokens(batch, seq, vocab=61, seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, seq), 0, vocab)


def _expand_kv(params, q_per_kv, interleaved):
    """MHA params from GQA ones by copying each KV head q_per_kv times.

    Contiguous (the convention): KV head j serves query heads j*q_per_kv ... j*q_per_kv + q_per_kv-1,
    so the copies sit next to each other (np.repeat). Interleaved puts them q_per_kv apart (np.tile).
    """
    out = {}
    for name, w in params.items():
        w = np.asarray(w)
        if name.endswith(("attn.k_proj", "attn.v_proj")):
            w = np.tile(w, (1, q_per_kv, 1)) if interleaved else np.repeat(w, q_per_kv, axis=1)
        out[name] = w
    return out


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_gqa_equals_mha_with_contiguously_repeated_kv(num_kv_heads):
    gqa = model_lib.build_model(tiny_config(num_kv_heads), seed=1)
    tokens = _tokens(2, 9)
    want = model_lib.forward_fn(gqa, "reference")(tokens)
    q_per_kv = NUM_HEADS // num_kv_heads
    mha_config = tiny_config(NUM_HEADS)
    contiguous = model_lib.build_model(
        mha_config, _expand_kv(model_lib.get_params(gqa), q_per_kv, interleaved=False))
    for implementation in ("reference", "xla", "einsum_vjp"):
        np.testing.assert_allclose(model_lib.forward_fn(contiguous, implementation)(tokens), want,
                                   atol=2e-5, rtol=1e-5)
    # Negative control: interleaved copies pair query heads with the wrong KV heads, so this
    # equivalence must break. (For MQA both orders coincide: there is one KV head.)
    if num_kv_heads > 1:
        interleaved = model_lib.build_model(
            mha_config, _expand_kv(model_lib.get_params(gqa), q_per_kv, interleaved=True))
        diff = np.abs(np.asarray(model_lib.forward_fn(interleaved, "reference")(tokens)) - want).max()
        assert diff > 1e-2, "interleaved KV copies should not reproduce the GQA model"


def _all_shapes(jaxpr):
    """Shapes of every value produced anywhere in a (closed) jaxpr, sub-jaxprs included."""
    shapes = []
    for eqn in jaxpr.eqns:
        shapes += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    shapes += _all_shapes(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    shapes += _all_shapes(sub)
    return shapes


def _has_repeated_kv(shapes, seq_kv, num_heads, head_dim):
    # A K/V tensor repeated up to num_heads carries the KV length, num_heads and head_dim at once.
    return [s for s in shapes if seq_kv in s and num_heads in s and head_dim in s]


@pytest.mark.parametrize("implementation", ["reference", "xla", "einsum_vjp"])
def test_no_kv_tensor_with_num_heads_heads_in_attention_jaxpr(implementation):
    # Pairwise-distinct sizes so that a shape identifies its axes: seq_q 5, seq_kv 7, heads 6,
    # kv heads 2, group 3, head_dim 8, batch 1.
    q = jnp.zeros((1, 5, 6, 8))
    k = v = jnp.zeros((1, 7, 2, 8))
    fn = lambda q, k, v: attention_lib.attention(q, k, v, causal=False, implementation=implementation)
    shapes = _all_shapes(jax.make_jaxpr(fn)(q, k, v).jaxpr)
    assert (1, 7, 2, 8) in shapes or any(7 in s for s in shapes)  # the walk does see K/V
    assert not _has_repeated_kv(shapes, 7, 6, 8)
    # Positive control of the detector: a repeat-KV implementation is caught.
    bad = lambda q, k, v: attention_lib.reference_attention(
        q, jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2))
    assert _has_repeated_kv(_all_shapes(jax.make_jaxpr(bad)(q, k, v).jaxpr), 7, 6, 8)


def test_no_kv_tensor_with_num_heads_heads_in_model_decode_jaxpr():
    # Decode: 3 new tokens against a cache of 11 positions, so cache-shaped tensors are recognisable.
    config = tiny_config(2, num_heads=6, d_model=48)  # head_dim 8
    model = model_lib.build_model(config)
    cache = model.init_cache(1, 11)
    fn = lambda tokens, cache: model.decode(tokens, cache)
    shapes = _all_shapes(jax.make_jaxpr(fn)(jnp.zeros((1, 3), jnp.int32), cache).jaxpr)
    assert any(11 in s for s in shapes)
    assert not _has_repeated_kv(shapes, 11, 6, 8)


# head_dim 8 and 32: on either side of cpu.xla_options.YNN_KEPT_MAX_HEAD_DIM, where the decode
# step's compiler options change; with head_dim 32 the CPU tuning is on (cpu.enable()), as in
# the command lines, so the options and the custom-gradient projections are both covered.
@pytest.mark.parametrize("d_model", [32, 128])
@pytest.mark.parametrize("num_kv_heads", [1, 2, NUM_HEADS])
@pytest.mark.parametrize("implementation", ["auto", "reference"])
def test_prefill_then_steps_reproduce_full_forward(num_kv_heads, implementation, d_model,
                                                   monkeypatch):
    monkeypatch.setattr(cpu, "_enabled", d_model == 128)
    model = model_lib.build_model(tiny_config(num_kv_heads, d_model=d_model), seed=2)
    batch, seq = 3, 12
    tokens = _tokens(batch, seq, seed=3)
    full = np.asarray(model_lib.forward_fn(model, "reference")(tokens))  # [b, t, v]
    prompt_lengths = np.array([5, 8, 3])
    # Right-pad each prompt with junk past its length: the cache must never let it be seen.
    prompt = np.array(_tokens(batch, 8, seed=4))
    for b, n in enumerate(prompt_lengths):
        prompt[b, :n] = tokens[b, :n]
    step = model_lib.decode_fn(model, implementation)
    cache = model.init_cache(batch, seq)
    logits, cache = step(jnp.asarray(prompt), cache, jnp.asarray(prompt_lengths))
    for b, n in enumerate(prompt_lengths):
        np.testing.assert_allclose(logits[b, :n], full[b, :n], atol=2e-5, rtol=1e-5)
    # One token a step; each sequence continues from its own (ragged) length.
    lengths = prompt_lengths.copy()
    while lengths.max() < seq:
        nxt = np.array([tokens[b, min(n, seq - 1)] for b, n in enumerate(lengths)])
        logits, cache = step(jnp.asarray(nxt[:, None]), cache)
        for b, n in enumerate(lengths):
            if n < seq:
                np.testing.assert_allclose(logits[b, 0], full[b, n], atol=2e-5, rtol=1e-5)
        lengths = np.minimum(lengths + 1, seq)
        # Sequences that are done keep stepping on the last slot; clamp their cache length.
        cache = cache._replace(lengths=jnp.minimum(cache.lengths, seq - 1))


def test_generate_greedy_matches_argmax_of_full_forward():
    model = model_lib.build_model(tiny_config(2), seed=5)
    prompt = _tokens(2, 4, seed=6)
    new = np.asarray(model_lib.generate(model, prompt, jnp.array([4, 4]), 5))
    # Teacher forcing on prompt + generated tokens: each generated token is the argmax of the full
    # forward's logits at the position before it.
    full = np.asarray(model_lib.forward_fn(model)(jnp.concatenate([prompt, new], axis=1)))
    np.testing.assert_array_equal(new, np.argmax(full[:, 3:8], axis=-1))
    # Sampling is deterministic under a key and stays in the vocabulary.
    a = model_lib.generate(model, prompt, jnp.array([4, 2]), 6, temperature=1.0,
                           rng=jax.random.PRNGKey(0))
    b = model_lib.generate(model, prompt, jnp.array([4, 2]), 6, temperature=1.0,
                           rng=jax.random.PRNGKey(0))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 6) and int(a.min()) >= 0 and int(a.max()) < 61


def test_causality_later_tokens_never_change_earlier_logits():
    model = model_lib.forward_fn(model_lib.build_model(tiny_config(2), seed=7))
    tokens = np.array(_tokens(1, 10, seed=8))
    base = np.asarray(model(jnp.asarray(tokens)))
    changed = tokens.copy()
    changed[0, 6] = (changed[0, 6] + 1) % 61
    out = np.asarray(model(jnp.asarray(changed)))
    np.testing.assert_array_equal(out[:, :6], base[:, :6])
    assert np.abs(out[:, 6:] - base[:, 6:]).max() > 1e-4


def test_segment_ids_isolate_packed_documents():
    model = model_lib.forward_fn(model_lib.build_model(tiny_config(2), seed=9))
    doc_a, doc_b = _tokens(1, 4, seed=10), _tokens(1, 6, seed=11)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    segment_ids = jnp.array([[1] * 4 + [2] * 6])
    positions = jnp.array([list(range(4)) + list(range(6))])
    out = model(packed, segment_ids=segment_ids, positions=positions)
    np.testing.assert_allclose(out[:, :4], model(doc_a), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(out[:, 4:], model(doc_b), atol=2e-5, rtol=1e-5)
    # Without segment ids the second document does see the first.
    leaky = model(packed, positions=positions)
    assert np.abs(np.asarray(leaky[:, 4:]) - np.asarray(model(doc_b))).max() > 1e-4


@pytest.mark.parametrize("num_heads,num_kv_heads", [(6, 4), (4, 0), (4, -2), (4, 8)])
def test_bad_head_counts_raise_naming_both_numbers(num_heads, num_kv_heads):
    with pytest.raises(ValueError) as err:
        tiny_config(num_kv_heads, num_heads=num_heads, d_model=48)
    assert f"num_heads={num_heads}" in str(err.value)
    assert f"num_kv_heads={num_kv_heads}" in str(err.value)


def test_attention_rejects_mismatched_heads():
    q = jnp.zeros((1, 3, 6, 8))
    k = v = jnp.zeros((1, 3, 4, 8))
    with pytest.raises(ValueError, match="num_heads=6 is not divisible by num_kv_heads=4"):
        attention_lib.attention(q, k, v)


def test_config_round_trips_and_rejects_unknown_fields():
    config = tiny_config(2, rope_scaling={"rope_type": "linear", "factor": 2.0}, head_dim=16)
    assert model_lib.ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        model_lib.ModelConfig.from_dict({**config.to_dict(), "num_kv_head": 2})
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        tiny_config(2, rope_scaling={"rope_type": "yarn", "factor": 2.0})


def test_kv_cache_holds_only_kv_heads_and_bytes_per_token():
    config = tiny_config(2)
    cache = model_lib.build_model(config).init_cache(3, 10, jnp.bfloat16)
    assert len(cache.k) == 2 and cache.k[0].shape == (3, 2, 10, 8)
    assert cache.k[0].dtype == cache.v[1].dtype == jnp.bfloat16
    # 2 (K and V) x 2 layers x 2 kv heads x head_dim 8 x 2 bytes.
    assert model_lib.kv_cache_bytes_per_token(config, jnp.bfloat16) == 2 * 2 * 2 * 8 * 2


def test_dense_gradients_match_plain_matmul():
    """cpu.dense's custom gradient (x^T materialised) against autodiff of plain x @ w; and
    model.dense takes it exactly when the CPU tuning is on."""
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(3), 3)
    for d_in, d_out in ((24, 40), (40, 24)):  # x wider than grad, and the reverse
        x = jax.random.normal(kx, (3, 7, d_in), jnp.float32)
        w = jax.random.normal(kw, (d_in, d_out), jnp.float32)
        probe = jax.random.normal(kg, (3, 7, d_out), jnp.float32)
        ours = jax.grad(lambda x, w: jnp.sum(cpu_dense.dense(x, w) * probe), argnums=(0, 1))(x, w)
        plain = jax.grad(lambda x, w: jnp.sum((x @ w) * probe), argnums=(0, 1))(x, w)
        for a, b in zip(ours, plain):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # fp32: summation order only


def test_dense_is_plain_unless_the_cpu_tuning_is_on(monkeypatch):
    x, w = jnp.ones((2, 3)), jnp.ones((3, 4))

    def custom_calls(enabled):
        monkeypatch.setattr(cpu, "_enabled", enabled)
        # A fresh function each time: jax caches traces by function, not by the flag.
        jaxpr = jax.make_jaxpr(lambda x, w: model_lib.dense(x, w))(x, w)
        return sum(e.primitive.name.startswith("custom_vjp") for e in jaxpr.jaxpr.eqns)

    assert custom_calls(False) == 0
    assert custom_calls(True) == (1 if jax.default_backend() == "cpu" else 0)

"""The attention entry point: 'reference' (grouped einsum) vs 'xla' (jax.nn.dot_product_attention)
and 'einsum_vjp' (attention_vjp's hand-written backward)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_uptrain import attention as attention_lib
from gqa_uptrain.cpu import attention_vjp, cache_attention
from gqa_uptrain.attention import Call, attention, make_mask, select

# Per-dtype tolerances (max abs error on outputs of O(1) magnitude): fp32 both paths accumulate in
# fp32; bf16 inputs round q/k/v/probabilities to 8 mantissa bits, so ~2^-8 relative per element.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}

# Gradient tolerances (max abs error; gradients here are O(1)): fp32 as the outputs' plus the
# backward's extra reductions over seq; bf16 as the outputs', the cast back rounding each gradient.
GRAD_TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def _qkv(num_heads, num_kv_heads, seq_q=9, seq_kv=9, dtype=jnp.float32, seed=0, head_dim=16):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (2, seq_q, num_heads, head_dim), dtype)
    k = jax.random.normal(kk, (2, seq_kv, num_kv_heads, head_dim), dtype)
    v = jax.random.normal(kv, (2, seq_kv, num_kv_heads, head_dim), dtype)
    return q, k, v


def _naive(q, k, v, mask):
    """Loop over query heads, each with its KV head n // q_per_kv: the textbook definition."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    out = np.zeros_like(q)
    for n in range(q.shape[2]):
        logits = np.einsum("btd,bsd->bts", q[:, :, n], k[:, :, n // group]) / np.sqrt(q.shape[-1])
        if mask is not None:
            logits = np.where(np.asarray(mask), logits, -1e30)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, :, n] = np.einsum("bts,bsd->btd", p, v[:, :, n // group])
    return out


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("causal", [True, False])
def test_reference_matches_per_head_loop(num_kv_heads, causal):
    q, k, v = _qkv(4, num_kv_heads)
    mask = make_mask(9, 9, causal=causal)
    got = attention(q, k, v, causal=causal, implementation="reference")
    np.testing.assert_allclose(got, _naive(q, k, v, mask), atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_reference_and_xla_agree(dtype, num_kv_heads):
    q, k, v = _qkv(4, num_kv_heads, dtype=dtype, seed=1)
    segment_ids = jnp.array([[0] * 4 + [1] * 5, [0] * 9])
    cases = [
        dict(causal=True),
        dict(causal=False),
        dict(causal=True, segment_ids=segment_ids),
        dict(causal=False, kv_lengths=jnp.array([3, 9])),
    ]
    for kw in cases:
        ref = attention(q, k, v, implementation="reference", **kw)
        for implementation in ("xla", "einsum_vjp"):
            got = attention(q, k, v, implementation=implementation, **kw)
            assert got.dtype == ref.dtype == dtype
            np.testing.assert_allclose(np.asarray(ref, np.float32), np.asarray(got, np.float32),
                                       atol=TOLERANCE[dtype], err_msg=f"{implementation} {kw}")


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_einsum_vjp_causal_query_blocks_match_the_reference(num_kv_heads):
    # 200 positions: three causal query blocks of 67/66/67 (attention_vjp._query_blocks), each over
    # its key prefix; packed segments cross the block boundaries.
    seq = 200
    assert len(attention_vjp._query_blocks(seq, causal=True)) == 3
    q, k, v = _qkv(4, num_kv_heads, seq_q=seq, seq_kv=seq, seed=4, head_dim=8)
    weights = jax.random.normal(jax.random.PRNGKey(5), q.shape, jnp.float32)
    segment_ids = jnp.array([[0] * 60 + [1] * 90 + [2] * 50, [0] * 200])

    def out_and_grads(implementation):
        fn = lambda q, k, v: attention(q, k, v, causal=True, segment_ids=segment_ids,
                                       implementation=implementation)
        grads = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * weights), argnums=(0, 1, 2))
        return jax.jit(fn)(q, k, v), jax.jit(grads)(q, k, v)

    (got_out, got), (want_out, want) = out_and_grads("einsum_vjp"), out_and_grads("reference")
    np.testing.assert_allclose(got_out, want_out, atol=TOLERANCE[jnp.float32])
    for name, g, w in zip("qkv", got, want):
        np.testing.assert_allclose(g, w, atol=GRAD_TOLERANCE[jnp.float32], err_msg=f"d{name}")


def test_causal_query_blocks_tile_the_sequence():
    for seq in (1, 63, 64, 127, 128, 200, 256, 1000, 4096):
        blocks = attention_vjp._query_blocks(seq, causal=True)
        assert blocks[0][0] == 0 and blocks[-1][1] == seq
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
        assert len(blocks) <= attention_vjp._MAX_CAUSAL_BLOCKS
        assert seq < 2 * attention_vjp._MIN_CAUSAL_BLOCK or min(e - s for s, e in blocks) >= 64
    assert attention_vjp._query_blocks(1000, causal=False) == [(0, 1000)]


@pytest.mark.parametrize("dtype, num_kv_heads", [(jnp.float32, 1), (jnp.float32, 2),
                                                 (jnp.float32, 4), (jnp.bfloat16, 2)])
def test_einsum_vjp_gradients_match_autodiff_of_the_reference(dtype, num_kv_heads):
    q, k, v = _qkv(4, num_kv_heads, dtype=dtype, seed=2)
    weights = jax.random.normal(jax.random.PRNGKey(3), q.shape, jnp.float32)
    cases = [
        dict(causal=True),
        dict(causal=True, segment_ids=jnp.array([[0] * 4 + [1] * 5, [0] * 3 + [1] * 6])),
        # Batch row 1 sees no key at all: its queries' outputs are the mean of V whatever q and k
        # are, so q and k get no gradient from it (the reference's select; the custom backward
        # must zero it explicitly).
        dict(causal=False, kv_lengths=jnp.array([5, 0])),
    ]
    for kw in cases:
        def grads(implementation):
            loss = lambda q, k, v: jnp.sum(
                attention(q, k, v, implementation=implementation, **kw).astype(jnp.float32)
                * weights)
            return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

        got = grads("einsum_vjp")
        for name, g, want in zip("qkv", got, grads("reference")):
            assert g.dtype == want.dtype == dtype
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(want, np.float32),
                                       atol=GRAD_TOLERANCE[dtype], err_msg=f"d{name} {kw}")
        if "kv_lengths" in kw:  # the fully masked batch row is really exercised
            dq = np.asarray(got[0], np.float32)
            assert np.abs(dq[1]).max() == 0 and np.abs(dq[0]).max() > 0.1


def test_q_offset_and_kv_lengths_place_queries_in_the_cache():
    # 2 new queries at cache positions [4, 6] and [1, 3]; keys beyond kv_lengths are junk.
    q, k, v = _qkv(4, 2, seq_q=2, seq_kv=10, seed=2)
    q_offset, kv_lengths = jnp.array([5, 2]), jnp.array([7, 4])
    got = attention(q, k, v, q_offset=q_offset, kv_lengths=kv_lengths, implementation="reference")
    for b in range(2):
        n = int(kv_lengths[b])
        want = _naive(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n],
                      make_mask(2, n, causal=True, q_offset=q_offset[b:b + 1]))
        np.testing.assert_allclose(got[b:b + 1], want, atol=1e-5)
    # The bksd layout (the decode cache's) gives the same answer.
    got_bksd = attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), q_offset=q_offset,
                         kv_lengths=kv_lengths, implementation="auto", mode="decode")
    np.testing.assert_allclose(got_bksd, got, atol=1e-6)


def _call(mode="train", platform="cpu", kv_layout=None, **kw):
    layout = kv_layout or ("bskd" if mode == "train" else "bksd")
    return Call(mode=mode, platform=platform, kv_layout=layout, dtype="float32", head_dim=64,
                seq_q=kw.pop("seq_q", 16), **kw)


def test_bad_implementation_and_layout_are_named():
    with pytest.raises(ValueError, match="implementation='cudnn2'"):
        select("cudnn2", _call())
    with pytest.raises(ValueError, match="implementation='xla' needs kv_layout='bskd'"):
        select("xla", _call("decode"))
    with pytest.raises(ValueError, match="implementation='einsum_vjp' needs kv_layout='bskd'"):
        select("einsum_vjp", _call("decode"))
    with pytest.raises(ValueError, match="kv_layout='sbkd'"):
        select("reference", _call(kv_layout="sbkd"))
    with pytest.raises(ValueError, match="mode='prefill'"):
        select("reference", _call("prefill", kv_layout="bskd"))
    with pytest.raises(ValueError, match="implementation='pallas' takes segment_ids only in "
                                         "mode='train'"):
        select("pallas", _call("decode", segment_ids=True))
    q, k, v = _qkv(4, 2)
    with pytest.raises(ValueError, match="disagree on batch or head_dim"):
        attention(q, k[..., :8], v[..., :8])


def test_bf16_cache_layout_runs_and_matches_fp32():
    # Regression: XLA's CPU dot has no bf16 x bf16 -> f32 kernel for the bksd einsum.
    q, k, v = _qkv(4, 2, seq_q=1, seq_kv=6, seed=3)
    kw = dict(q_offset=jnp.array([5, 3]), kv_lengths=jnp.array([6, 4]), mode="decode",
              implementation="auto")
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    got = attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), **kw)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), attention(q, k, v, **kw),
                               atol=TOLERANCE[jnp.bfloat16])


@pytest.mark.parametrize("seq_kv", [11, cache_attention.SEQ_MINOR_MAX_CACHE + 5])
@pytest.mark.parametrize("head_dim", [16, 32])
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4, 8])
@pytest.mark.parametrize("seq_q", [1, 3])
def test_cache_implementation_matches_reference(num_kv_heads, seq_q, head_dim, seq_kv):
    # 'cache' (auto's choice for the decode cache on CPU) reorders the einsums by q_per_kv, and for
    # one token by head_dim (<= 16 or not) and cache length (short or not); cover q_per_kv 8, 4,
    # 2, 1 on every side.
    q, k, v = _qkv(8, num_kv_heads, seq_q=seq_q, seq_kv=seq_kv, seed=4, head_dim=head_dim)
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    kw = dict(q_offset=jnp.array([7, 2]), kv_lengths=jnp.array([7 + seq_q, 2 + seq_q]),
              mode="decode")
    np.testing.assert_allclose(attention(q, k, v, implementation="cache", **kw),
                               attention(q, k, v, implementation="reference", **kw), atol=1e-5)
    with pytest.raises(ValueError, match="implementation='cache' needs kv_layout='bksd'"):
        attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), implementation="cache")


# ----------------------------------------------------------------------------- selection


def test_auto_takes_the_first_supported_candidate_of_the_platform_and_mode():
    # The table itself, read as the README quotes it, for every platform and mode.
    assert select("auto", _call("train", "cpu")) == "einsum_vjp"
    assert select("auto", _call("decode", "cpu")) == "cache"
    assert select("auto", _call("train", "gpu")) == "pallas"  # float32: not cuDNN's
    assert select("auto", _call("decode", "gpu")) == "pallas"
    assert select("auto", _call("train", "tpu")) == "pallas"
    assert select("auto", _call("decode", "tpu")) == "pallas"
    # A call the first candidate does not support falls through to the next: the CPU training
    # form needs bskd, so training-mode attention over a bksd cache gets the reference.
    assert select("auto", _call("train", "cpu", kv_layout="bksd")) == "reference"
    # A platform with no row (a new backend) gets the reference, never an untested kernel.
    assert select("auto", _call("train", "metal")) == "reference"


# Every axis select() looks at: platform x mode x KV layout x dtype x head_dim x mask kind.
_PLATFORMS = ("cpu", "gpu", "tpu", "metal")
_DTYPES = ("float32", "bfloat16", "float16")
_HEAD_DIMS = (64, 72, 100, 128, 256, 320)  # 72: a multiple of 8, not of 16; 100: of neither
_MASKS = {"causal": {}, "segments": dict(segment_ids=True), "cache": dict(cache_positions=True)}


def _expected(platform, mode, layout, dtype, head_dim, mask):
    """The dispatch rules written out case by case (README "Attention kernels"), independently
    of AUTO's lists and the candidates' supports()."""
    kernel_ok = mode == "decode" or (layout == "bskd" and mask != "cache")
    if mode == "decode" and mask == "segments":  # the decode kernel masks by position only
        kernel_ok = False
    if platform == "cpu":
        if mode == "train":
            return "einsum_vjp" if layout == "bskd" else "reference"
        return "cache" if layout == "bksd" else "reference"
    if platform == "gpu":
        cudnn = (mode == "train" and layout == "bskd" and mask == "causal"
                 and dtype in ("bfloat16", "float16") and head_dim <= 256 and head_dim % 8 == 0)
        if cudnn:
            return "cudnn"
        if kernel_ok:
            return "pallas"
        return "xla" if mode == "train" and layout == "bskd" else "reference"
    if platform == "tpu":
        if kernel_ok:
            return "pallas"
        return "xla" if mode == "train" and layout == "bskd" else "reference"
    return "reference"


def test_selection_for_every_platform_mode_dtype_head_dim_and_mask():
    wrong = []
    for platform in _PLATFORMS:
        for mode in attention_lib.MODES:
            for layout in attention_lib.KV_LAYOUTS:
                for dtype in _DTYPES:
                    for head_dim in _HEAD_DIMS:
                        for mask, flags in _MASKS.items():
                            call = Call(mode=mode, platform=platform, kv_layout=layout,
                                        dtype=dtype, head_dim=head_dim, seq_q=256, **flags)
                            want = _expected(platform, mode, layout, dtype, head_dim, mask)
                            got = select("auto", call)
                            if got != want:
                                wrong.append((platform, mode, layout, dtype, head_dim, mask,
                                              got, want))
                            # Pure: the same call gives the same answer, and a mesh (which
                            # only the kernels' wrap reads) changes nothing.
                            meshed = Call(**{**call.__dict__, "mesh": "a mesh"})
                            if select("auto", meshed) != got:
                                wrong.append((platform, mode, layout, dtype, head_dim, mask,
                                              "mesh changed the choice"))
    assert wrong == [], wrong[:10]
    # Both paths of GPU training occur in the grid: cuDNN and the Pallas flash kernel.
    bf16 = dict(mode="train", platform="gpu", kv_layout="bskd", dtype="bfloat16", head_dim=128,
                seq_q=4096)
    assert select("auto", Call(**bf16)) == "cudnn"
    assert select("auto", Call(**bf16, segment_ids=True)) == "pallas"  # packed batches


def test_cudnn_says_why_it_does_not_apply():
    gpu = dict(mode="train", platform="gpu", kv_layout="bskd", dtype="bfloat16", head_dim=128,
               seq_q=64)
    for change, why in [(dict(platform="cpu"), "runs only on a GPU"),
                        (dict(dtype="float32"), "needs bfloat16 or float16 inputs; got float32"),
                        (dict(head_dim=320), "needs head_dim <= 256 and a multiple of 8; got 320"),
                        (dict(segment_ids=True), "takes no segment_ids"),
                        (dict(mode="decode", kv_layout="bksd"), "needs mode='train'")]:
        with pytest.raises(ValueError, match=f"implementation='cudnn' {why}"):
            select("cudnn", Call(**{**gpu, **change}))
    assert select("cudnn", Call(**gpu)) == "cudnn"


def test_a_platform_suffix_selects_as_on_that_platform():
    assert attention_lib.parse_implementation("auto") == ("auto", None)
    assert attention_lib.parse_implementation("auto@cuda") == ("auto", "gpu")
    assert attention_lib.parse_implementation("pallas@tpu") == ("pallas", "tpu")
    with pytest.raises(ValueError, match="platform 'metal' is not one of"):
        attention_lib.parse_implementation("auto@metal")
    with pytest.raises(ValueError, match="'splash' is not one of"):
        attention_lib.parse_implementation("splash@tpu")
    # 'reference' runs anywhere, so the suffixed name computes on this CPU.
    q, k, v = _qkv(4, 2)
    np.testing.assert_array_equal(attention(q, k, v, implementation="reference@tpu"),
                                  attention(q, k, v, implementation="reference"))
    # On CPU, 'auto@gpu' traces the GPU's choice (fp32: the flash kernel, compiled for Triton,
    # not interpreted); plain 'auto' traces the CPU's (no kernel).
    def jaxpr_text(implementation):  # printed with the nested jaxprs (the custom_vjp's)
        fn = lambda q, k, v: attention(q, k, v, implementation=implementation)
        return str(jax.make_jaxpr(fn)(q, k, v))

    assert "pallas_call" in jaxpr_text("auto@gpu") and "interpret=False" in jaxpr_text("auto@gpu")
    assert "pallas_call" not in jaxpr_text("auto")


def test_every_auto_row_ends_with_the_reference_and_names_known_candidates():
    for (platform, mode), names in attention_lib.AUTO.items():
        assert mode in attention_lib.MODES and names[-1] == "reference", (platform, mode)
        assert set(names) <= set(attention_lib.CANDIDATES)
    assert attention_lib.IMPLEMENTATIONS == ("auto",) + tuple(attention_lib.CANDIDATES)


def test_an_explicit_implementation_is_kept_when_it_applies():
    for name in ("reference", "xla", "einsum_vjp"):
        assert select(name, _call("train", "gpu")) == name
    assert select("cache", _call("decode", "tpu")) == "cache"
    assert select("pallas", _call("decode", "cpu")) == "pallas"

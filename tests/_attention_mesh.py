"""Run by tests/test_attention_mesh.py in a subprocess with 8 simulated CPU devices: exports the
trainer's sharded train step and a sharded decode step for 'tpu' and 'cuda' (jax.export from this
CPU, 'auto@<platform>' so attention selects and lowers as on that platform), and prints one JSON
object: for each export, every kernel custom call (tests/_mlir_kernels.py) with whether it sits in
the manual (shard_map) computation and its operand shapes, or the error the export raised.

Mesh data=2 x fsdp=2 x tensor=2; batch 12 (3 per data x fsdp shard: 12 and 3 occur in no other
dimension), 4 query heads (2 per tensor shard), head_dim 32, 128 positions. num_kv_heads 2 splits
over tensor; num_kv_heads 1 does not (each shard gets the KV head its query heads read).
Controls: the Triton flash kernel called on the batch-sharded input without shard_map (exports,
but on the global shape), and splash likewise (refused by the TPU lowering).

    python tests/_attention_mesh.py [CASE ...]     # default: every case
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from gqa_uptrain import attention as attention_lib  # noqa: E402
from gqa_uptrain import model as model_lib  # noqa: E402
from gqa_uptrain import optim, sharding, train_step  # noqa: E402
from gqa_uptrain.kernels import flash_attention as fa  # noqa: E402
from gqa_uptrain.kernels import partition  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _mlir_kernels import kernel_calls  # noqa: E402

BATCH, SEQ, NUM_HEADS, HEAD_DIM = 12, 128, 4, 32
MESH = dict(data=2, fsdp=2, tensor=2)
_TRITON_CALL = "__gpu$xla.gpu.triton"


def _config(num_kv_heads: int) -> model_lib.ModelConfig:
    return model_lib.ModelConfig(vocab_size=64, d_model=NUM_HEADS * HEAD_DIM, num_layers=1,
                                 num_heads=NUM_HEADS, num_kv_heads=num_kv_heads, mlp_dim=96,
                                 dtype="bfloat16")


def _export(fn, platform, *args):
    exported = jax.export.export(
        fn, platforms=[platform],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(_TRITON_CALL)])(*args)
    return exported.mlir_module()


def train_export(mesh, platform, num_kv_heads):
    """The trainer's step (train_step.build: scanned layers, remat, optimizer) for `platform`."""
    optimizer = ml_collections.ConfigDict(dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                                               clip_norm=1.0))
    schedule = optim.make_schedule("cosine", peak_lr=1e-3, warmup_steps=1, total_steps=10,
                                   decay_fraction=0.0, min_lr_ratio=0.1)
    setup = train_step.build(_config(num_kv_heads), mesh, schedule, optimizer,
                             implementation=f"auto@{platform}", remat="full", scan_layers=True,
                             loss_chunk_size=0)
    with jax.set_mesh(mesh):
        return _export(setup.step, platform, *setup.abstract_args(1, BATCH, SEQ))


def decode_export(mesh, platform, num_kv_heads):
    """One decode step of the model (a token per sequence against a batch-sharded cache)."""
    model = model_lib.build_model(_config(num_kv_heads), seed=0)
    graphdef, state = nnx.split(model)
    implementation = f"auto@{platform}"

    def step(state, tokens, cache, num_valid):
        m = nnx.merge(graphdef, state)
        return m.decode(tokens, cache, num_valid=num_valid, implementation=implementation)

    repl, by_batch = NamedSharding(mesh, P()), NamedSharding(mesh, P(sharding.BATCH_AXES))
    sds = lambda shape, dtype, sh: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
    state = jax.tree.map(lambda x: sds(x.shape, x.dtype, repl), state)
    layer = sds((BATCH, num_kv_heads, SEQ, HEAD_DIM), jnp.bfloat16, by_batch)
    cache = model_lib.KVCache((layer,), (layer,), sds((BATCH,), jnp.int32, by_batch))
    tokens = sds((BATCH, 1), jnp.int32, by_batch)
    with jax.set_mesh(mesh):
        return _export(jax.jit(step), platform, state, tokens, cache,
                       sds((BATCH,), jnp.int32, by_batch))


def unwrapped_export(mesh, platform, num_kv_heads):
    """Control: the flash kernel itself on batch-sharded inputs, no shard_map."""
    spec = NamedSharding(mesh, P(sharding.BATCH_AXES))
    q = jax.ShapeDtypeStruct((BATCH, SEQ, NUM_HEADS, HEAD_DIM), jnp.bfloat16, sharding=spec)
    kv = jax.ShapeDtypeStruct((BATCH, SEQ, num_kv_heads, HEAD_DIM), jnp.bfloat16, sharding=spec)
    backend = "splash" if platform == "tpu" else "triton"
    fn = jax.jit(lambda q, k, v: fa.flash_attention(q, k, v, causal=True, backend=backend,
                                                    interpret=False))
    with jax.set_mesh(mesh):
        return _export(fn, platform, q, kv, kv)


# ----------------------------------------------------------------------------- numerics
# The wrap's arithmetic (specs, the KV-head gather, shard_map's transpose with check_vma=False)
# against the same attention computed without a mesh: values and gradients, fp32.


def _inputs(batch, num_heads, num_kv_heads, seq, head_dim, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (batch, seq, num_heads, head_dim), jnp.float32)
    k = jax.random.normal(keys[1], (batch, seq, num_kv_heads, head_dim), jnp.float32)
    v = jax.random.normal(keys[2], (batch, seq, num_kv_heads, head_dim), jnp.float32)
    weights = jax.random.normal(keys[3], q.shape, jnp.float32)
    pos = jnp.arange(seq)[None, :]
    segment_ids = (pos >= (jnp.arange(batch)[:, None] % 3 + 1) * seq // 4).astype(jnp.int32)
    return q, k, v, weights, segment_ids


def _max_errors(fn, want_fn, q, k, v, weights, mesh):
    """Max |difference| of fn under jax.set_mesh(mesh) vs want_fn without it: out, dq, dk, dv."""
    def value_and_grads(f):
        loss = lambda q, k, v: jnp.sum(f(q, k, v) * weights)
        return jax.jit(lambda q, k, v: (f(q, k, v), *jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))

    with jax.set_mesh(mesh):
        got = value_and_grads(fn)(q, k, v)
    want = value_and_grads(want_fn)(q, k, v)
    return {name: float(jnp.max(jnp.abs(g - w))) for name, g, w in
            zip(("out", "dq", "dk", "dv"), got, want)}


def wrap_numerics(mesh, batch, num_heads, num_kv_heads):
    """partition.shard_call around the reference attention (an XLA op: cheap to compile)."""
    q, k, v, weights, segment_ids = _inputs(batch, num_heads, num_kv_heads, 16, 8)

    def reference(q, k, v, segment_ids=None, **_):
        mask = attention_lib.make_mask(q.shape[1], k.shape[1], causal=True,
                                       segment_ids=segment_ids)
        return attention_lib.reference_attention(q, k, v, mask)

    sharded = lambda q, k, v: partition.shard_call(
        reference, partition.context_mesh(), kv_layout="bskd", q=q, k=k, v=v,
        segment_ids=segment_ids)
    return _max_errors(sharded, lambda q, k, v: reference(q, k, v, segment_ids), q, k, v,
                       weights, mesh)


def pallas_numerics(mesh, mode, num_kv_heads):
    """attention(implementation='pallas') (interpret mode) under the mesh vs 'reference' without
    one: mode 'train' with segment ids (values and gradients), mode 'decode' over a bksd cache
    with ragged lengths (values; the decode kernel has no backward)."""
    batch, num_heads = 4, 4
    if mode == "train":
        q, k, v, weights, segment_ids = _inputs(batch, num_heads, num_kv_heads, 32, 16, seed=1)
        fn = lambda impl: lambda q, k, v: attention_lib.attention(
            q, k, v, segment_ids=segment_ids, implementation=impl)
        return _max_errors(fn("pallas"), fn("reference"), q, k, v, weights, mesh)
    q, k, v, _, _ = _inputs(batch, num_heads, num_kv_heads, 32, 16, seed=2)
    q = q[:, :1]
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # the cache layout [b, K, len, d]
    lengths = jnp.array([1, 9, 20, 32], jnp.int32)
    fn = lambda impl: jax.jit(lambda q, k, v: attention_lib.attention(
        q, k, v, mode="decode", q_offset=lengths - 1, kv_lengths=lengths, implementation=impl))
    with jax.set_mesh(mesh):
        got = fn("pallas")(q, k, v)
    return {"out": float(jnp.max(jnp.abs(got - fn("reference")(q, k, v))))}


CASES = {f"{kind}_{platform}_kv{kv}": (fn, platform, kv)
         for kind, fn in (("train", train_export), ("decode", decode_export))
         for platform in ("tpu", "cuda") for kv in (2, 1)}
CASES.update({f"unwrapped_{platform}_kv2": (unwrapped_export, platform, 2)
              for platform in ("tpu", "cuda")})
# (batch, num_heads, num_kv_heads) on the 2 x 2 x 2 mesh: KV heads split over tensor; not split
# with a shard's heads in one group; groups straddling shards; heads not divisible (replicated);
# a batch that does not divide over data x fsdp (replicated).
WRAP_CASES = {"split": (4, 4, 2), "one_kv_head": (4, 4, 1), "straddling": (4, 6, 3),
              "heads_replicated": (4, 3, 1), "batch_replicated": (6, 4, 2)}
NUMERICS = {f"wrap_{name}": (wrap_numerics, *shape) for name, shape in WRAP_CASES.items()}
# The kernels themselves (interpret mode, slow to compile) with the KV-head gather: num_kv_heads 1.
# KV heads that split over tensor are the wrap_split case and the exports' kv2 cases.
NUMERICS.update({f"pallas_{mode}_kv1": (pallas_numerics, mode, 1) for mode in ("train", "decode")})


def main(argv):
    names = argv or list(CASES) + list(NUMERICS)
    if len(jax.devices()) != 8:
        raise SystemExit(f"needs 8 simulated devices; jax has {len(jax.devices())}")
    mesh = sharding.make_mesh(MESH["data"], MESH["fsdp"], MESH["tensor"])
    report = {}
    for name in names:
        if name in NUMERICS:
            fn, *args = NUMERICS[name]
            report[name] = {"max_errors": fn(mesh, *args)}
            continue
        fn, platform, kv = CASES[name]
        try:
            text = fn(mesh, platform, kv)
        except Exception as e:  # noqa: BLE001 (reported: the controls expect one)
            report[name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
            continue
        report[name] = {"calls": [dict(target=c.target, function=c.function,
                                       in_manual=c.in_manual,
                                       operand_shapes=c.operand_shapes,
                                       result_shapes=c.result_shapes)
                                  for c in kernel_calls(text)]}
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])

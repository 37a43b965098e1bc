"""The attention kernels over a device mesh (kernels/partition.py), on 8 simulated CPU devices.

The sharded train step (train_step.build's, as the trainer runs it) and a sharded decode step are
exported for 'tpu' (splash, the Mosaic decode kernel) and 'cuda' (the Triton flash and decode
kernels) from this CPU; every kernel custom call in the exported module must sit inside the
manual (shard_map) computation and see per-shard operands. A control exports the Triton kernel
without the wrap: it lowers without complaint, so only the per-shard check tells the two apart.
Lowering only: Mosaic/Triton compilation, VMEM/shared memory and speed need the device.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

import _helpers_train as h
from gqa_uptrain.kernels import partition

# tests/_attention_mesh.py's shapes: batch 12 on a data 2 x fsdp 2 x tensor 2 mesh -> 3 per shard;
# 4 query heads -> 2 per tensor shard; num_kv_heads 2 -> 1 per shard, 1 -> the one it needs.
GLOBAL_BATCH, LOCAL_BATCH, LOCAL_HEADS, SEQ, HEAD_DIM = 12, 3, 2, 128, 32
EXPORTS = [f"{kind}_{platform}_kv{kv}" for kind in ("train", "decode")
           for platform in ("tpu", "cuda") for kv in (2, 1)]
NUMERICS = ["wrap_split", "wrap_one_kv_head", "wrap_straddling", "wrap_heads_replicated",
            "wrap_batch_replicated", "pallas_train_kv1", "pallas_decode_kv1"]
# fp32 throughout: the sharded and unsharded runs differ only in XLA's reduction order.
NUMERICS_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def report():
    out = h.run([sys.executable, os.path.join(h.REPO, "tests", "_attention_mesh.py")],
                timeout=600, devices=8)
    return json.loads(out.stdout.strip().splitlines()[-1])


def per_shard_violations(calls, kind: str) -> list[str]:
    """What is wrong with these kernel calls for a sharded step: a call outside the manual
    computation, the global batch in any operand or result, a rank >= 4 array not led by the
    per-shard batch, or no operand with the per-shard query (train) / cache (decode) shape."""
    problems = []
    if not calls:
        return ["no kernel custom call in the module"]
    for c in calls:
        arrays = [tuple(s) for s in c["operand_shapes"] + c["result_shapes"]]
        if not c["in_manual"]:
            problems.append(f"{c['target']} in {c['function']} is outside the manual computation")
        if any(GLOBAL_BATCH in s for s in arrays):
            problems.append(f"{c['target']} in {c['function']} sees the global batch: {arrays}")
        if any(len(s) >= 4 and s[0] != LOCAL_BATCH for s in arrays):
            problems.append(f"{c['target']} in {c['function']} has a rank-4 array not led by the "
                            f"per-shard batch {LOCAL_BATCH}: {arrays}")
    if kind == "train":  # q in the Triton layout [b, t, N, d] or splash's [b, N, t, d]
        wanted = {(LOCAL_BATCH, SEQ, LOCAL_HEADS, HEAD_DIM), (LOCAL_BATCH, LOCAL_HEADS, SEQ, HEAD_DIM)}
    else:  # one KV head per tensor shard of the [b, K, len, d] cache
        wanted = {(LOCAL_BATCH, 1, SEQ, HEAD_DIM)}
    operands = {tuple(s) for c in calls for s in c["operand_shapes"]}
    if not wanted & operands:
        problems.append(f"no operand has the per-shard shape {sorted(wanted)}: {sorted(operands)}")
    return problems


@pytest.mark.parametrize("case", EXPORTS)
def test_every_kernel_call_of_the_sharded_step_runs_per_shard(report, case):
    result = report[case]
    assert "error" not in result, result.get("error")
    calls = result["calls"]
    platform = case.split("_")[1]
    target = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
    assert {c["target"] for c in calls} == {target}
    if case.startswith("train"):  # forward (recomputed under remat) + the backward kernels
        assert len(calls) >= 3, calls
    assert per_shard_violations(calls, case.split("_")[0]) == []


def test_the_check_fails_for_a_kernel_called_without_the_wrap(report):
    # Triton: the export succeeds; the kernel would run on the global [12, 128, 4, 32] everywhere.
    problems = per_shard_violations(report["unwrapped_cuda_kv2"]["calls"], "train")
    assert any("outside the manual computation" in p for p in problems), problems
    assert any("global batch" in p for p in problems), problems
    assert any("per-shard shape" in p for p in problems), problems
    # Mosaic refuses outright: what 'auto' on a TPU hit before the wrap.
    assert "cannot be automatically partitioned" in report["unwrapped_tpu_kv2"]["error"]


@pytest.mark.parametrize("case", NUMERICS)
def test_sharded_attention_matches_the_unsharded_values_and_gradients(report, case):
    errors = report[case]["max_errors"]
    assert set(errors) == ({"out"} if "decode" in case else {"out", "dq", "dk", "dv"})
    assert max(errors.values()) <= NUMERICS_TOLERANCE, errors


def test_kv_heads_per_shard():
    # KV heads split over tensor, or query heads not divisible (both replicated): no gather.
    assert partition.kv_heads_per_shard(8, 4, 2) is None
    assert partition.kv_heads_per_shard(6, 3, 4) is None
    # A shard's query heads inside one group: that group's KV head, shard by shard.
    assert partition.kv_heads_per_shard(8, 2, 4).tolist() == [0, 0, 1, 1]
    assert partition.kv_heads_per_shard(8, 1, 8).tolist() == [0] * 8
    assert partition.kv_heads_per_shard(32, 2, 8).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # Groups straddling shards (6 heads of a shard over groups of 4): one KV head per query head.
    assert partition.kv_heads_per_shard(24, 6, 4).tolist() == [n // 4 for n in range(24)]

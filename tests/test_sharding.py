"""Partition rules, 8 simulated CPU devices (mesh 2x2x2) against one device, and two processes
joined by jax.distributed on localhost."""

from __future__ import annotations


import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

import _helpers_train as h
from gqa_uptrain import sharding, train
from gqa_uptrain.model import ModelConfig, abstract_params

# num_kv_heads=1 < tensor=2: the K/V projections must be replicated over `tensor`.
OVERRIDES = {"num_kv_heads": 1, "num_steps": 3, "checkpoint_every": 0, "eval_every": 0,
             "final_eval_batches": 1, "log_every": 1}


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    yield from h.compilation_cache(tmp_path_factory)


def _mesh(data, fsdp, tensor):
    return AbstractMesh((data, fsdp, tensor), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def test_partition_rules():
    config = ModelConfig(vocab_size=257, d_model=64, num_layers=1, num_heads=8, num_kv_heads=2,
                         mlp_dim=128, qkv_bias=True, o_bias=True)
    shapes = abstract_params(config)
    spec = {n: sharding.partition_spec(n, tuple(x.shape), _mesh(1, 2, 2)) for n, x in shapes.items()}
    assert spec["embed"] == P(None, "fsdp")  # vocab 257 is not divisible by tensor=2
    assert spec["lm_head"] == P("fsdp", None)
    assert spec["layers.0.attn.q_proj"] == P("fsdp", "tensor", None)
    assert spec["layers.0.attn.k_proj"] == P("fsdp", "tensor", None)
    assert spec["layers.0.attn.o_proj"] == P("tensor", None, "fsdp")
    assert spec["layers.0.attn.k_bias"] == P("tensor", None)
    assert spec["layers.0.mlp.gate_proj"] == P("fsdp", "tensor")
    assert spec["layers.0.mlp.down_proj"] == P("tensor", "fsdp")
    assert spec["layers.0.attn_norm.scale"] == P() and spec["layers.0.attn.o_bias"] == P()
    # 2 KV heads over tensor=4: K/V replicated over tensor, queries still split.
    wide = _mesh(1, 1, 4)
    assert sharding.partition_spec("layers.0.attn.k_proj", (64, 2, 8), wide) == P("fsdp", None, None)
    assert sharding.partition_spec("layers.0.attn.v_bias", (2, 8), wide) == P(None, None)
    assert sharding.partition_spec("layers.0.attn.q_proj", (64, 8, 8), wide) == P(
        "fsdp", "tensor", None)


def test_mesh_shape():
    assert sharding.mesh_shape(-1, 1, 1, 8) == (8, 1, 1)
    assert sharding.mesh_shape(2, -1, 2, 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="needs 4 devices; there are 8"):
        sharding.mesh_shape(2, 2, 1, 8)
    with pytest.raises(ValueError, match="not divisible by 3"):
        sharding.mesh_shape(3, -1, 1, 8)
    with pytest.raises(ValueError, match="at most one may be -1"):
        sharding.mesh_shape(-1, -1, 1, 8)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("one_device"))
    train.train_and_evaluate(h.config(**OVERRIDES), workdir)
    return workdir


def _assert_same_run(workdir: str, reference: str):
    got, want = h.deterministic(h.metrics(workdir)), h.deterministic(h.metrics(reference))
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in w:
            np.testing.assert_allclose(g[key], w[key], rtol=2e-5, err_msg=key)
    params, ref = h.final_params(workdir), h.final_params(reference)
    for name in ref:
        np.testing.assert_allclose(params[name], ref[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_eight_devices_mesh_2x2x2_match_one_device(one_device, tmp_path):
    workdir = str(tmp_path)
    flags = h.cli_flags(**OVERRIDES, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    out = h.run(h.train_cmd(workdir, flags), devices=8)
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in out.stdout
    _assert_same_run(workdir, one_device)


def test_two_processes_jax_distributed_match_one_device(one_device, tmp_path):
    workdir = str(tmp_path)
    port = h.free_port()
    outputs = h.run_together([
        h.train_cmd(workdir, h.cli_flags(**OVERRIDES),
                    [f"--coordinator_address=localhost:{port}", "--num_processes=2",
                     f"--process_id={i}", "--distributed_timeout=60"]) for i in range(2)],
        timeout=240)
    assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1}" in outputs[0]
    _assert_same_run(workdir, one_device)

"""Sharded initialisation (gqa_uptrain/sharded_init.py): HF folders and project checkpoints placed
straight into the partition rules' shardings, K/V pooled on device, against the host path."""

from __future__ import annotations

import json
import os
import sys

import pytest

import _helpers_train as h
import _hf_helpers as hfh
from gqa_uptrain import checkpoints
from gqa_uptrain.model import ModelConfig


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    folder = hfh.make_hf_folder(root / "hf", dtype="bfloat16", vocab=96, layers=2, hidden=32,
                                num_heads=4, num_kv_heads=4, mlp=64)
    config = ModelConfig(vocab_size=96, d_model=32, num_layers=2, num_heads=4, num_kv_heads=4,
                         mlp_dim=64, qkv_bias=True)
    ckpt = str(root / "ckpt")
    checkpoints.save(ckpt, hfh.random_params(config, seed=1), checkpoints.Meta(model_config=config))
    return folder, ckpt


def test_sharded_load_equals_the_host_path_on_two_meshes(sources):
    """Every param of a bf16 HF folder and of a checkpoint with biases, kept or pooled (mean,
    first, random to G = 2 or 1, mean_normed), placed on data=2 x fsdp=2 x tensor=2 and on fsdp=8:
    bit-equal to loading.load + loading.convert ('mean_normed' within float32 rounding of its
    norms), each with its partition rule's sharding (asserted in the script)."""
    out = h.run([sys.executable, os.path.join(h.REPO, "tests", "_sharded_init_devices.py"),
                 *sources], timeout=600, devices=8)
    diffs = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(diffs) == 24
    for case, diff in diffs.items():
        if "mean_normed" in case:
            assert diff < 1e-6, (case, diff)
        else:
            assert diff == 0.0, (case, diff)

"""The precision policy (precision.py): fp16 and bf16 Hugging Face sources uptrain with float32
master weights and float32 optimizer state; bf16 compute tracks fp32 compute; fp16 compute is
refused; a checkpoint written before the policy still restores."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

import _helpers_train as h
import _hf_helpers as hfh
from gqa_uptrain import checkpoints, loading, train

FIXTURE = os.path.join(h.REPO, "tests", "fixtures", "checkpoint_v1_bf16")


def _uptrain(workdir, source, **overrides):
    config = h.config(h.UPTRAIN, "smoke,num_kv_heads=2", init_checkpoint=source, num_steps=3,
                      log_every=1, eval_every=0, final_eval_batches=0, checkpoint_every=3,
                      batch_size=4, progress_bar=False,
                      **{"data.seq_len": 32, "data.tokenizer": "byte",
                         "optimizer.warmup_steps": 1, **overrides})
    final = train.train_and_evaluate(config, str(workdir))
    return final, [r["train/loss"] for r in h.metrics(str(workdir)) if "train/loss" in r]


def _stored_dtypes(checkpoint: str, item: str) -> set[str]:
    return {str(dtype) for _, dtype in
            checkpoints._stored_shapes(os.path.join(checkpoint, item)).values()}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {dtype: hfh.make_hf_folder(root / dtype, dtype=dtype, vocab=257, layers=2, hidden=32,
                                      num_heads=4, num_kv_heads=4, mlp=64)
            for dtype in ("float16", "bfloat16")}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fp16_and_bf16_sources_uptrain_with_float32_master_weights(tmp_path, sources, dtype):
    final, losses = _uptrain(tmp_path / "up", sources[dtype])
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    ckpt = checkpoints.latest_checkpoint(str(tmp_path / "up"))
    _, meta, _ = checkpoints.restore(ckpt)
    assert meta.model_config.param_dtype == "float32" and meta.model_config.dtype == "float32"
    assert _stored_dtypes(ckpt, "params") == {"float32"}
    assert _stored_dtypes(ckpt, "opt_state") <= {"float32", "int32"}  # moments; the step count
    # Every parameter moved from the pooled source (cast to float32 exactly as training was).
    src, config, _ = loading.load(sources[dtype], param_dtype="float32")
    src, _, _ = loading.convert(src, config, 2, "mean")
    after = h.final_params(str(tmp_path / "up"))
    unchanged = [n for n in src if np.array_equal(np.asarray(src[n]), after[n])]
    assert not unchanged, unchanged


def test_bf16_compute_tracks_fp32_compute(tmp_path, sources):
    _, fp32 = _uptrain(tmp_path / "fp32", sources["bfloat16"])
    _, bf16 = _uptrain(tmp_path / "bf16", sources["bfloat16"], compute_dtype="bfloat16")
    # Relative: losses are ~8 nats here; the first (before any update) agrees to ~1e-4.
    assert max(abs(a - b) / a for a, b in zip(fp32, bf16)) < 2e-2, (fp32, bf16)
    assert abs(fp32[0] - bf16[0]) < 2e-2, (fp32, bf16)
    assert fp32 != bf16  # the bf16 run did compute in bf16
    _, meta, _ = checkpoints.restore(checkpoints.latest_checkpoint(str(tmp_path / "bf16")))
    assert meta.model_config.param_dtype == "float32" and meta.model_config.dtype == "bfloat16"


@pytest.mark.parametrize("overrides, message", [
    ({"compute_dtype": "float16"}, "compute_dtype='float16' needs loss scaling"),
    ({"param_dtype": "float16"}, "param_dtype='float16': fp16 master weights"),
    ({"compute_dtype": "fp8"}, "compute_dtype='fp8' is not one of"),
])
def test_refused_precisions_say_why_and_leave_no_workdir(tmp_path, overrides, message):
    workdir = tmp_path / "run"
    with pytest.raises(train.TrainError, match=message):
        train.train_and_evaluate(h.config(**overrides), str(workdir))
    assert not workdir.exists()


def test_model_dtype_keys_of_an_old_config_are_refused_naming_the_new_keys(tmp_path):
    config = h.config()
    config.unlock()
    config.model.dtype = "bfloat16"
    with pytest.raises(train.TrainError, match=r"config.model.dtype is no longer a model key: "
                                               r"set config.param_dtype .* config.compute_dtype"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


def test_a_checkpoint_written_before_the_policy_restores(tmp_path):
    """tests/fixtures/checkpoint_v1_bf16 (written by c5ac68f, param_dtype = dtype = bf16 in its
    meta.json): it restores as stored, loads cast to float32 exactly, and uptrains from there."""
    params, meta, opt_state = checkpoints.restore(FIXTURE)
    assert meta.format_version == 1 and meta.step == 2
    assert (meta.model_config.param_dtype, meta.model_config.dtype) == ("bfloat16", "bfloat16")
    assert {str(v.dtype) for v in params.values()} == {"bfloat16"}
    cast, config, _ = loading.load(FIXTURE, param_dtype="float32")
    assert config.param_dtype == "float32"
    for name, value in params.items():
        np.testing.assert_array_equal(np.asarray(cast[name]), np.asarray(value, np.float32))
    final, losses = _uptrain(tmp_path / "up", FIXTURE, **{"data.seq_len": 16})
    assert all(math.isfinite(x) for x in losses)
    ckpt = checkpoints.latest_checkpoint(str(tmp_path / "up"))
    assert _stored_dtypes(ckpt, "params") == {"float32"}

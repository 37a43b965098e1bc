"""The checkpoint format: bit-exact round trips, strict restores, atomic writes."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from gqa_uptrain import checkpoints
from gqa_uptrain.model import ModelConfig, build_model, get_params


def _config(**kw):
    base = dict(vocab_size=40, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=24)
    base.update(kw)
    return ModelConfig(**base)


def _assert_bit_exact(a, b):
    assert set(a) == set(b)
    for name in a:
        x, y = np.asarray(a[name]), np.asarray(b[name])
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8),
                                      err_msg=name)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_save_restore_is_bit_exact_with_meta_and_opt_state(tmp_path, param_dtype):
    config = _config(param_dtype=param_dtype, tie_embeddings=True, qkv_bias=True)
    params = get_params(build_model(config, seed=3))
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    # One real update so mu/nu/count are not just zeros.
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.1, params)
    _, opt_state = tx.update(grads, opt_state, params)
    meta = checkpoints.Meta(config, step=7, source_step=100, data_position={"seed": 1, "step": 7},
                            provenance={"converted_from": "x", "method": "mean", "seed": 0})
    path = str(tmp_path / "ckpt")
    checkpoints.save(path, params, meta, opt_state)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary left beside it

    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), opt_state)
    got_params, got_meta, got_opt = checkpoints.restore(path, expected_config=config,
                                                        opt_state_target=target)
    _assert_bit_exact(params, got_params)
    _assert_bit_exact(checkpoints.flatten_tree(opt_state), checkpoints.flatten_tree(got_opt))
    assert jax.tree.structure(got_opt) == jax.tree.structure(opt_state)
    assert got_meta == meta
    # Params load back into a model strictly.
    build_model(config, got_params)


def test_restore_into_mismatched_model_names_the_difference(tmp_path):
    config = _config()
    path = str(tmp_path / "ckpt")
    checkpoints.save(path, get_params(build_model(config)), checkpoints.Meta(config))
    with pytest.raises(checkpoints.CheckpointError, match=r"num_kv_heads.*\(1, 2\)"):
        checkpoints.restore(path, expected_config=config.replace(num_kv_heads=1))
    # A meta.json edited to another shape: the stored arrays no longer fit, named by param.
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    meta["model_config"]["num_kv_heads"] = 4
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)
    with pytest.raises(checkpoints.CheckpointError, match=r"shape mismatch for 'layers.0.attn.k_proj'"):
        checkpoints.restore(path)
    # Untying the embeddings makes 'lm_head' missing from the stored params.
    meta["model_config"].update(num_kv_heads=2, tie_embeddings=False)
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)
    checkpoints.restore(path)  # untied is the default _config(): this one matches
    meta["model_config"]["tie_embeddings"] = True
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)
    with pytest.raises(checkpoints.CheckpointError, match=r"unexpected \['lm_head'\]"):
        checkpoints.restore(path)


def test_restore_refuses_missing_params_and_wrong_opt_state(tmp_path):
    config = _config()
    params = get_params(build_model(config))
    path = str(tmp_path / "ckpt")
    checkpoints.save(path, params, checkpoints.Meta(config))
    # Rewrite params/ without one tensor: a silent partial restore must not happen.
    partial = {k: v for k, v in params.items() if k != "layers.1.mlp.up_proj"}
    import shutil
    shutil.rmtree(os.path.join(path, "params"))
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(path, "params"), partial)
    ckptr.wait_until_finished()
    with pytest.raises(checkpoints.CheckpointError, match=r"missing \['layers.1.mlp.up_proj'\]"):
        checkpoints.restore(path)
    # No optimizer state stored, but one asked for.
    path2 = str(tmp_path / "ckpt2")
    checkpoints.save(path2, params, checkpoints.Meta(config))
    with pytest.raises(checkpoints.CheckpointError, match="holds no optimizer state"):
        checkpoints.restore(path2, opt_state_target=optax.sgd(0.1).init(params))


def test_save_refuses_wrong_params_and_existing_path(tmp_path):
    config = _config()
    params = get_params(build_model(config))
    path = str(tmp_path / "ckpt")
    bad = dict(params, extra=np.zeros(3))
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        checkpoints.save(path, bad, checkpoints.Meta(config))
    assert not os.listdir(tmp_path)  # nothing half-written
    checkpoints.save(path, params, checkpoints.Meta(config))
    with pytest.raises(checkpoints.CheckpointError, match="already exists"):
        checkpoints.save(path, params, checkpoints.Meta(config))
    with pytest.raises(checkpoints.CheckpointError, match="not a checkpoint"):
        checkpoints.read_meta(str(tmp_path))


def test_workdir_steps_keep_last_k_and_ignore_incomplete(tmp_path):
    config = _config()
    params = get_params(build_model(config))
    workdir = str(tmp_path)
    for step in (10, 20, 30):
        checkpoints.save_step(workdir, params, checkpoints.Meta(config, step=step), keep=2)
    assert checkpoints.list_steps(workdir) == [20, 30]
    # A save killed mid-write leaves only a dot-tmp folder: never listed, never the latest.
    os.makedirs(os.path.join(workdir, "checkpoints", ".40.tmp", "params"))
    os.makedirs(os.path.join(workdir, "checkpoints", "50"))  # no meta.json: incomplete
    assert checkpoints.latest_checkpoint(workdir).endswith(os.path.join("checkpoints", "30"))
    assert checkpoints.resolve(workdir) == checkpoints.latest_checkpoint(workdir)


FIXTURE_V1 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                          "checkpoint_v1_bf16")


def test_version_2_is_committed_by_orbax_without_a_rename(tmp_path, monkeypatch):
    """The layout on disk (version 2): v1's names plus orbax's step record and commit mark, the
    commit written last and nothing renamed (os.rename / os.replace fail here, in orbax's threads
    too), also when the keep policy deletes an older step."""
    config = _config()
    params = get_params(build_model(config))

    def refuse(*args):
        raise AssertionError(f"renamed {args}")

    monkeypatch.setattr(os, "rename", refuse)
    monkeypatch.setattr(os, "replace", refuse)
    path = str(tmp_path / "ckpt")
    checkpoints.save(path, params, checkpoints.Meta(config))
    assert sorted(os.listdir(path)) == ["_CHECKPOINT_METADATA", "commit_success.txt", "meta.json",
                                        "params"]
    for step in (1, 2):
        checkpoints.save_step(str(tmp_path / "run"), params, checkpoints.Meta(config, step=step),
                              keep=1)
    assert checkpoints.list_steps(str(tmp_path / "run")) == [2]
    monkeypatch.undo()
    _, meta, _ = checkpoints.restore(path)
    assert meta.format_version == checkpoints.FORMAT_VERSION == 2


def test_a_version_2_directory_without_its_commit_mark_is_not_a_checkpoint(tmp_path):
    config = _config()
    workdir = str(tmp_path)
    checkpoints.save_step(workdir, get_params(build_model(config)),
                          checkpoints.Meta(config, step=4))
    path = checkpoints.step_dir(workdir, 4)
    assert checkpoints.list_steps(workdir) == [4] and checkpoints.incomplete_steps(workdir) == []
    # What a save killed before orbax's commit leaves: every file but the mark.
    os.remove(os.path.join(path, "commit_success.txt"))
    assert not checkpoints.is_checkpoint(path)
    assert checkpoints.list_steps(workdir) == [] and checkpoints.incomplete_steps(workdir) == [4]
    assert checkpoints.latest_checkpoint(workdir) is None
    with pytest.raises(checkpoints.CheckpointError, match="incomplete checkpoint .no commit_succ"):
        checkpoints.read_meta(path)
    # A half-written meta.json is no checkpoint either (and no crash).
    with open(os.path.join(path, "meta.json"), "w") as f:
        f.write('{"format_version": 2, "model_con')
    assert not checkpoints.is_checkpoint(path)
    with pytest.raises(checkpoints.CheckpointError, match="incomplete checkpoint"):
        checkpoints.read_meta(path)
    from gqa_uptrain import run_checkpoints

    assert run_checkpoints.clear_incomplete(workdir) == ["4"]
    assert not os.path.exists(path)


def test_version_1_still_reads_and_an_unknown_version_is_refused(tmp_path):
    """Version 1 (no commit mark: renamed into place when complete) is a checkpoint, alone and in
    a workdir beside version-2 steps, which orbax's keep policy prunes without touching it."""
    import shutil

    assert checkpoints.is_checkpoint(FIXTURE_V1)
    assert not os.path.exists(os.path.join(FIXTURE_V1, "commit_success.txt"))
    assert checkpoints.read_meta(FIXTURE_V1).format_version == 1
    workdir = str(tmp_path / "run")
    shutil.copytree(FIXTURE_V1, checkpoints.step_dir(workdir, 2))
    meta = checkpoints.read_meta(FIXTURE_V1)
    params, _, _ = checkpoints.restore(FIXTURE_V1)
    for step in (3, 4):
        checkpoints.save_step(workdir, params, dataclasses.replace(meta, step=step), keep=1)
    assert checkpoints.list_steps(workdir) == [2, 4]
    assert checkpoints.read_meta(checkpoints.latest_checkpoint(workdir)).format_version == 2
    copy = str(tmp_path / "v3")
    shutil.copytree(FIXTURE_V1, copy)
    with open(os.path.join(copy, "meta.json")) as f:
        d = json.load(f)
    d["format_version"] = 3
    with open(os.path.join(copy, "meta.json"), "w") as f:
        json.dump(d, f)
    with pytest.raises(checkpoints.CheckpointError,
                       match=r"format_version=3; this code reads 1, 2"):
        checkpoints.read_meta(copy)

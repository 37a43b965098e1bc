"""Scanned layers (model.Transformer(scan_layers=True), layer_stack.py, train_step.py): the same
losses as the per-layer loop on 1 and 8 simulated devices, a compiled step that does not grow with
depth, and checkpoints that stay one entry per layer."""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

import _helpers_train as h
from gqa_uptrain import checkpoints, layer_stack, optim, sharding, train, train_step
from gqa_uptrain.model import ModelConfig, Transformer, get_params

OPTIMIZER = ml_collections.ConfigDict(dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                                           clip_norm=1.0))


def test_scan_and_remat_match_the_loop_on_1_and_8_devices():
    """tests/_scan_devices.py: 3 steps of the real train step, scanned with each remat policy, on
    1 device and on fsdp=8 and data=2 x fsdp=2 x tensor=2, against the loop without remat."""
    out = h.run([sys.executable, os.path.join(h.REPO, "tests", "_scan_devices.py")],
                timeout=600, devices=8)
    results = json.loads(out.stdout.strip().splitlines()[-1])
    ref = np.array(results.pop("loop/1")["losses"])
    assert set(results) == {"scan-none/1", "scan-full/1", "scan-dots/1", "scan-dots/fsdp8",
                            "scan-full/2x2x2"}
    assert ref[-1] < ref[0] - 1.0  # the steps train
    for name, r in results.items():
        np.testing.assert_allclose(r["losses"], ref, rtol=1e-5, err_msg=name)
        # After 3 AdamW steps: Adam's per-coordinate normalisation turns fp32 rounding of a
        # near-zero gradient into a visible update difference, hence a looser bound on params.
        assert r["params_rel_err"] < 5e-5, (name, r["params_rel_err"])


def _compiled_step(num_layers: int, scan: bool):
    config = ModelConfig(vocab_size=128, d_model=64, num_layers=num_layers, num_heads=4,
                         num_kv_heads=2, mlp_dim=128)
    schedule = optim.make_schedule("constant", peak_lr=1e-3, warmup_steps=0, total_steps=10,
                                   decay_fraction=0.0, min_lr_ratio=1.0)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    setup = train_step.build(config, mesh, schedule, OPTIMIZER, implementation="auto",
                             remat="dots", scan_layers=scan, loss_chunk_size=0)
    start = time.perf_counter()
    compiled = setup.step.lower(*setup.abstract_args(1, 4, 32)).compile()
    return len(compiled.as_text()), time.perf_counter() - start


def test_the_scanned_step_does_not_grow_with_depth():
    sizes = {(n, scan): _compiled_step(n, scan) for n in (2, 8) for scan in (True, False)}
    for (n, scan), (size, seconds) in sorted(sizes.items()):
        print(f"{'scan' if scan else 'loop'} {n} layers: optimized HLO {size:,} chars, compiled "
              f"in {seconds:.1f} s")
    scan2, scan8 = sizes[2, True][0], sizes[8, True][0]
    assert abs(scan8 - scan2) / scan2 < 0.10, (scan2, scan8)
    assert sizes[8, False][0] > 2 * sizes[2, False][0]  # what the loop does, for contrast


def test_stack_and_unstack_are_inverse_and_match_the_scanned_model():
    config = ModelConfig(vocab_size=64, d_model=16, num_layers=3, num_heads=4, num_kv_heads=2,
                         mlp_dim=32, qkv_bias=True)
    per_layer = get_params(Transformer(config, rngs=nnx.Rngs(3)))
    stacked = get_params(Transformer(config, rngs=nnx.Rngs(3), scan_layers=True))
    assert set(stacked) == set(layer_stack.stack(dict(per_layer), 3))
    assert stacked["layers.attn.k_bias"].shape == (3, 2, 4)
    for name, x in layer_stack.stack(dict(per_layer), 3).items():
        np.testing.assert_array_equal(x, stacked[name], err_msg=name)
    back = layer_stack.unstack(stacked, 3)
    assert set(back) == set(per_layer)
    for name in per_layer:
        np.testing.assert_array_equal(back[name], per_layer[name], err_msg=name)
    with pytest.raises(ValueError, match=r"expected layers 0\.\.3, got \[0, 1, 2\]"):
        layer_stack.stack(dict(per_layer), 4)
    with pytest.raises(ValueError, match="per-layer layout"):
        Transformer(config, rngs=nnx.Rngs(0), scan_layers=True).decode(
            np.zeros((1, 1), np.int32), None)


def test_a_scanned_run_saves_per_layer_checkpoints_and_resumes_them(tmp_path):
    """The saved checkpoint (params and optimizer state) names every layer, as the loop's does;
    and a run resumed from it continues bit-identically (tests/test_resume.py does the kill)."""
    workdir = str(tmp_path / "run")
    cfg = h.config(num_steps=4, checkpoint_every=2, eval_every=0, final_eval_batches=0,
                   scan_layers=True, **{"model.num_layers": 2})
    train.train_and_evaluate(cfg, workdir)
    ckpt = checkpoints.latest_checkpoint(workdir)
    names = set(checkpoints._stored_shapes(os.path.join(ckpt, "params")))
    assert "layers.1.attn.k_proj" in names and not any(layer_stack.is_stacked_name(n)
                                                        for n in names)
    opt_names = set(checkpoints._stored_shapes(os.path.join(ckpt, "opt_state")))
    assert any("layers.1.attn.k_proj" in n for n in opt_names)
    assert not any("'layers.attn" in n for n in opt_names), sorted(opt_names)[:5]
    final = h.final_params(workdir)
    # The same run on the loop layout gives the same checkpoint to fp32 rounding.
    loop_dir = str(tmp_path / "loop")
    train.train_and_evaluate(h.config(num_steps=4, checkpoint_every=2, eval_every=0,
                                      final_eval_batches=0, scan_layers=False,
                                      **{"model.num_layers": 2}), loop_dir)
    loop = h.final_params(loop_dir)
    for name in final:
        np.testing.assert_allclose(final[name], loop[name], rtol=1e-4, atol=1e-5, err_msg=name)
    # Resume from step 2 on the scanned layout: bit-identical to the uninterrupted run.
    resumed = str(tmp_path / "resumed")
    os.makedirs(os.path.join(resumed, "checkpoints"))
    for name in ("train_config.json", "run.json", "data_manifest.json", "metrics.jsonl"):
        with open(os.path.join(workdir, name)) as f, open(os.path.join(resumed, name), "w") as g:
            g.write(f.read())
    import shutil
    shutil.copytree(checkpoints.step_dir(workdir, 2), checkpoints.step_dir(resumed, 2))
    train.train_and_evaluate(cfg, resumed)
    again = h.final_params(resumed)
    for name in final:
        np.testing.assert_array_equal(again[name], final[name], err_msg=name)

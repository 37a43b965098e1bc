"""Run by tests/test_scan.py in a subprocess with 8 simulated devices (XLA_FLAGS is set by the
test): the real train step (train_step.build) with scanned layers and each remat policy, on one
device and sharded (fsdp=8; data=2 x fsdp=2 x tensor=2), against the unscanned loop without remat
on one device. Prints one JSON object: {name: {"losses": [...], "params_rel_err": float}}."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gqa_uptrain import optim, sharding, train_step
from gqa_uptrain.model import ModelConfig

CONFIG = ModelConfig(vocab_size=96, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2,
                     mlp_dim=64)
OPTIMIZER = ml_collections.ConfigDict(dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                                           clip_norm=1.0))
SCHEDULE = optim.make_schedule("constant", peak_lr=1e-2, warmup_steps=0, total_steps=10,
                               decay_fraction=0.0, min_lr_ratio=1.0)
STEPS, BATCH, SEQ = 3, 8, 16


def _batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CONFIG.vocab_size, (1, BATCH, SEQ + 1), dtype=np.int32)
    seg = np.where(np.arange(SEQ) < 10, 1, 2).astype(np.int32)  # two documents per row
    pos = np.where(seg == 1, np.arange(SEQ), np.arange(SEQ) - 10).astype(np.int32)
    mask = np.ones((1, BATCH, SEQ), np.int32)
    mask[..., 9] = 0  # the target crossing the document boundary
    return {"inputs": tokens[..., :-1], "targets": tokens[..., 1:],
            "segment_ids": np.broadcast_to(seg, (1, BATCH, SEQ)),
            "positions": np.broadcast_to(pos, (1, BATCH, SEQ)), "loss_mask": mask}


def run(mesh_shape, devices, *, scan: bool, remat: str):
    mesh = sharding.make_mesh(*mesh_shape, devices=devices)
    setup = train_step.build(CONFIG, mesh, SCHEDULE, OPTIMIZER, implementation="auto",
                             remat=remat, scan_layers=scan, loss_chunk_size=6)
    params = setup.scratch_params(0)
    opt_state = setup.init_opt_state(params)
    batch = {k: jax.device_put(jnp.asarray(v), setup.batch_sh) for k, v in _batch().items()}
    losses = []
    for _ in range(STEPS):
        params, opt_state, metrics = setup.step(params, opt_state, batch)
        losses.append(float(metrics["loss"]))
    disk_params, _ = setup.to_disk(params, opt_state)
    return losses, {k: np.asarray(v, np.float64) for k, v in disk_params.items()}


def main():
    devices = jax.devices()
    assert len(devices) == 8, devices
    ref_losses, ref = run((1, 1, 1), devices[:1], scan=False, remat="none")
    out = {"loop/1": {"losses": ref_losses, "params_rel_err": 0.0}}
    cases = [("scan-none/1", (1, 1, 1), devices[:1], "none"),
             ("scan-full/1", (1, 1, 1), devices[:1], "full"),
             ("scan-dots/1", (1, 1, 1), devices[:1], "dots"),
             ("scan-dots/fsdp8", (1, 8, 1), devices, "dots"),
             ("scan-full/2x2x2", (2, 2, 2), devices, "full")]
    for name, shape, devs, remat in cases:
        losses, params = run(shape, devs, scan=True, remat=remat)
        diff = np.sqrt(sum(np.sum((params[k] - ref[k]) ** 2) for k in ref))
        norm = np.sqrt(sum(np.sum(ref[k] ** 2) for k in ref))
        out[name] = {"losses": losses, "params_rel_err": float(diff / norm)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

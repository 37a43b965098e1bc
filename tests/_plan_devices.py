"""Run by tests/test_plan.py in a subprocess with 8 simulated devices: the planner's compiled
figures for a small model at 4 and 8 devices with the same per-device batch, and a plan of the
pretrain smoke config on fsdp=4. Prints one JSON object. `--no_constraints` replaces
sharding.constrain by the identity (to show the activation rules are what keeps the figure flat)."""

from __future__ import annotations

import json
import sys

import jax

from gqa_uptrain import model, plan
from gqa_uptrain.cli import load_config

REPO_CONFIG = "configs/pretrain.py:smoke"


def _config(devices: int, seqs_per_device: int):
    c = load_config(REPO_CONFIG)
    c.model.update(d_model=256, num_layers=2, num_heads=8, mlp_dim=1024, vocab_size=512)
    c.data.seq_len = 256
    c.mesh.update(data=1, fsdp=devices, tensor=1)
    c.batch_size = devices * seqs_per_device
    c.num_steps = 100
    c.remat = "full"
    return c


def main():
    if "--no_constraints" in sys.argv:
        model.constrain = lambda x, names: x  # model.py's binding of sharding.constrain
    assert len(jax.devices()) == 8
    h100 = plan.HARDWARE["h100"]
    temps = {n: plan.build_plan(_config(n, 2), h100).xla_temporaries for n in (4, 8)}
    smoke = load_config(REPO_CONFIG)
    smoke.mesh.update(data=1, fsdp=4, tensor=1)
    p = plan.build_plan(smoke, h100)
    print(json.dumps({"temporaries": temps, "smoke": {
        "params_bytes": p.params_bytes, "grads_bytes": p.grads_bytes, "opt_bytes": p.opt_bytes,
        "mesh": p.mesh, "model": p.model, "raw_total": p.raw_total,
        "corrected_total": p.corrected_total, "flops_per_token": p.flops_per_token,
        "corrections": [b for _, b in p.corrections]}}))


if __name__ == "__main__":
    main()

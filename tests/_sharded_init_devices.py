"""Run by tests/test_sharded_init.py with 8 simulated devices: sharded_init.load of an HF folder
and of a project checkpoint on two meshes, against the host path (loading.load + loading.convert).
argv: HF_FOLDER CHECKPOINT. Prints one JSON object {case: max abs difference (0.0 = bit-equal)}."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from gqa_uptrain import loading, sharded_init, sharding


def main():
    hf_folder, checkpoint = sys.argv[1:3]
    assert len(jax.devices()) == 8
    out = {}
    for path, tag in ((hf_folder, "hf"), (checkpoint, "checkpoint")):
        source = loading.inspect(path)
        host, config, _ = loading.load(source, param_dtype="float32")
        host = {k: np.asarray(v) for k, v in host.items()}
        for mesh_shape in ((2, 2, 2), (1, 8, 1)):
            mesh = sharding.make_mesh(*mesh_shape)
            for method, g in (("keep", -1), ("mean", 2), ("first", 2), ("random", 1),
                              ("mean_normed", 2), ("mean", 1)):
                if g == -1:
                    want = host
                else:
                    want, _, _ = loading.convert(host, config, g, method, seed=3)
                got, got_config, _ = sharded_init.load(source, mesh, param_dtype="float32",
                                                       num_kv_heads=g, method=method, seed=3)
                assert set(got) == set(want), sorted(set(got) ^ set(want))
                for name, x in got.items():
                    assert x.sharding.spec == sharding.partition_spec(
                        name, x.shape, mesh), (name, x.sharding.spec)
                diff = max(float(np.max(np.abs(np.asarray(got[n], np.float64) -
                                              np.asarray(want[n], np.float64)))) for n in want)
                out[f"{tag}/{'x'.join(map(str, mesh_shape))}/{method}/{g}"] = diff
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Run by tests/test_multihost.py as one of 2 processes (jax.distributed on localhost, 4 simulated
devices each): place a model with sharded_init.load on fsdp=8 across both and print this process's
peak resident-size growth (ru_maxrss) and the model's bytes as JSON.
argv: SOURCE COORDINATOR_PORT PROCESS_ID."""

from __future__ import annotations

import json
import resource
import sys

import jax


def main():
    source_path, port, process_id = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=process_id, initialization_timeout=60)
    from gqa_uptrain import loading, sharded_init, sharding  # noqa: PLC0415 (after initialize)

    source = loading.inspect(source_path)
    mesh = sharding.make_mesh(1, 8, 1)
    jax.block_until_ready(jax.numpy.zeros(()))  # the runtime's own allocations, before measuring
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params, config, _ = sharded_init.load(source, mesh, param_dtype="float32")
    jax.block_until_ready(params)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    total = sum(x.size * x.dtype.itemsize for x in params.values())
    local = sum(s.data.nbytes for x in params.values() for s in x.addressable_shards)
    print(json.dumps({"growth": after - before, "model_bytes": total, "local_bytes": local,
                      "format": source.format}))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()

"""hostmem: the entry points' re-run with glibc malloc settings, and what it is for (page faults).

Page faults are counted (getrusage), not timed: the count is what the settings change.
"""

import json
import os
import subprocess
import sys

import pytest

from gqa_uptrain import hostmem, xla_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Re-runs itself through hostmem (unless told not to), then counts the minor page faults of a
# jitted op whose 32 MiB output XLA allocates afresh at every call.
_PROBE = """
import json, os, resource, sys
from gqa_uptrain import hostmem
hostmem.reexec_with_tuned_malloc()
import jax, jax.numpy as jnp
x = jnp.ones((8 * 2 ** 20,), jnp.float32)
double = jax.jit(lambda x: x * 2)
for _ in range(3):
    double(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    double(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps({"faults_per_call": faults,
                  "env": {k: os.environ[k] for k in hostmem.ENV if k in os.environ}}))
"""


def _probe(**env_extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in hostmem.ENV and k != hostmem.OPT_OUT}
    env.update(env_extra, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not hostmem.wanted({}), reason="glibc Linux only")
def test_rerun_sets_the_environment_and_removes_the_per_call_page_faults():
    default = _probe(**{hostmem.OPT_OUT: "1"})
    tuned = _probe()
    assert default["env"] == {} and tuned["env"] == hostmem.ENV
    # 32 MiB of fresh pages is 8,192 faults of 4 KiB with glibc's defaults.
    assert default["faults_per_call"] > 4000, default
    assert tuned["faults_per_call"] < 0.1 * default["faults_per_call"], (tuned, default)


def test_wanted_respects_opt_out_and_settings_already_made():
    if not hostmem.wanted({}):
        pytest.skip("glibc Linux only")
    assert not hostmem.wanted({hostmem.OPT_OUT: "1"})
    assert not hostmem.wanted({"MALLOC_ARENA_MAX": "4"})  # someone chose their own
    assert hostmem.wanted({"PATH": "/usr/bin"})


def test_decode_options_fall_back_when_xla_lacks_the_option():
    assert not xla_cpu.accepted({"xla_cpu_no_such_option_anywhere": ""})
    if xla_cpu.decode_options() is not None:  # this XLA knows the option: it must compile
        assert xla_cpu.accepted(xla_cpu.decode_options())

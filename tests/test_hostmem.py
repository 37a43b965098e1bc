"""hostmem: the training commands' re-run with glibc malloc settings; cpu.xla_options' option check.

What the settings buy (fewer page faults, a faster step) is measured by the training benchmark and
recorded in hostmem.py, not asserted here: a small probe's page-fault count under them varied from
0 to every page between identical runs, so only the mechanism is tested.
"""

import json
import os
import subprocess
import sys

import pytest

from gqa_uptrain.cpu import hostmem
from gqa_uptrain.cpu import xla_options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Re-runs itself through hostmem (unless told not to), then reports the settings in force and
# how many processes printed (the re-run replaces the first one: exactly one line).
_PROBE = """
import json
from gqa_uptrain.cpu import hostmem
hostmem.reexec_with_tuned_malloc()
print(json.dumps(hostmem.in_force()))
"""


def _probe(**env_extra) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in hostmem.ENV and k != hostmem.OPT_OUT}
    env.update(env_extra, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.strip().splitlines()]


@pytest.mark.skipif(not hostmem.wanted({}), reason="glibc Linux only")
def test_rerun_sets_the_environment_once_and_honours_the_opt_out():
    assert _probe() == [hostmem.ENV]
    assert _probe(**{hostmem.OPT_OUT: "1"}) == [{}]
    assert _probe(MALLOC_ARENA_MAX="4") == [{"MALLOC_ARENA_MAX": "4"}]  # theirs, untouched


def test_wanted_respects_opt_out_and_settings_already_made():
    if not hostmem.wanted({}):
        pytest.skip("glibc Linux only")
    assert not hostmem.wanted({hostmem.OPT_OUT: "1"})
    assert not hostmem.wanted({"MALLOC_ARENA_MAX": "4"})  # someone chose their own
    assert hostmem.wanted({"PATH": "/usr/bin"})


def test_decode_options_fall_back_when_xla_lacks_the_option():
    assert not xla_options.accepted({"xla_cpu_no_such_option_anywhere": ""})
    assert xla_options.decode_options(xla_options.YNN_KEPT_MAX_HEAD_DIM) is None  # small heads: XLA's defaults
    # Wider heads on CPU: the option exactly when this XLA compiles with it, else XLA's defaults.
    known = xla_options.accepted(xla_options.YNN_FUSIONS_OFF)
    assert xla_options.decode_options(64) == (xla_options.YNN_FUSIONS_OFF if known else None)

"""The trainer's command line as a user meets it: --help, --print_config, one-line config errors,
Ctrl-C (SIGINT) to the process or its group, and resuming with changed cadence or length."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import _helpers_train as h
from gqa_uptrain import checkpoints, config_keys, run_config, train

CONFIG_VARIANTS = [(h.PRETRAIN, None), (h.PRETRAIN, "smoke"), (h.PRETRAIN, "size=base"),
                   (h.UPTRAIN, None), (h.UPTRAIN, "smoke")]


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    yield from h.compilation_cache(tmp_path_factory)


def _module_flags(module: str) -> list[str]:
    """The flags an entry point defines itself (read from its source: DEFINE_* calls)."""
    import re

    with open(os.path.join(h.REPO, "gqa_uptrain", f"{module}.py")) as f:
        source = f.read()
    return re.findall(r'DEFINE_\w+\(\s*"(\w+)"', source)


# ----------------------------------------------------------------------------- help and config


def test_every_config_key_has_a_description_and_every_description_a_key():
    seen = set()
    for path, arg in CONFIG_VARIANTS:
        keys = [k for k, _ in config_keys.flat_keys(h.load_config_module(path).get_config(arg))]
        assert [k for k in keys if k not in config_keys.DESCRIPTIONS] == [], (path, arg)
        seen |= set(keys)
    assert sorted(set(config_keys.DESCRIPTIONS) - seen) == []
    assert all(text.strip() for text in config_keys.DESCRIPTIONS.values())


@pytest.mark.parametrize("module", ["train", "evaluate"])
def test_help_exits_0_and_lists_every_flag_with_its_help(module):
    out = h.run([sys.executable, "-m", f"gqa_uptrain.{module}", "--help"], timeout=120)
    lines = out.stdout.splitlines()
    names = _module_flags(module)
    assert len(names) >= 6
    for name in names:
        [i] = [i for i, line in enumerate(lines) if line.split(" ")[2:3] == [f"--{name}"]
               or line.strip().startswith(f"--{name} ") or line.strip() == f"--{name}"]
        assert lines[i + 1].strip(), f"--{name} has no help text"
    assert "absl" not in out.stdout and "orbax" not in out.stdout
    if module == "train":  # every config key, described
        for key, text in config_keys.DESCRIPTIONS.items():
            assert f"  {key}: {text}" in lines


def test_print_config_describes_every_resolved_key():
    out = h.run([sys.executable, "-m", "gqa_uptrain.train",
                 f"--config={h.UPTRAIN}:smoke,num_kv_heads=2", "--config.batch_size=4",
                 "--print_config"], timeout=120)
    lines = out.stdout.splitlines()
    config = h.load_config_module(h.UPTRAIN).get_config("smoke,num_kv_heads=2")
    assert len(lines) == len(list(config_keys.flat_keys(config)))
    assert "batch_size = 4" in next(line for line in lines if line.startswith("batch_size "))
    assert any(line.startswith("num_kv_heads = 2 ") for line in lines)
    assert all("  # " in line for line in lines)


CONFIG_ERRORS = [
    (["--config.num_stepz=5"],
     "error: --config.num_stepz: unknown config key 'num_stepz'; did you mean --config.num_steps? "
     "(--print_config lists every key)"),
    (["--config.optimizer.learnin_rate=1.0"],
     "error: --config.optimizer.learnin_rate: unknown config key 'optimizer.learnin_rate'; did you "
     "mean --config.optimizer.learning_rate? (--print_config lists every key)"),
    (["--config.num_steps=abc"],
     "error: flag --config.num_steps=abc: invalid literal for int() with base 10: 'abc'"),
    (["--worddir=x"], "error: Unknown command line flag 'worddir'. Did you mean: workdir ?"),
]


@pytest.mark.parametrize("extra,message", CONFIG_ERRORS, ids=lambda x: str(x)[:30])
def test_bad_config_override_is_one_line_and_exit_2(tmp_path, extra, message):
    workdir = str(tmp_path / "run")
    out = h.run([sys.executable, "-m", "gqa_uptrain.train", f"--workdir={workdir}",
                 f"--config={h.PRETRAIN}:smoke", *extra], check=False, timeout=120)
    assert (out.returncode, out.stderr.strip(), out.stdout) == (2, message, "")
    assert not os.path.exists(workdir)


def test_bad_config_argument_and_file_are_one_line_and_exit_2(tmp_path):
    workdir = str(tmp_path / "run")
    cases = [
        (f"{h.PRETRAIN}:smokee", f"error: --config={h.PRETRAIN}:smokee: unknown config argument "
                                 "'smokee'; did you mean 'smoke'? (known: size, smoke)"),
        (f"{h.UPTRAIN}:num_kv_heads=two", f"error: --config={h.UPTRAIN}:num_kv_heads=two: config "
                                          "argument num_kv_heads='two' is not a valid int"),
        ("configs/nope.py", "error: --config=configs/nope.py: no such config file "
                            "'configs/nope.py'"),
    ]
    for value, message in cases:
        out = h.run([sys.executable, "-m", "gqa_uptrain.train", f"--workdir={workdir}",
                     f"--config={value}"], check=False, timeout=120)
        assert (out.returncode, out.stderr.strip(), out.stdout) == (2, message, ""), value
    out = h.run([sys.executable, "-m", "gqa_uptrain.train", f"--workdir={workdir}",
                 f"--config={h.UPTRAIN}", "--config.model.d_model=8"], check=False, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == (f"error: --config.model.d_model: 'model' is None in {h.UPTRAIN}, "
                                  "so it has no key 'd_model'")
    assert not os.path.exists(workdir)


# ----------------------------------------------------------------------------- Ctrl-C

# A run far longer than the test waits for, on a constant schedule so that a rerun with a smaller
# num_steps is accepted by the resume rule (nothing about the steps already taken changes).
SIGINT_FLAGS = h.cli_flags(num_steps=100000, checkpoint_every=0, eval_every=0,
                           final_eval_batches=0, log_every=1,
                           **{"optimizer.schedule": "constant"})


def _start(workdir: str, flags: list[str], env=None) -> subprocess.Popen:
    return subprocess.Popen(h.train_cmd(workdir, flags), cwd=h.REPO, env=env or h.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a shell job


def _wait_for_steps(proc: subprocess.Popen, workdir: str, n: int, timeout: float = 120) -> None:
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                if sum(1 for line in f if line.endswith("\n")) >= n:
                    return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("timed out waiting for training steps")


@pytest.mark.parametrize("to_group", [False, True], ids=["process", "process_group"])
def test_sigint_saves_the_current_step_exits_130_and_the_rerun_continues(tmp_path, to_group):
    workdir = str(tmp_path / "run")
    proc = _start(workdir, SIGINT_FLAGS)
    _wait_for_steps(proc, workdir, 2)
    if to_group:
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    else:
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    [step] = checkpoints.list_steps(workdir)  # checkpoint_every=0: only the interrupted step
    assert step >= 2
    assert out.splitlines()[-1] == (f"SIGINT: saved a checkpoint at step {step} of 100000; rerun "
                                    "the same command to resume")
    assert max(r["step"] for r in h.metrics(workdir)) == step
    # The rerun continues from it (here with a shorter length, which the constant schedule allows).
    flags = [f for f in SIGINT_FLAGS if not f.startswith("--config.num_steps=")]
    rerun = h.run(h.train_cmd(workdir, flags + [f"--config.num_steps={step + 2}"]))
    assert f"resumed from {checkpoints.step_dir(workdir, step)} (step {step} of {step + 2})" in \
        rerun.stdout
    assert checkpoints.list_steps(workdir) == [step, step + 2]
    assert [r["step"] for r in h.metrics(workdir)] == list(range(1, step + 3))


def test_second_sigint_aborts_at_once():
    """The run's signal handling in a real process that never finishes its "step" by itself: the
    first SIGINT only asks it to stop; the second ends it at once with status 130 and one line."""
    code = ("import time\nfrom gqa_uptrain import stop_signals\n"
            "with stop_signals.StopSignals() as stop:\n"
            "    print('ready', flush=True)\n"
            "    while True:\n        time.sleep(0.01)\n"
            "        if stop.received: print('stopping', flush=True); break\n"
            "    while True:\n        time.sleep(0.01)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=h.REPO, env=h.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)
    assert proc.stdout.readline() == "stopping\n"  # asked to stop, still running
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (130, "error: second SIGINT: aborted at once; nothing saved "
                                           "since the last checkpoint\n")


# ----------------------------------------------------------------------------- resume changes


def _constant(**overrides):
    return h.config(**{"optimizer.schedule": "constant", "eval_every": 0, **overrides})


def test_resume_accepts_cadence_changes_and_a_length_that_keeps_the_schedule(tmp_path):
    extended = str(tmp_path / "extended")
    train.train_and_evaluate(_constant(num_steps=4), extended)
    final = train.train_and_evaluate(_constant(num_steps=6, log_every=2, checkpoint_every=3,
                                               keep_checkpoints=3, **{"data.prefetch": 0}),
                                     extended)
    assert final["step"] == 6
    with open(os.path.join(extended, run_config.CHANGES_FILE)) as f:
        [record] = [json.loads(line) for line in f]
    assert record["step"] == 4
    assert record["changes"] == {"checkpoint_every": [2, 3], "keep_checkpoints": [2, 3],
                                 "log_every": [1, 2], "num_steps": [4, 6],
                                 "data.prefetch": [2, 0]}
    with open(os.path.join(extended, train.RUN_FILE)) as f:
        assert json.load(f)["num_steps"] == 6
    # The extended run is the run that num_steps=6 makes from the start, bit for bit.
    fresh = str(tmp_path / "fresh")
    train.train_and_evaluate(_constant(num_steps=6, log_every=2, checkpoint_every=3,
                                       keep_checkpoints=3), fresh)
    a, b = h.final_params(extended), h.final_params(fresh)
    assert all(np.array_equal(a[k], b[k]) for k in b)


def test_resume_refuses_a_length_that_changes_past_learning_rates(tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(h.config(num_steps=4), workdir)  # cosine: lr depends on num_steps
    with pytest.raises(train.TrainError, match=r"num_steps 4 -> 8 changes the learning rate of "
                                               r"steps already taken \(the cosine schedule at step"):
        train.train_and_evaluate(h.config(num_steps=8), workdir)
    with pytest.raises(train.TrainError, match=r"different config .*'seed': \(0, 5\)"):
        train.train_and_evaluate(h.config(num_steps=4, seed=5, eval_every=2), workdir)
    assert not os.path.exists(os.path.join(workdir, run_config.CHANGES_FILE))

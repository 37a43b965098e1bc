"""Shared pieces of the training tests: tiny configs, the CLI in a subprocess, metrics, ports."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(REPO, "configs", "pretrain.py")
UPTRAIN = os.path.join(REPO, "configs", "uptrain.py")

# A model small enough that compilation, not compute, is the cost: 1 layer, d_model 32.
TINY = {
    "model.d_model": 32, "model.num_layers": 1, "model.num_heads": 4,
    "model.mlp_dim": 64, "data.seq_len": 32, "batch_size": 4, "num_steps": 6,
    "optimizer.warmup_steps": 2, "log_every": 1, "eval_every": 3, "eval_batches": 1,
    "final_eval_batches": 2, "checkpoint_every": 2, "keep_checkpoints": 2,
    "progress_bar": False,
}


def load_config_module(path: str):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3] + "_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config(path: str = PRETRAIN, arg: str = "smoke", **overrides):
    """get_config(arg) of a config file with TINY (pretrain only) and `overrides` applied
    ('a.b' keys), locked like the command line's."""
    c = load_config_module(path).get_config(arg)
    changes = {**(TINY if path == PRETRAIN else {}), **overrides}
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    c.lock()
    return c


def cli_flags(path: str = PRETRAIN, arg: str = "smoke", **overrides) -> list[str]:
    """The same configuration as command-line flags."""
    changes = {**(TINY if path == PRETRAIN else {}), **overrides}
    return [f"--config={path}:{arg}"] + [f"--config.{k}={v}" for k, v in changes.items()]


def env(devices: int | None = None) -> dict[str, str]:
    e = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             TRANSFORMERS_OFFLINE="1", PYTHONPATH=REPO)
    if _cache_dir is not None:
        e.update(_CACHE_ENV, JAX_COMPILATION_CACHE_DIR=_cache_dir)
    if devices:
        e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    else:
        e.pop("XLA_FLAGS", None)
    return e


def train_cmd(workdir: str, flags: list[str], extra: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "gqa_uptrain.train", f"--workdir={workdir}", *flags, *extra]


def run(cmd: list[str], timeout: float = 180, devices: int | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=REPO, env=env(devices), capture_output=True, text=True,
                         timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out


def run_together(cmds: list[list[str]], devices: int | None = None, timeout: float = 300
                 ) -> list[str]:
    """Runs the commands at once (the processes of one jax.distributed job), waits for all, kills
    any left after `timeout`, and returns their stdouts; AssertionError with the stderr's tail if
    one failed."""
    procs = [subprocess.Popen(c, cwd=REPO, env=env(devices), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in cmds]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outputs]


def metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


TIMING_KEYS = ("train/tokens_per_s",)


def deterministic(records: list[dict]) -> list[dict]:
    """Metrics without the wall-clock ones."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def final_params(workdir: str) -> dict[str, np.ndarray]:
    from gqa_uptrain import checkpoints

    params, _, _ = checkpoints.restore(checkpoints.latest_checkpoint(workdir))
    return {k: np.asarray(v) for k, v in params.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- compilation cache
# Compilation, not compute, is what these tests spend their time on; the same tiny programs are
# compiled by several tests and subprocesses, so they share jax's persistent compilation cache
# (results are bit-identical: a cached executable is the same machine code).

_CACHE_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
_cache_dir: str | None = None


def compilation_cache(tmp_path_factory):
    """Generator for a module fixture: turns the persistent cache on in this process (and, through
    env(), in subprocesses) for the module's tests, then restores jax's settings."""
    import jax
    from jax._src import compilation_cache as cc

    global _cache_dir
    if _cache_dir is None:
        _cache_dir = str(tmp_path_factory.getbasetemp() / "jax_compilation_cache")
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update("jax_compilation_cache_dir", _cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cc.reset_cache()
    try:
        yield _cache_dir
    finally:
        for n, v in old.items():
            jax.config.update(n, v)
        cc.reset_cache()


# ----------------------------------------------------------------------------- a real tokenizer


def stdlib_text(name: str = "argparse.py", size: int | None = None) -> str:
    from gqa_uptrain import data

    with open(os.path.join(data.stdlib_root(), name), encoding="utf-8") as f:
        return f.read()[:size]


def make_bpe_tokenizer(path: str, vocab_size: int = 320) -> str:
    """Trains a byte-level BPE tokenizer on stdlib text with a Llama-like BOS rule ('<s>' before
    every text); saves tokenizer.json at `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([stdlib_text("argparse.py"), stdlib_text("textwrap.py")], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(path)
    return path


def data_spec(**overrides):
    """A data.DataSpec of the stdlib corpus in 32-token windows (byte tokenizer), with
    `overrides` applied."""
    from gqa_uptrain import data

    d = dict(source="stdlib", path="", val_path="", hf_name="", hf_config="", train_split="train",
             val_split="", text_field="text", val_fraction=0.02, tokenizer="byte", seq_len=32,
             cache_dir="")
    d.update(overrides)
    return data.DataSpec(**d)

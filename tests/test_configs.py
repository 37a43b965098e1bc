"""configs/pretrain.py and configs/uptrain.py: the blocks they share (gqa_uptrain/config_blocks.py)
and the values that are each one's own, variant by variant."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

import _helpers_train as h
from gqa_uptrain import config_blocks


def _get(path: str, arg: str | None) -> dict:
    return h.load_config_module(path).get_config(arg).to_dict()


def _differing(a: dict, b: dict) -> set[str]:
    assert set(a) == set(b)
    return {k for k in a if a[k] != b[k]}


@pytest.mark.parametrize("arg", [None, "smoke"])
def test_uptraining_shares_pretrainings_data_optimizer_and_output_blocks(arg):
    """As in the paper, uptraining continues pretraining on the same data (and split) with the same
    optimizer; what differs is only what configs/uptrain.py documents as its own."""
    pre, up = _get(h.PRETRAIN, arg), _get(h.UPTRAIN, arg)
    assert _differing(pre["data"], up["data"]) == {"tokenizer"}
    assert (pre["data"]["tokenizer"], up["data"]["tokenizer"]) == ("byte", "auto")
    assert _differing(pre["optimizer"], up["optimizer"]) == {"learning_rate", "warmup_steps"}
    assert pre["mesh"] == up["mesh"] == {"data": -1, "fsdp": 1, "tensor": 1}
    own = {"seed", "model", "num_steps", "alpha", "log_every", "eval_every", "checkpoint_every"}
    assert _differing(pre, up) - {"data", "optimizer"} <= own
    for key in ("batch_size", "grad_accum_steps", "remat", "attention_implementation",
                "param_dtype", "compute_dtype", "scan_layers", "loss_chunk_size",
                "eval_batches", "final_eval_batches", "keep_checkpoints", "progress_bar",
                "init_checkpoint", "convert_seed", "init_optimizer_state", "distill"):
        assert pre[key] == up[key], key


def test_the_values_each_variant_documents():
    pre = _get(h.PRETRAIN, None)
    assert pre["data"] == {
        "source": "stdlib", "path": "", "val_path": "", "hf_name": "", "hf_config": "",
        "train_split": "train", "val_split": "", "text_field": "text", "val_fraction": 0.02,
        "tokenizer": "byte", "seq_len": 256, "cache_dir": "", "streaming": True, "prefetch": 2}
    assert pre["optimizer"] == {
        "learning_rate": 3e-3, "schedule": "cosine", "warmup_steps": 30, "decay_fraction": 0.2,
        "min_lr_ratio": 0.1, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.1,
        "clip_norm": 1.0}
    assert {k: pre[k] for k in ("seed", "num_kv_heads", "num_steps", "alpha", "batch_size",
                                "log_every", "eval_every", "eval_batches", "final_eval_batches",
                                "checkpoint_every", "keep_checkpoints", "progress_bar")} == {
        "seed": 0, "num_kv_heads": -1, "num_steps": 350, "alpha": 0.0, "batch_size": 16,
        "log_every": 10, "eval_every": 100, "eval_batches": 4, "final_eval_batches": -1,
        "checkpoint_every": 100, "keep_checkpoints": 3, "progress_bar": True}
    assert {k: pre["model"][k] for k in ("d_model", "num_layers", "num_heads", "mlp_dim",
                                         "vocab_size")} == {
        "d_model": 256, "num_layers": 4, "num_heads": 8, "mlp_dim": 768, "vocab_size": 257}
    assert "dtype" not in pre["model"] and "param_dtype" not in pre["model"]  # the policy's keys
    assert {k: pre[k] for k in ("param_dtype", "compute_dtype", "scan_layers", "remat",
                                "loss_chunk_size")} == {
        "param_dtype": "float32", "compute_dtype": "auto", "scan_layers": True, "remat": "none",
        "loss_chunk_size": 512}

    base = _get(h.PRETRAIN, "size=base")
    assert (base["model"]["d_model"], base["compute_dtype"], base["data"]["seq_len"],
            base["batch_size"], base["num_steps"], base["optimizer"]["learning_rate"],
            base["optimizer"]["warmup_steps"], base["eval_every"], base["eval_batches"],
            base["checkpoint_every"]) == (768, "auto", 1024, 64, 20000, 6e-4, 1000, 1000,
                                          16, 1000)
    assert _differing(base["data"], pre["data"]) == {"seq_len"}

    up = _get(h.UPTRAIN, None)
    assert (up["seed"], up["model"], up["num_kv_heads"], up["convert_method"], up["num_steps"],
            up["alpha"], up["optimizer"]["learning_rate"], up["optimizer"]["warmup_steps"],
            up["log_every"], up["eval_every"], up["checkpoint_every"]) == (
        1, None, -1, "mean", -1, 0.05, 1e-3, 5, 5, 10, 10)
    g2 = _get(h.UPTRAIN, "num_kv_heads=2,method=first")
    assert _differing(g2, up) == {"num_kv_heads", "convert_method"}
    assert (g2["num_kv_heads"], g2["convert_method"]) == (2, "first")

    for path, steps, warmup, every in ((h.PRETRAIN, 20, 5, 10), (h.UPTRAIN, 10, 2, 5)):
        smoke = _get(path, "smoke")
        assert (smoke["data"]["seq_len"], smoke["batch_size"], smoke["num_steps"],
                smoke["optimizer"]["warmup_steps"], smoke["log_every"], smoke["eval_every"],
                smoke["eval_batches"], smoke["final_eval_batches"],
                smoke["checkpoint_every"]) == (64, 8, steps, warmup, 5, every, 2, 4, every)


def test_a_block_refuses_an_unknown_key():
    with pytest.raises(TypeError, match="unknown keys"):
        config_blocks.data_block(tokenizer="byte", seqlen=64)
    with pytest.raises(TypeError, match="unknown keys"):
        config_blocks.optimizer_block(learning_rate=1e-3, warmup_steps=1, lr=1)
    assert config_blocks.data_block(tokenizer="byte", seq_len=64).seq_len == 64


def test_configs_load_by_path_from_another_directory(tmp_path):
    """--config takes any path: a config file imports the shared blocks from the package, never a
    sibling file, and the package never imports configs/."""
    code = ("import importlib.util, sys\n"
            "for p in sys.argv[1:]:\n"
            "    s = importlib.util.spec_from_file_location('c', p)\n"
            "    m = importlib.util.module_from_spec(s); s.loader.exec_module(m)\n"
            "    m.get_config('smoke')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", code, h.PRETRAIN, h.UPTRAIN], cwd=tmp_path, env=env,
                   check=True)
    for path in glob.glob(os.path.join(h.REPO, "gqa_uptrain", "**", "*.py"), recursive=True):
        with open(path) as f:
            source = f.read()
        assert "from configs" not in source and "import configs" not in source, path

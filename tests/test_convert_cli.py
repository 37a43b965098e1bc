"""The converter's command line: this project's checkpoints, format crossings, the printed summary,
every bad input of the issue (message, exit status, nothing left behind), and streaming memory."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from gqa_uptrain import checkpoints, convert, hf, hf_stream, pooling
from gqa_uptrain import model as model_lib
from gqa_uptrain.byte_tokenizer import write_byte_tokenizer

from _hf_helpers import (REPO, hf_logits, jax_logits, listing, make_hf_folder,
                         pooled_reference_model, random_params, read_safetensors_folder, run_cli,
                         tokens)

TOL = 1e-4
CONFIG = model_lib.ModelConfig(vocab_size=260, d_model=32, num_layers=2, num_heads=4,
                               num_kv_heads=4, mlp_dim=64, qkv_bias=True)


def _summary_lines(stdout):
    return {line.split(":")[0]: line.split(":", 1)[1].strip() for line in stdout.splitlines()
            if ":" in line and not line.startswith("converted")}


def _direct_mean(value, axis, g):
    heads = np.moveaxis(value, axis, 0).astype(np.float64)
    r = heads.shape[0] // g
    return np.moveaxis(np.stack([heads[j * r:(j + 1) * r].mean(0) for j in range(g)]), 0, axis)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A checkpoint of this project (step 100), and a workdir holding steps 50 and 100."""
    root = tmp_path_factory.mktemp("ckpt")
    params = random_params(CONFIG, seed=2)
    path = str(root / "mha")
    checkpoints.save(path, params, checkpoints.Meta(CONFIG, step=100, provenance={"run": "t"}))
    workdir = str(root / "workdir")
    for step in (50, 100):
        checkpoints.save_step(workdir, params, checkpoints.Meta(CONFIG, step=step, source_step=1000))
    return {"path": path, "workdir": workdir, "params": params}


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "llama"
    make_hf_folder(folder)
    write_byte_tokenizer(str(folder))
    return str(folder)


def test_checkpoint_to_checkpoint(ckpt, tmp_path):
    out = tmp_path / "gqa2"
    result = run_cli(f"--input={ckpt['path']}", f"--output={out}", "--num_kv_heads=2")
    assert result.returncode == 0, result.stderr
    params, meta, opt_state = checkpoints.restore(str(out))
    assert opt_state is None and not os.path.exists(out / "opt_state")
    assert meta.model_config == CONFIG.replace(num_kv_heads=2)
    assert (meta.step, meta.source_step, meta.data_position) == (0, 100, None)
    prov = meta.provenance
    assert (prov["method"], prov["seed"], prov["num_kv_heads_before"], prov["num_kv_heads_after"]) == (
        "mean", 0, 4, 2)
    assert prov["converted_from"] == os.path.abspath(ckpt["path"])
    assert prov["source"]["step"] == 100 and prov["source"]["provenance"] == {"run": "t"}
    for name, value in ckpt["params"].items():
        axis = pooling.kv_param_head_axis(name)
        if axis is None:
            np.testing.assert_array_equal(np.asarray(params[name]), value)
        else:
            np.testing.assert_allclose(np.asarray(params[name]), _direct_mean(value, axis, 2),
                                       rtol=1e-6, atol=1e-7)
    # The printed summary, against independent arithmetic.
    lines = _summary_lines(result.stdout)
    kv_params = sum(v.size for k, v in ckpt["params"].items() if ".attn.k_" in k or ".attn.v_" in k)
    assert lines["layers converted"] == "2"
    assert lines["KV heads"].startswith("4 -> 2")
    assert lines["KV projection parameters"] == f"{kv_params:,} -> {kv_params // 2:,}"
    before = model_lib.kv_cache_bytes_per_token(CONFIG)
    after = model_lib.kv_cache_bytes_per_token(meta.model_config)
    assert before == 2 * 2 * 4 * 8 * 4
    assert lines["KV-cache bytes per token (float32)"] == f"{before:,} -> {after:,}"


def test_workdir_latest_and_source_step_chain(ckpt, tmp_path):
    first = convert.convert_checkpoint(ckpt["workdir"], str(tmp_path / "g2"), 2)
    assert first["input"].endswith(os.path.join("checkpoints", "100"))
    meta = checkpoints.read_meta(str(tmp_path / "g2"))
    assert meta.source_step == 1100  # step 100 of a run that itself started from 1000 steps
    convert.convert_checkpoint(str(tmp_path / "g2"), str(tmp_path / "g1"), 1, method="first")
    meta = checkpoints.read_meta(str(tmp_path / "g1"))
    assert (meta.step, meta.source_step, meta.model_config.num_kv_heads) == (0, 1100, 1)
    assert meta.provenance["source"]["provenance"]["method"] == "mean"


def test_checkpoint_to_hf_runs_in_transformers(ckpt, tmp_path):
    out = tmp_path / "hf"
    result = run_cli(f"--input={ckpt['path']}", f"--output={out}", "--num_kv_heads=1",
                     "--output_format=hf")
    assert result.returncode == 0, result.stderr
    assert "tokenizer: byte-level" in result.stdout
    params, config = hf.load_hf_model(str(out))
    assert config == CONFIG.replace(num_kv_heads=1)
    toks = tokens(vocab=260)
    got = hf_logits(str(out), toks)
    np.testing.assert_allclose(got, jax_logits(params, config, toks), atol=TOL, rtol=0)
    # ... and those params are the directly pooled ones.
    for name in ("layers.1.attn.k_proj", "layers.0.attn.v_bias"):
        axis = 1 if name.endswith("proj") else 0
        np.testing.assert_allclose(params[name], _direct_mean(ckpt["params"][name], axis, 1),
                                   rtol=1e-6, atol=1e-7)
    with open(out / hf.PROVENANCE_FILE) as f:
        assert json.load(f)["source"]["step"] == 100


def test_hf_to_checkpoint_and_back(hf_src, tmp_path):
    ck = tmp_path / "ck"
    result = run_cli(f"--input={hf_src}", f"--output={ck}", "--num_kv_heads=2",
                     "--output_format=checkpoint")
    assert result.returncode == 0, result.stderr
    params, meta, _ = checkpoints.restore(str(ck))
    assert (meta.step, meta.source_step) == (0, None)
    assert meta.provenance["hf_config"]["num_key_value_heads"] == 2
    toks = tokens()
    want = hf_logits(pooled_reference_model(hf_src, 2), toks)
    np.testing.assert_allclose(jax_logits(params, meta.model_config, toks), want, atol=TOL, rtol=0)
    # Export after "uptraining" (here: none; G stays 2): the original config's other fields and
    # its tokenizer come back, and the tensors equal the streaming HF -> HF conversion's.
    back = tmp_path / "back"
    result = run_cli(f"--input={ck}", f"--output={back}", "--num_kv_heads=2", "--output_format=hf")
    assert result.returncode == 0, result.stderr
    assert f"tokenizer: copied from {hf_src}" in result.stdout
    stream = tmp_path / "stream"
    hf_stream.convert_hf_folder(hf_src, str(stream), 2)
    assert read_safetensors_folder(back) == read_safetensors_folder(stream)
    with open(back / "config.json") as f, open(stream / "config.json") as g:
        exported, streamed = json.load(f), json.load(g)
    for key in ("bos_token_id", "eos_token_id", "max_position_embeddings", "rope_parameters",
                "initializer_range", "num_key_value_heads", "architectures"):
        assert exported[key] == streamed[key], key
    assert os.path.isfile(back / "tokenizer.json")
    # checkpoint -> checkpoint carries the tokenizer.json copy and keeps the HF config at the top
    # level.
    convert.convert_checkpoint(str(ck), str(tmp_path / "ck1"), 1)
    prov = checkpoints.read_meta(str(tmp_path / "ck1")).provenance
    assert prov["tokenizer"] == "tokenizer.json"
    assert prov["tokenizer_source"] == os.path.join(hf_src, "tokenizer.json")
    assert checkpoints.tokenizer_spec(str(tmp_path / "ck1")) == str(tmp_path / "ck1" / "tokenizer.json")
    assert prov["hf_config"]["num_key_value_heads"] == 1


def test_export_of_a_trained_checkpoint_finds_its_hf_ancestor(hf_src, tmp_path):
    """A checkpoint as train.py writes it after uptraining from an HF folder (provenance 'init' and
    'tokenizer', no 'hf_config') exports with that folder's config fields and tokenizer."""
    params, config = hf.load_hf_model(hf_src)
    trained = str(tmp_path / "trained")
    checkpoints.save(trained, params, checkpoints.Meta(config, step=7, provenance={
        "init": {"hf_folder": hf_src}, "tokenizer": os.path.join(hf_src, "tokenizer.json")}))
    summary = convert.convert(trained, str(tmp_path / "out"), 4, output_format="hf")
    assert summary["tokenizer"] == f"copied from {hf_src}"
    with open(os.path.join(hf_src, "config.json")) as f, open(tmp_path / "out" / "config.json") as g:
        original, exported = json.load(f), json.load(g)
    assert exported == original  # G unchanged: the same config.json, field for field
    assert read_safetensors_folder(tmp_path / "out") == read_safetensors_folder(hf_src)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        ["config.json", "generation_config.json", "gqa_conversion.json", "model.safetensors",
         "tokenizer.json", "tokenizer_config.json"])


# ----------------------------------------------------------------------------- bad input

def _edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def _edit_weights(folder, fn):
    path = os.path.join(folder, "model.safetensors")
    weights = load_file(path)
    fn(weights)
    save_file(weights, path, metadata={"format": "pt"})


def _truncate(folder):
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)


def _corrupt_header(folder):
    with open(os.path.join(folder, "model.safetensors"), "r+b") as f:
        f.seek(10)
        f.write(b"\x00garbage\xff")


def _no_config(folder):
    os.remove(os.path.join(folder, "config.json"))


def _only_bin(folder):
    os.remove(os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "pytorch_model.bin"), "wb") as f:
        f.write(b"pickle")


# id -> (edit of a copy of the source folder, CLI args beyond --input/--output, stderr must contain)
BAD_HF = {
    "g-not-dividing": (None, ["--num_kv_heads=3"], "num_kv_heads=3 does not divide the model's 4 KV heads"),
    "g-zero": (None, ["--num_kv_heads=0"], "num_kv_heads=0 must be >= 1"),
    "g-above-current": (None, ["--num_kv_heads=8"], "num_kv_heads=8 is more than the model's 4 KV heads"),
    "missing-tensor": (lambda d: _edit_weights(d, lambda w: w.pop("model.layers.1.self_attn.v_proj.weight")),
                       ["--num_kv_heads=2"], "missing tensor model.layers.1.self_attn.v_proj.weight"),
    "unexpected-tensor": (lambda d: _edit_weights(d, lambda w: w.update(
        {"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)})),
        ["--num_kv_heads=2"], "unexpected tensor model.layers.0.self_attn.q_norm.weight"),
    "shape-vs-config": (lambda d: _edit_config(d, num_key_value_heads=2), ["--num_kv_heads=1"],
                        "tensor model.layers.0.self_attn.k_proj.weight has shape (32, 32) but "
                        "config.json implies (16, 32)"),
    "unsupported-architecture": (lambda d: _edit_config(d, architectures=["GPT2LMHeadModel"]),
                                 ["--num_kv_heads=2"],
                                 "architecture GPT2LMHeadModel is not supported"),
    "unsupported-feature": (lambda d: _edit_config(d, quantization_config={"quant_method": "gptq"}),
                            ["--num_kv_heads=2"], "quantization_config"),
    "truncated-safetensors": (_truncate, ["--num_kv_heads=2"], "truncated or corrupted"),
    "corrupted-safetensors": (_corrupt_header, ["--num_kv_heads=2"], "truncated or corrupted"),
    "no-config-json": (_no_config, ["--num_kv_heads=2"], "not a Hugging Face folder"),
    "no-safetensors": (_only_bin, ["--num_kv_heads=2"],
                       "found pytorch_model.bin; only safetensors weights are supported"),
    "bad-method": (None, ["--num_kv_heads=2", "--method=median"], "invalid choice: 'median'"),
}


def _check_refused(result, message, root, before, code=1):
    assert result.returncode == code, (result.stdout, result.stderr)
    err = result.stderr.strip()
    assert "\n" not in err and err.startswith("error: "), err  # one line
    assert message in err, err
    assert result.stdout == ""
    assert listing(root) == before  # nothing left behind, hidden temporaries included


@pytest.mark.parametrize("case", list(BAD_HF))
def test_bad_hf_input_refused(case, hf_src, tmp_path):
    edit, args, message = BAD_HF[case]
    src = tmp_path / "src"
    shutil.copytree(hf_src, src)
    if edit is not None:
        edit(str(src))
    before = listing(tmp_path)
    result = run_cli(f"--input={src}", f"--output={tmp_path / 'out'}", *args)
    _check_refused(result, message, tmp_path, before, code=2 if case == "bad-method" else 1)


def test_missing_shard_and_mismatched_index(tmp_path):
    src = make_hf_folder(tmp_path / "src", max_shard_size="20KB")
    shard = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))[1]
    moved = tmp_path / "moved.safetensors"
    shutil.move(os.path.join(src, shard), moved)
    before = listing(tmp_path)
    result = run_cli(f"--input={src}", f"--output={tmp_path / 'out'}", "--num_kv_heads=2")
    _check_refused(result, f"shard {shard} listed in model.safetensors.index.json is missing",
                   tmp_path, before)
    # A shard that holds tensors the index places elsewhere.
    shutil.move(moved, os.path.join(src, shard))
    index_path = os.path.join(src, hf.WEIGHTS_INDEX)
    with open(index_path) as f:
        index = json.load(f)
    name = next(n for n, f in index["weight_map"].items() if f == shard)
    index["weight_map"][name] = sorted(set(index["weight_map"].values()))[0]
    with open(index_path, "w") as f:
        json.dump(index, f)
    before = listing(tmp_path)
    result = run_cli(f"--input={src}", f"--output={tmp_path / 'out'}", "--num_kv_heads=2")
    _check_refused(result, f"tensor {name} is in {shard}", tmp_path, before)


def test_missing_input_same_output_and_existing_output(hf_src, tmp_path):
    before = listing(tmp_path)
    result = run_cli(f"--input={tmp_path / 'nope'}", f"--output={tmp_path / 'out'}", "--num_kv_heads=2")
    _check_refused(result, f"input {tmp_path / 'nope'} does not exist", tmp_path, before)

    src = tmp_path / "src"
    shutil.copytree(hf_src, src)
    before = listing(tmp_path)
    result = run_cli(f"--input={src}", f"--output={src}/", "--num_kv_heads=2", "--overwrite")
    _check_refused(result, "is the input", tmp_path, before)

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    before = listing(tmp_path)
    result = run_cli(f"--input={src}", f"--output={out}", "--num_kv_heads=2")
    _check_refused(result, "already exists (pass --overwrite to replace it)", tmp_path, before)
    # An output that contains the input would delete it when replaced.
    result = run_cli(f"--input={src}", f"--output={tmp_path}", "--num_kv_heads=2", "--overwrite")
    _check_refused(result, "contains the input", tmp_path, before)
    # With --overwrite the old output is replaced entirely, and no temporary is left beside it.
    result = run_cli(f"--input={src}", f"--output={out}", "--num_kv_heads=2", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]


def test_bad_checkpoint_input_refused(ckpt, hf_src, tmp_path):
    before = listing(tmp_path)
    result = run_cli(f"--input={ckpt['path']}", f"--output={tmp_path / 'out'}", "--num_kv_heads=3")
    _check_refused(result, "num_kv_heads=3 does not divide the model's 4 KV heads", tmp_path, before)
    # A folder that is neither format.
    (tmp_path / "empty").mkdir()
    before = listing(tmp_path)
    result = run_cli(f"--input={tmp_path / 'empty'}", f"--output={tmp_path / 'out'}",
                     "--num_kv_heads=2")
    _check_refused(result, "has no config.json", tmp_path, before)
    # A feature this project's model lacks, on the way into its checkpoint format (named).
    src = tmp_path / "mistral"
    make_hf_folder(src, arch="mistral", sliding_window=16)
    before = listing(tmp_path)
    result = run_cli(f"--input={src}", f"--output={tmp_path / 'out'}", "--num_kv_heads=2",
                     "--output_format=checkpoint")
    _check_refused(result, "sliding_window=16 is not supported", tmp_path, before)


# ----------------------------------------------------------------------------- streaming memory

_MEASURE = textwrap.dedent("""
    import runpy, sys
    argv = sys.argv[1:]
    if argv:
        sys.argv = ["gqa_uptrain.convert"] + argv
        try:
            runpy.run_module("gqa_uptrain.convert", run_name="__main__")
        except SystemExit as e:
            if e.code:
                raise
    else:  # baseline: the same imports, no conversion
        import gqa_uptrain.convert, gqa_uptrain.hf, ml_dtypes, tokenizers  # noqa
        from safetensors import safe_open  # noqa
    peak = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    heavy = [m for m in ("jax", "torch", "flax", "orbax") if m in sys.modules]
    print("PEAK_KB", peak, "HEAVY", ",".join(heavy) or "-", file=sys.stderr)
""")


def _peak_kb(*args):
    result = subprocess.run([sys.executable, "-c", _MEASURE, *map(str, args)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    line = [l for l in result.stderr.splitlines() if l.startswith("PEAK_KB")][-1].split()
    return int(line[1]), line[3], result.stdout


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_streaming_peak_rss_is_bounded(tmp_path):
    """A ~390 MB two-shard Llama folder (d_model 1024, 16 heads, vocab 32000 fp32 — a 131 MB
    embedding, as Llama-2's) converts HF -> HF in a subprocess whose peak RSS stays within 64 MB of
    the same interpreter's baseline with the same imports; without jax or torch."""
    d, heads, head_dim, mlp, layers, vocab = 1024, 16, 64, 2816, 5, 32000
    src = tmp_path / "big"
    src.mkdir()
    rng = np.random.default_rng(0)
    block = rng.standard_normal(2**20).astype(np.float32)

    def fill(*shape):  # cheap deterministic values: a random block tiled
        return np.resize(block, shape)

    shards = [{"model.embed_tokens.weight": fill(vocab, d), "model.norm.weight": fill(d)}, {}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shard = shards[0 if i < 2 else 1]
        shard[p + "input_layernorm.weight"] = fill(d)
        shard[p + "post_attention_layernorm.weight"] = fill(d)
        for kind in "qkvo":
            shard[p + f"self_attn.{kind}_proj.weight"] = fill(heads * head_dim, d)
        shard[p + "mlp.gate_proj.weight"] = fill(mlp, d)
        shard[p + "mlp.up_proj.weight"] = fill(mlp, d)
        shard[p + "mlp.down_proj.weight"] = fill(d, mlp)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(shard, str(src / name), metadata={"format": "pt"})
        weight_map.update({n: name for n in shard})
    k_proj = shards[1]["model.layers.4.self_attn.k_proj.weight"].copy()
    del shards
    with open(src / hf.WEIGHTS_INDEX, "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(src / "config.json", "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": d,
                   "num_attention_heads": heads, "num_key_value_heads": heads,
                   "num_hidden_layers": layers, "intermediate_size": mlp, "vocab_size": vocab,
                   "tie_word_embeddings": True, "dtype": "float32"}, f)
    size_mb = sum(os.path.getsize(src / n) for n in os.listdir(src)) / 2**20
    assert size_mb > 350

    baseline_kb, _, _ = _peak_kb()
    peak_kb, heavy, stdout = _peak_kb(f"--input={src}", f"--output={tmp_path / 'out'}",
                                      "--num_kv_heads=4")
    assert "KV heads: 16 -> 4" in stdout
    assert heavy == "-"  # the HF -> HF path imports neither jax nor torch
    growth_mb = (peak_kb - baseline_kb) / 1024
    print(f"baseline {baseline_kb / 1024:.0f} MB, peak {peak_kb / 1024:.0f} MB, model {size_mb:.0f} MB")
    assert growth_mb < 64, f"peak RSS grew {growth_mb:.0f} MB over baseline for a {size_mb:.0f} MB model"
    with safe_open(str(tmp_path / "out" / "model-00002-of-00002.safetensors"), "numpy") as f:
        got = f.get_tensor("model.layers.4.self_attn.k_proj.weight")
    want = k_proj.reshape(4, 4, head_dim, d).mean(axis=1).reshape(4 * head_dim, d)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # pytest keeps the last runs' temporary folders: do not leave ~700 MB behind in each.
    shutil.rmtree(src)
    shutil.rmtree(tmp_path / "out")


# ----------------------------------------------------------------------------- rough edges

def test_num_kv_heads_defaults_to_the_current_count(ckpt, hf_src, tmp_path):
    """Without --num_kv_heads nothing is pooled: checkpoint -> hf exports the params as they are,
    hf -> hf copies the tensors."""
    summary = convert.convert(ckpt["path"], str(tmp_path / "hf"), output_format="hf")
    assert (summary["num_kv_heads_before"], summary["num_kv_heads_after"]) == (4, 4)
    params, config = hf.load_hf_model(str(tmp_path / "hf"))
    assert config == CONFIG
    for name, value in ckpt["params"].items():
        np.testing.assert_array_equal(params[name], value)
    result = run_cli(f"--input={hf_src}", f"--output={tmp_path / 'copy'}")
    assert result.returncode == 0, result.stderr
    assert "KV heads: 4 -> 4" in result.stdout
    assert read_safetensors_folder(tmp_path / "copy") == read_safetensors_folder(hf_src)


def test_every_flag_has_help(monkeypatch):
    captured = {}
    monkeypatch.setattr(convert._Parser, "parse_args",
                        lambda self, argv=None: captured.setdefault("parser", self))
    convert.parse_args([])
    actions = [a for a in captured["parser"]._actions if a.dest != "help"]
    assert len(actions) >= 12
    assert [a.option_strings for a in actions if not a.help] == []
    num_kv = next(a for a in actions if a.dest == "num_kv_heads")
    assert num_kv.default is None and not num_kv.required and "current count" in num_kv.help


def test_output_folders_respect_the_umask(hf_src, tmp_path):
    old = os.umask(0o027)
    try:
        hf_stream.convert_hf_folder(hf_src, str(tmp_path / "hf"), 2)
        convert.convert(hf_src, str(tmp_path / "ck"), 2, output_format="checkpoint")
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "hf").st_mode & 0o777) == oct(0o750)
    assert oct(os.stat(tmp_path / "ck").st_mode & 0o777) == oct(0o750)
    assert oct(os.stat(tmp_path / "ck" / "params").st_mode & 0o777) == oct(0o750)


# Runs the converter's CLI, but stops for good right after the first shard is written (inside the
# temporary folder), having said so in READY: a deterministic point at which to kill -9 it.
_PAUSED = textwrap.dedent("""
    import runpy, sys, time
    from gqa_uptrain import hf_stream
    ready, argv = sys.argv[1], sys.argv[2:]
    verify = hf_stream.verify_safetensors

    def pause(path, entries):
        verify(path, entries)
        with open(ready, "w") as f:
            f.write(path)
        time.sleep(600)

    hf_stream.verify_safetensors = pause
    sys.argv = ["gqa_uptrain.convert"] + argv
    runpy.run_module("gqa_uptrain.convert", run_name="__main__")
""")


def test_killed_conversion_leaves_no_temporary_for_the_next_run(hf_src, tmp_path):
    import re
    import signal
    import socket
    import time

    root = tmp_path / "root"
    root.mkdir()
    out, ready = root / "out", tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _PAUSED, str(ready), f"--input={hf_src}",
                             f"--output={out}", "--num_kv_heads=2"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    shard = ready.read_text()
    temp = os.path.basename(os.path.dirname(shard))
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())
    assert temp.startswith(f".out.tmp-{host}-{proc.pid}-") and os.path.isfile(shard)
    assert os.listdir(root) == [temp]  # what kill -9 leaves behind
    # Beside it, what the next run must leave alone: a live conversion's temporary (this pid),
    # another destination's dead one, an unrelated hidden folder, an old-style name.
    keep = [f".out.tmp-{host}-{os.getpid()}-abcd1234", f".other.tmp-{host}-{proc.pid}-abcd1234",
            ".out.unrelated", ".out.tmp-abcd1234", f".out.tmp-otherhost-{proc.pid}-abcd1234"]
    for name in keep:
        (root / name).mkdir()
        (root / name / "f").write_text("x")
    result = run_cli(f"--input={hf_src}", f"--output={out}", "--num_kv_heads=2")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(root)) == sorted(keep + ["out"])
    assert all((root / name / "f").read_text() == "x" for name in keep)

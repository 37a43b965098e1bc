"""Hugging Face folders: the real client (transformers on PyTorch CPU) against the converter.

Tiny random Llama / Qwen2 / Mistral models are saved with transformers, converted with the CLI in a
subprocess, loaded back with transformers, and their logits compared with (a) this project's JAX model
loaded from the same converted folder and (b) a reference pooled directly from the source's torch
state dict (tests/_hf_helpers.py) — to 1e-4 in float32 (logits are of order 1-10).
"""

import json
import os

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from gqa_uptrain import convert, hf, hf_stream, pooling
from gqa_uptrain import model as model_lib
from gqa_uptrain.byte_tokenizer import write_byte_tokenizer

from _hf_helpers import (VOCAB, hf_logits, jax_logits, load_hf, make_hf_folder,
                         pooled_reference_model, random_params, read_safetensors_folder, run_cli,
                         tokens)

TOL = 1e-4  # float32 logits, transformers vs JAX vs reference
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}

# id -> (make_hf_folder kwargs, num_kv_heads, method)
CASES = {
    "llama-fp32-G2": (dict(), 2, "mean"),
    "llama-fp32-G1-first": (dict(), 1, "first"),
    "llama-bf16-tied-G1": (dict(dtype="bfloat16", tie=True), 1, "mean"),
    "llama-sharded-G2": (dict(max_shard_size="20KB"), 2, "mean"),
    "llama-head_dim16-G2": (dict(head_dim=16), 2, "mean"),
    "llama-gqa8x4-G2": (dict(hidden=64, num_heads=8, num_kv_heads=4), 2, "mean"),
    "llama-attention_bias-G2": (dict(attention_bias=True), 2, "mean"),
    "llama-rope_llama3-G2": (dict(rope_parameters=LLAMA3_ROPE), 2, "mean"),
    "llama-legacy_rope_linear-G2": (dict(legacy_rope={"type": "linear", "factor": 2.0}), 2, "mean"),
    "qwen2-bias-G1": (dict(arch="qwen2"), 1, "mean"),
    "mistral-G2": (dict(arch="mistral"), 2, "mean"),
}


def _make(folder, legacy_rope=None, **kw):
    make_hf_folder(folder, **kw)
    if legacy_rope is not None:  # rewrite config.json in the pre-5.x rope layout
        path = os.path.join(folder, "config.json")
        with open(path) as f:
            config = json.load(f)
        theta = config.pop("rope_parameters")["rope_theta"]
        config.update(rope_theta=theta, rope_scaling=legacy_rope)
        with open(path, "w") as f:
            json.dump(config, f, indent=2)
    return str(folder)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Source folders, built once per module on first use."""
    root = tmp_path_factory.mktemp("hf_sources")
    cache = {}

    def get(name, **kw):
        if name not in cache:
            cache[name] = _make(root / name, **kw)
        return cache[name]

    return get


def _config_json(folder):
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("case", list(CASES))
def test_real_client_logits(case, sources, tmp_path):
    kw, g, method = CASES[case]
    src = sources(case, **kw)
    out = tmp_path / "out"
    result = run_cli(f"--input={src}", f"--output={out}", f"--num_kv_heads={g}", f"--method={method}")
    assert result.returncode == 0, result.stderr
    assert f"KV heads: {_config_json(src)['num_key_value_heads']} -> {g}" in result.stdout

    # config.json edited, not rebuilt: every other field as written (either rope layout).
    before, after = _config_json(src), _config_json(out)
    assert after.pop("num_key_value_heads") == g
    before.pop("num_key_value_heads")
    assert after == before

    toks = tokens()
    converted = load_hf(str(out))
    assert converted.config.num_key_value_heads == g
    got = hf_logits(converted, toks)
    # (b) a reference pooled directly from the source's state dict
    want = hf_logits(pooled_reference_model(src, g, method), toks)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    # (a) this project's JAX model on the same converted folder
    params, config = hf.load_hf_model(str(out))
    assert config.num_kv_heads == g
    np.testing.assert_allclose(jax_logits(params, config, toks), got, atol=TOL, rtol=0)
    # The comparison can fail: pooling distinct heads changed the model.
    assert np.abs(got - hf_logits(src, toks)).max() > 1e-2
    assert np.abs(got).max() > 1


def test_identity_when_g_equals_k_is_bit_exact(sources, tmp_path):
    src = sources("llama-bf16-tied-G1", **CASES["llama-bf16-tied-G1"][0])
    out = tmp_path / "out"
    assert run_cli(f"--input={src}", f"--output={out}", "--num_kv_heads=4").returncode == 0
    assert read_safetensors_folder(out) == read_safetensors_folder(src)
    assert _config_json(out) == _config_json(src)


def test_lossless_when_heads_equal_within_groups(tmp_path):
    src = make_hf_folder(tmp_path / "src", num_heads=8, num_kv_heads=8, hidden=64,
                         equal_kv_groups=4)
    out = tmp_path / "out"
    assert run_cli(f"--input={src}", f"--output={out}", "--num_kv_heads=2").returncode == 0
    toks = tokens()
    want = hf_logits(src, toks)
    np.testing.assert_allclose(hf_logits(str(out), toks), want, atol=1e-5, rtol=0)
    params, config = hf.load_hf_model(str(out))
    np.testing.assert_allclose(jax_logits(params, config, toks), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("method", ["mean", "first"])
def test_streaming_path_equals_import_pool_export(method, sources, tmp_path):
    """HF -> HF (streaming, HF layout) and import -> convert_params -> export (this project's layout)
    give bit-identical tensors."""
    kw = CASES["llama-attention_bias-G2"][0]
    src = sources("llama-attention_bias-G2", **kw)
    hf_stream.convert_hf_folder(src, str(tmp_path / "stream"), 2, method)
    params, config = hf.load_hf_model(src)
    pooled, new_config = pooling.convert_params(params, config, 2, method)
    hf.export_hf(pooled, new_config, str(tmp_path / "export"), base_hf_config=_config_json(src))
    assert read_safetensors_folder(tmp_path / "stream") == read_safetensors_folder(tmp_path / "export")


@pytest.mark.parametrize("case", ["llama-fp32-G2", "llama-bf16-tied-G1", "llama-sharded-G2",
                                  "llama-attention_bias-G2", "qwen2-bias-G1", "mistral-G2",
                                  "llama-legacy_rope_linear-G2", "llama-rope_llama3-G2"])
def test_import_export_round_trip_is_bit_exact(case, sources, tmp_path):
    src = sources(case, **CASES[case][0])
    params, config = hf.load_hf_model(src)
    base = _config_json(src)
    hf.export_hf(params, config, str(tmp_path / "out"), base_hf_config=base,
                 max_shard_bytes=20_000 if "sharded" in case else hf.DEFAULT_MAX_SHARD_BYTES)
    assert read_safetensors_folder(tmp_path / "out") == read_safetensors_folder(src)
    assert base["architectures"] == _config_json(tmp_path / "out")["architectures"]
    params2, config2 = hf.load_hf_model(str(tmp_path / "out"))
    assert config2 == config
    toks = tokens()
    np.testing.assert_array_equal(hf_logits(str(tmp_path / "out"), toks), hf_logits(src, toks))


EXPORT_CONFIGS = {
    "untied-bytes": dict(vocab_size=260),
    "tied-bf16": dict(vocab_size=256, tie_embeddings=True, param_dtype="bfloat16", dtype="bfloat16"),
    "qwen2-qkv_bias": dict(qkv_bias=True, num_kv_heads=2),
    "llama-attention_bias-head_dim": dict(qkv_bias=True, o_bias=True, head_dim=16),
    "rope-llama3": dict(rope_theta=5e4, rope_scaling=tuple(sorted(
        {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}.items()))),
}


@pytest.mark.parametrize("name", list(EXPORT_CONFIGS))
def test_export_runs_in_transformers_and_imports_back(name, tmp_path):
    kw = dict(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=64)
    kw.update(EXPORT_CONFIGS[name])
    config = model_lib.ModelConfig(**kw)
    params = random_params(config, seed=1)
    out = str(tmp_path / "out")
    hf.export_hf(params, config, out)
    arch = _config_json(out)["architectures"][0]
    assert arch == ("Qwen2ForCausalLM" if name.startswith("qwen2") else "LlamaForCausalLM")
    back, config_back = hf.load_hf_model(out)
    assert config_back == config
    assert set(back) == set(params)
    for k in params:
        assert back[k].dtype == params[k].dtype and back[k].tobytes() == params[k].tobytes(), k
    toks = tokens(vocab=config.vocab_size)
    np.testing.assert_allclose(hf_logits(out, toks), jax_logits(params, config, toks), atol=TOL,
                               rtol=0)
    if config.vocab_size >= 256:  # a model trained on bytes ships a byte-level tokenizer
        tok = transformers.AutoTokenizer.from_pretrained(out)
        text = "héllo, wörld\n\t{}"
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
        model = load_hf(out)
        generated = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False)
        assert generated.shape == (1, len(ids) + 3)
    else:
        assert not os.path.exists(os.path.join(out, "tokenizer.json"))


@pytest.mark.parametrize("arch,kw,feature", [
    ("mistral", dict(sliding_window=8), "sliding_window=8"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=0),
     "use_sliding_window"),
    ("llama", dict(mlp_bias=True), "mlp_bias"),
    ("llama", dict(hidden_act="gelu"), "hidden_act='gelu'"),
    ("llama", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0,
                                    "original_max_position_embeddings": 16}), "'yarn'"),
])
def test_unsupported_features_refused_on_import_but_converted_hf_to_hf(arch, kw, feature, tmp_path,
                                                                        capsys):
    src = make_hf_folder(tmp_path / "src", arch=arch, **kw)
    with pytest.raises(ValueError, match=feature.replace("(", r"\(")):
        hf.load_hf_model(src)
    # HF -> HF: pooling does not touch these features; transformers runs the result as the reference.
    out = tmp_path / "out"
    result = run_cli(f"--input={src}", f"--output={out}", "--num_kv_heads=2")
    assert result.returncode == 0, result.stderr
    toks = tokens(seq=20)
    np.testing.assert_allclose(hf_logits(str(out), toks),
                               hf_logits(pooled_reference_model(src, 2), toks), atol=TOL, rtol=0)
    # ... and the converter refuses the same folder into this project's format, naming the feature
    # (in process here; test_convert_cli.py runs this path as a subprocess).
    capsys.readouterr()  # drop transformers' progress bars
    code = convert.main([f"--input={src}", f"--output={tmp_path / 'ckpt'}", "--num_kv_heads=2",
                         "--output_format=checkpoint"])
    err = capsys.readouterr().err
    assert code == 1 and feature in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "ckpt")


def test_buffers_dropped_stale_weights_not_copied_tokenizer_copied(tmp_path):
    src = make_hf_folder(tmp_path / "src", tie=True)
    weights = load_file(os.path.join(src, "model.safetensors"))
    # An older save: per-layer rotary buffers, and a redundant tied lm_head.weight.
    for i in range(2):
        weights[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].copy()
    save_file(weights, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    write_byte_tokenizer(src)
    for stale in ("pytorch_model.bin", "pytorch_model.bin.index.json", "consolidated.safetensors",
                  "params.json", "original/consolidated.00.pth"):
        os.makedirs(os.path.dirname(os.path.join(src, stale)), exist_ok=True)
        with open(os.path.join(src, stale), "wb") as f:
            f.write(b"stale weights")
    out = tmp_path / "out"
    result = run_cli(f"--input={src}", f"--output={out}", "--num_kv_heads=1")
    assert result.returncode == 0, result.stderr
    assert "dropped buffers: 2" in result.stdout
    assert sorted(os.listdir(out)) == sorted([
        "config.json", "generation_config.json", "gqa_conversion.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json"])
    names = set(read_safetensors_folder(out))
    assert not any("inv_freq" in n for n in names) and "lm_head.weight" in names
    toks = tokens()
    np.testing.assert_allclose(hf_logits(str(out), toks),
                               hf_logits(pooled_reference_model(src, 1), toks), atol=TOL, rtol=0)
    params, config = hf.load_hf_model(str(out))  # the tied duplicate is dropped on import
    assert "lm_head" not in params and config.tie_embeddings
    assert hf.tokenizer_path(str(out)) == os.path.join(str(out), "tokenizer.json")


def test_output_files_metadata_and_provenance(sources, tmp_path):
    src = sources("llama-sharded-G2", **CASES["llama-sharded-G2"][0])
    out = tmp_path / "out"
    assert run_cli(f"--input={src}", f"--output={out}", "--num_kv_heads=1",
                   "--method=random", "--seed=7").returncode == 0
    in_shards = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    out_shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert out_shards == in_shards and len(in_shards) > 2  # same shard layout
    total = 0
    for f in out_shards:
        with safe_open(os.path.join(out, f), framework="pt") as st:
            assert st.metadata() == {"format": "pt"}
        assert os.path.getsize(os.path.join(out, f)) <= os.path.getsize(os.path.join(src, f))
        assert os.path.getsize(os.path.join(out, f)) >= 0.5 * os.path.getsize(os.path.join(src, f))
    with open(os.path.join(out, hf.WEIGHTS_INDEX)) as f:
        index = json.load(f)
    tensors = read_safetensors_folder(out)
    total = sum(len(b) for _, _, b in tensors.values())
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(tensors)
    with open(os.path.join(out, hf.PROVENANCE_FILE)) as f:
        prov = json.load(f)
    assert prov["converted_from"] == os.path.abspath(src)
    assert (prov["method"], prov["seed"], prov["num_kv_heads_before"], prov["num_kv_heads_after"]) == (
        "random", 7, 4, 1)
    assert prov["converter"].startswith("gqa_uptrain")
    # random: a fresh N(0, initializer_range) K/V, q/o untouched, reproducible under the seed.
    source = read_safetensors_folder(src)
    for name, (dtype, shape, raw) in tensors.items():
        if ".k_proj." in name or ".v_proj." in name:
            assert shape == (8, 32)
            std = np.frombuffer(raw, np.float32).std()
            assert 0.2 < std < 0.4  # initializer_range=0.3
        else:
            assert (dtype, shape, raw) == source[name]
    again = tmp_path / "again"
    assert run_cli(f"--input={src}", f"--output={again}", "--num_kv_heads=1",
                   "--method=random", "--seed=7").returncode == 0
    assert read_safetensors_folder(again) == tensors


def test_a_second_conversion_chains_provenance(sources, tmp_path):
    src = sources("llama-gqa8x4-G2", **CASES["llama-gqa8x4-G2"][0])
    hf_stream.convert_hf_folder(src, str(tmp_path / "g2"), 2)
    summary = hf_stream.convert_hf_folder(str(tmp_path / "g2"), str(tmp_path / "g1"), 1, method="first")
    assert (summary["num_kv_heads_before"], summary["num_kv_heads_after"]) == (2, 1)
    with open(tmp_path / "g1" / hf.PROVENANCE_FILE) as f:
        prov = json.load(f)
    assert (prov["method"], prov["num_kv_heads_before"]) == ("first", 2)
    assert prov["previous"]["converted_from"] == os.path.abspath(src)
    assert prov["previous"]["num_kv_heads_before"] == 4
    # mean of pairs, then the first of the two means == the mean of the first pair of heads.
    params, _ = hf.load_hf_model(str(tmp_path / "g1"))
    source, _ = hf.load_hf_model(src)
    np.testing.assert_allclose(params["layers.0.attn.k_proj"][:, 0],
                               source["layers.0.attn.k_proj"][:, :2].mean(axis=1), rtol=1e-6)

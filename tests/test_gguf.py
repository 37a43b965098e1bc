"""GGUF input (gguf_io.py): a tiny GQA llama GGUF written here with gguf.GGUFWriter, in F32, F16, Q8_0
and Q4_1, Q/K permuted as llama.cpp's convert script does, with a byte-level BPE vocabulary trained
here; checked against transformers' own GGUF loader (logits and token ids), through the converter's
CLI, and its refusals (architecture, SentencePiece vocabulary, tensor type)."""

import json
import os

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import quantize

from gqa_uptrain import checkpoints, formats, gguf_io, loading

from _helpers_train import make_bpe_tokenizer
from _hf_helpers import jax_logits, listing, reference_pool, run_cli

# Both sides read the same dequantized float32 weights: only float32 arithmetic differs.
TOL = 1e-4
V, D, N, K, H, F, L = 300, 64, 4, 2, 16, 128, 2
TEXT = ("def main(argv=None):\n    parser = argparse.ArgumentParser(prog='x')  # 1234 héllo\n"
        "\treturn textwrap.dedent(text) </s> done")
# Tensor types, by role: every type the issue names appears, Q and K in quantized ones.
TYPES = {"token_embd": Q.Q8_0, "output": Q.F16, "attn_q": Q.Q4_1, "attn_k": Q.Q8_0,
         "attn_v": Q.F16, "attn_output": Q.Q4_1, "ffn_gate": Q.Q8_0, "ffn_up": Q.F16,
         "ffn_down": Q.F32}


def _vocab(tmp_dir):
    tok = json.load(open(make_bpe_tokenizer(os.path.join(tmp_dir, "bpe.json"), V)))
    tokens = [None] * len(tok["model"]["vocab"])
    for t, i in tok["model"]["vocab"].items():
        tokens[i] = t
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]
    return tokens, merges


def write_gguf(path, tokens, merges, *, arch="llama", tokenizer_model="gpt2", permute=True,
               odd_tensor=None, seed=0):
    """A tiny llama GGUF as llama.cpp's convert script writes one; returns the float32 weights in
    HF's layout before quantization (for reference)."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter(path, arch)
    w.add_block_count(L)
    w.add_context_length(256)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(N)
    w.add_head_count_kv(K)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(H)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3 if t in ("<s>", "</s>") else 1 for t in tokens])
    w.add_bos_token_id(tokens.index("<s>"))
    w.add_eos_token_id(tokens.index("</s>"))
    w.add_add_bos_token(True)

    def add(name, a, qtype):
        if name == odd_tensor:
            w.add_tensor(name, a.astype(np.float64))  # F64: nothing dequantizes it
        elif qtype == Q.F32:
            w.add_tensor(name, a.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, quantize(a.astype(np.float32), qtype), raw_dtype=qtype)

    def rand(*shape):
        return (0.3 * rng.standard_normal(shape)).astype(np.float32)

    def scale():
        return (1 + 0.2 * rng.standard_normal(D)).astype(np.float32)

    add("token_embd.weight", rand(V, D), TYPES["token_embd"])
    add("output_norm.weight", scale(), Q.F32)
    add("output.weight", rand(V, D), TYPES["output"])
    for i in range(L):
        add(f"blk.{i}.attn_norm.weight", scale(), Q.F32)
        add(f"blk.{i}.ffn_norm.weight", scale(), Q.F32)
        q, k = rand(N * H, D), rand(K * H, D)
        add(f"blk.{i}.attn_q.weight", gguf_io.permute(q, N) if permute else q, TYPES["attn_q"])
        add(f"blk.{i}.attn_k.weight", gguf_io.permute(k, K) if permute else k, TYPES["attn_k"])
        for name, shape in (("attn_v", (K * H, D)), ("attn_output", (D, N * H)),
                            ("ffn_gate", (F, D)), ("ffn_up", (F, D)), ("ffn_down", (D, F))):
            add(f"blk.{i}.{name}.weight", rand(*shape), TYPES[name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return _vocab(str(tmp_path_factory.mktemp("vocab")))


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, vocab):
    folder = tmp_path_factory.mktemp("gguf")
    return write_gguf(str(folder / "tiny.gguf"), *vocab)


def _hf_gguf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


@torch.no_grad()
def _logits(model, toks):
    return model(torch.from_numpy(toks)).logits.float().numpy()


def _tokens(seed=0):
    return np.random.default_rng(seed).integers(0, V, (2, 12)).astype(np.int64)


@pytest.fixture(scope="module")
def hf_model(gguf_file):
    return _hf_gguf_model(gguf_file)


def test_detect_and_inspect(gguf_file):
    assert formats.detect(gguf_file) == "gguf"
    source = loading.inspect(gguf_file)
    c = source.config
    assert (source.format, c.num_heads, c.num_kv_heads, c.head_dim, c.d_model, c.mlp_dim,
            c.num_layers, c.vocab_size, c.tie_embeddings, c.norm_eps) == (
        "gguf", N, K, H, D, F, L, V, False, 1e-5)
    assert source.tokenizer is None
    with pytest.raises(ValueError, match="GGUF file.*--tok"):
        source.require_tokenizer("--tok")


def test_logits_match_transformers_gguf_loader(gguf_file, hf_model):
    params, config, source = loading.load(gguf_file)
    assert source.format == "gguf" and config.param_dtype == "float32"
    assert hf_model.config.num_key_value_heads == K
    toks = _tokens()
    ref = _logits(hf_model, toks)
    assert np.abs(ref).max() > 1  # logits of order 1: the tolerance means something
    np.testing.assert_allclose(jax_logits(params, config, toks), ref, atol=TOL, rtol=0)
    # The dequantized weights themselves agree with transformers' (after both undo the permutation).
    state = hf_model.state_dict()
    tensors, _ = gguf_io.hf_tensors(gguf_file)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"):
        np.testing.assert_array_equal(tensors[name], state[name].numpy())


def test_skipping_the_unpermute_changes_the_logits(gguf_file, hf_model):
    params, config = gguf_io.load_gguf_model(gguf_file, undo_permutation=False)
    toks = _tokens()
    assert np.abs(jax_logits(params, config, toks) - _logits(hf_model, toks)).max() > 0.1
    # ... and with K un-permuted by the query head count (the classic GQA bug) too.
    tensors, _ = gguf_io.hf_tensors(gguf_file)
    raw, _ = gguf_io.hf_tensors(gguf_file, undo_permutation=False)
    k = raw["model.layers.0.self_attn.k_proj.weight"]
    assert not np.array_equal(gguf_io.unpermute(k, N), tensors["model.layers.0.self_attn.k_proj.weight"])
    np.testing.assert_array_equal(gguf_io.unpermute(k, K), tensors["model.layers.0.self_attn.k_proj.weight"])


def test_token_ids_match_transformers(gguf_file, tmp_path):
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf_file),
                                                     gguf_file=os.path.basename(gguf_file))
    ours = gguf_io.build_tokenizer(gguf_file)
    for text in (TEXT, "  leading spaces\n\n", "<s>x</s>", "ünïcode ✓ 中文"):
        ids = ref(text)["input_ids"]
        assert ours.encode(text).ids == ids, text
        assert ids[0] == 0  # BOS, as tokenizer.ggml.add_bos_token says
    assert ours.decode(ours.encode(TEXT).ids, skip_special_tokens=True) == TEXT.replace("</s>", "")


def test_convert_cli_gguf_to_hf_mqa(gguf_file, hf_model, tmp_path):
    out = tmp_path / "g1"
    result = run_cli(f"--input={gguf_file}", f"--output={out}", "--num_kv_heads=1")
    assert result.returncode == 0, result.stderr
    assert "(gguf) ->" in result.stdout and "KV heads: 2 -> 1" in result.stdout
    assert "tokenizer: built from" in result.stdout
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.num_key_value_heads == 1
    assert (model.config.bos_token_id, model.config.eos_token_id) == (0, 1)
    # Independent reference: transformers' own GGUF model with K/V mean-pooled directly.
    config = hf_model.config.__class__.from_dict(hf_model.config.to_dict())
    config.num_key_value_heads = 1
    state = {n: t.numpy() for n, t in hf_model.state_dict().items()}
    for n in state:
        if ".k_proj." in n or ".v_proj." in n:
            state[n] = reference_pool(state[n], 1, H, "mean")
    ref = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ref.load_state_dict({n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in state.items()},
                        strict=True)
    toks = _tokens(1)
    np.testing.assert_allclose(_logits(model, toks), _logits(ref, toks), atol=TOL, rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok(TEXT)["input_ids"] == gguf_io.build_tokenizer(gguf_file).encode(TEXT).ids


def test_convert_gguf_to_checkpoint(gguf_file, tmp_path):
    out = tmp_path / "ckpt"
    result = run_cli(f"--input={gguf_file}", f"--output={out}", "--output_format=checkpoint",
                     "--num_kv_heads=2")
    assert result.returncode == 0, result.stderr
    meta = checkpoints.read_meta(str(out))
    assert meta.model_config.num_kv_heads == 2 and meta.provenance["tokenizer_source"] == gguf_file
    assert os.path.isfile(out / "tokenizer.json")
    params, _, _ = checkpoints.restore(str(out))
    want, _, _ = loading.load(gguf_file)
    for name, value in want.items():
        np.testing.assert_array_equal(np.asarray(params[name]), value)


@pytest.mark.parametrize("case, message", [
    ("arch", "error: .*GGUF architecture 'qwen2' is not supported"),
    ("sentencepiece", "error: .*GGUF tokenizer 'llama' \\(SentencePiece\\) is not supported"),
    ("type", "error: .*bad.gguf: tensor blk.1.ffn_up.weight has type F64, which cannot be dequantized"),
])
def test_refusals(case, message, vocab, tmp_path):
    path = write_gguf(str(tmp_path / "bad.gguf"), *vocab, arch="qwen2" if case == "arch" else "llama",
                      tokenizer_model="llama" if case == "sentencepiece" else "gpt2",
                      odd_tensor="blk.1.ffn_up.weight" if case == "type" else None)
    before = listing(tmp_path)
    for fmt in ("hf", "checkpoint"):
        result = run_cli(f"--input={path}", f"--output={tmp_path / 'out'}", f"--output_format={fmt}")
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and __import__("re").match(message, lines[0]), result.stderr
        assert listing(tmp_path) == before

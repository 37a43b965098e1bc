"""GGUF files (llama.cpp's format) in: llama-architecture models and their byte-level BPE vocabulary.

    hf_config = gguf_io.read_config(path)           # metadata -> a config.json dict (no tensor read)
    params, config = gguf_io.load_gguf_model(path)  # this project's flat params (float32) + ModelConfig
    tok = gguf_io.build_tokenizer(path)             # a `tokenizers.Tokenizer` (tokenizer.json)

Read with the `gguf` library (gguf.GGUFReader, memory-mapped). Every tensor is dequantized to float32
with gguf.quants.dequantize, for every type that library can dequantize (F32, F16, BF16, Q4_0 ... Q8_0,
the K-quants, the IQ types ...); any other type is refused by name. GGUF names are mapped to the
Hugging Face names of hf.LAYOUT_TABLE (_NAMES below), then the table's own transforms give this
project's params, so the layout rules live in one place.

llama.cpp's convert script permutes the rows of Q and K (and their biases) so that each head's
rotary pairs are interleaved (GPT-J style RoPE): row (h, i, j) of [heads, 2, H/2] goes to (h, j, i).
This project's model uses rotate-half RoPE (as transformers' Llama), so `unpermute` undoes it: with
the query head count for Q and the KV head count for K.

Supported: general.architecture 'llama' (refused otherwise, by name), optional attention biases,
tied or untied embeddings, rope scaling 'none' / 'linear'; refused: a rope_freqs tensor (llama3
rope factors), other rope scaling types, any tensor not in _NAMES. Tokenizer: tokenizer.ggml.model
'gpt2' (byte-level BPE) with pre-tokenizers 'default'/'gpt2' (GPT-2's split), 'llama-bpe' (Llama 3's
split) and 'smollm' (digits split one by one, then GPT-2's); 'llama' (SentencePiece) and others are
refused by name. Imports neither jax nor torch at import time.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from gqa_uptrain.model import ModelConfig

ARCHITECTURE = "llama"

# GGUF tensor name -> HF (LAYOUT_TABLE) name; {i} is the layer.
_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


class GGUFError(ValueError):
    """A GGUF file this project cannot read (architecture, tensor type, tokenizer ...), said by name."""


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor; GGUFError for one outside the supported set."""
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    if gguf_name == "rope_freqs.weight":
        raise GGUFError("tensor rope_freqs.weight (llama3 rope frequency factors) is not supported")
    raise GGUFError(f"tensor {gguf_name} is not supported (not part of a llama model this project "
                    "reads)")


# ============================================================================ reading metadata


def _reader(path: str):
    from gguf import GGUFReader  # noqa: PLC0415

    try:
        return GGUFReader(path, "r")
    except Exception as e:  # noqa: BLE001 (the reader raises anything on a damaged file)
        raise GGUFError(f"cannot read GGUF file {path}: {type(e).__name__}: {e}") from None


def _metadata(reader) -> dict[str, Any]:
    """{key: value} of the file's metadata: scalars, strings and lists as Python values."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float):  # float32 in the file: 1e-5, not 9.9999997e-06
            value = float(f"{value:.7g}")
        out[key] = value
    return out


def _architecture(meta: dict[str, Any], path: str) -> str:
    arch = meta.get("general.architecture")
    if arch != ARCHITECTURE:
        raise GGUFError(f"{path}: GGUF architecture {arch!r} is not supported (supported: "
                        f"{ARCHITECTURE!r})")
    return arch


def _hf_config(meta: dict[str, Any], tensors: dict[str, Any], path: str) -> dict[str, Any]:
    """A config.json dict (LlamaForCausalLM) from the metadata and {GGUF name: shape in numpy order}."""
    arch = _architecture(meta, path)

    def key(name, default=None, required=True):
        value = meta.get(f"{arch}.{name}", default)
        if value is None and required:
            raise GGUFError(f"{path}: metadata {arch}.{name} is missing")
        return value

    num_heads = int(key("attention.head_count"))
    d_model = int(key("embedding_length"))
    head_dim = key("rope.dimension_count", None, required=False)
    if head_dim is None:
        head_dim = key("attention.key_length", d_model // num_heads)
    vocab = key("vocab_size", None, required=False)
    if vocab is None:
        if "token_embd.weight" not in tensors:
            raise GGUFError(f"{path}: no token_embd.weight tensor")
        vocab = tensors["token_embd.weight"][0]
    scaling_type = key("rope.scaling.type", "none")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(vocab), "hidden_size": d_model,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")), "num_attention_heads": num_heads,
        "num_key_value_heads": int(key("attention.head_count_kv", num_heads)),
        "head_dim": int(head_dim), "hidden_act": "silu",
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        "max_position_embeddings": int(key("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors, "mlp_bias": False,
        "rope_parameters": {"rope_theta": float(key("rope.freq_base", 10000.0)),
                            "rope_type": "default"},
        "dtype": "float32",
    }
    if scaling_type == "linear":
        config["rope_parameters"].update(rope_type="linear",
                                         factor=float(key("rope.scaling.factor")))
    elif scaling_type != "none":
        raise GGUFError(f"{path}: rope scaling {scaling_type!r} is not supported (none, linear)")
    for name in ("bos", "eos", "padding"):
        token = meta.get(f"tokenizer.ggml.{name}_token_id")
        config[{"padding": "pad"}.get(name, name) + "_token_id"] = (
            None if token is None else int(token))
    return config


def read_config(path: str) -> dict[str, Any]:
    """The file's model as a config.json dict (no tensor read); GGUFError for what is unsupported."""
    reader = _reader(path)
    meta = _metadata(reader)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    config = _hf_config(meta, shapes, path)
    for t in reader.tensors:
        hf_name(t.name)
        _check_type(t, path)
    return config


# ============================================================================ tensors


def _supported_types() -> set:
    from gguf import GGMLQuantizationType as Q  # noqa: PLC0415
    from gguf.quants import _type_traits  # noqa: PLC0415 (the types the library dequantizes)

    return {Q.F32, Q.F16} | set(_type_traits)


def _check_type(tensor, path: str) -> None:
    if tensor.tensor_type not in _supported_types():
        raise GGUFError(f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which cannot be "
                        "dequantized (gguf.quants supports "
                        f"{', '.join(sorted(t.name for t in _supported_types()))})")


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation of Q/K rows (rotate-half -> interleaved pairs), for the writers."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute`: interleaved rotary pairs back to rotate-half order."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def hf_tensors(path: str, *, undo_permutation: bool = True
               ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """({HF name: float32 array in HF's torch layout}, config.json dict) of a GGUF file.
    undo_permutation=False leaves Q/K as llama.cpp stores them (for tests only)."""
    from gguf.quants import dequantize  # noqa: PLC0415

    reader = _reader(path)
    meta = _metadata(reader)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    config = _hf_config(meta, shapes, path)
    names = {t.name: hf_name(t.name) for t in reader.tensors}
    for t in reader.tensors:
        _check_type(t, path)
    out = {}
    for t in reader.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape(shapes[t.name])
        if undo_permutation and ".attn_q." in t.name:
            w = unpermute(w, config["num_attention_heads"])
        elif undo_permutation and ".attn_k." in t.name:
            w = unpermute(w, config["num_key_value_heads"])
        out[names[t.name]] = np.ascontiguousarray(w)
    return out, config


def load_gguf_model(path: str, *, undo_permutation: bool = True
                    ) -> tuple[dict[str, np.ndarray], "ModelConfig"]:
    """(this project's flat params as float32 numpy arrays, ModelConfig) of a llama GGUF file,
    through hf.LAYOUT_TABLE's names and transforms."""
    from gqa_uptrain import hf  # noqa: PLC0415
    from gqa_uptrain.hf_config import model_config_from_hf  # noqa: PLC0415

    tensors, hf_config = hf_tensors(path, undo_permutation=undo_permutation)
    config = model_config_from_hf(hf_config)
    layout = hf.hf_layout(hf_config)
    try:
        hf.check_tensors(tensors, layout)
    except ValueError as e:
        raise GGUFError(f"{path}: {str(e).replace('config.json', 'the GGUF metadata')}") from None
    table = {t.hf: t for t in layout.tensors()}
    params = {table[n].project: np.ascontiguousarray(table[n].row.to_project(w, layout))
              for n, w in tensors.items() if n in table}
    return params, config


# ============================================================================ tokenizer

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4
# Llama 3's pre-tokenizer split (llama.cpp's 'llama-bpe').
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = ("default", "gpt2", "llama-bpe", "smollm")


def _pre_tokenizer(pre: str | None):
    from tokenizers import Regex, pre_tokenizers  # noqa: PLC0415

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in (None, "default", "gpt2"):
        return byte_level
    if pre == "llama-bpe":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise GGUFError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: "
                    f"{', '.join(PRE_TOKENIZERS)})")


def build_tokenizer(path: str):
    """A `tokenizers.Tokenizer` (what tokenizer.json holds) from the file's vocabulary: byte-level
    BPE (tokenizer.ggml.model 'gpt2') with its merges, control tokens as special added tokens,
    user-defined ones as added tokens, BOS prepended when tokenizer.ggml.add_bos_token is true."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors  # noqa: PLC0415

    meta = _metadata(_reader(path))
    _architecture(meta, path)
    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama":
        raise GGUFError(f"{path}: GGUF tokenizer 'llama' (SentencePiece) is not supported (only "
                        "'gpt2', byte-level BPE)")
    if kind != "gpt2":
        raise GGUFError(f"{path}: GGUF tokenizer {kind!r} is not supported (only 'gpt2', "
                        "byte-level BPE)")
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    merges = list(meta.get("tokenizer.ggml.merges") or [])
    if not tokens:
        raise GGUFError(f"{path}: no tokenizer.ggml.tokens")
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    from tokenizers.pre_tokenizers import ByteLevel  # noqa: PLC0415

    alphabet = set(ByteLevel.alphabet())
    byte_map = _bytes_to_unicode()
    # A token spelled outside the byte alphabet (llama.cpp writes some added tokens as plain text)
    # is re-spelled byte by byte, as transformers' GGUF reader does.
    spelled = [t if set(t) <= alphabet else "".join(byte_map[b] for b in t.encode("utf-8"))
               for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                               fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet]
    if special:
        tok.add_special_tokens(special)
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spelled[bos]} $A", pair=f"{spelled[bos]} $A {spelled[bos]} $B",
            special_tokens=[(spelled[bos], int(bos))])
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the byte-level alphabet)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tokenizer(path: str, out_file: str) -> str:
    """Builds the tokenizer (build_tokenizer) and saves it as tokenizer.json at out_file."""
    build_tokenizer(path).save(out_file)
    return out_file

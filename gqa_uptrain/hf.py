"""Hugging Face Llama-family folders: read, write, and convert them to fewer KV heads.

Supported: `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM` folders holding `config.json`
plus safetensors weights (`model.safetensors`, or shards listed in `model.safetensors.index.json`).

Here, in the sections below: reading a folder, the layout table, config.json's sizes, and
  * import (`load_hf_model`: HF folder -> this project's flat params + ModelConfig) and export
    (`export_hf`: params + ModelConfig -> HF folder); both are pure reshapes/transposes, so a round
    trip is bit-exact. These import model.py (and so jax) lazily, inside the functions.
Elsewhere: HF -> HF conversion streaming one tensor at a time (hf_stream.convert_hf_folder; no
jax, no torch), config.json <-> ModelConfig (hf_config.py), output folders (outputs.py), the byte-level
tokenizer's files (byte_tokenizer.py), safetensors I/O by byte offset (safetensors_io.py).

The HF <-> project layout is one table, LAYOUT_TABLE: a row per tensor (HF name, project name, HF
shape in config.json's sizes, the transform to the project's layout and back, and the config flag
the tensor depends on). The expected tensors and shapes of a folder, the name maps of import and
export, their transposes and the head view that K/V pooling reshapes to are all read from it.
RoPE needs no permutation: model.py uses HF's rotate-half layout.

Features, and where they are supported (HF -> HF pooling touches only K/V, so it passes through
everything that does not change how K/V heads are laid out; import into this project's model refuses
what the model does not implement, by name):
  explicit head_dim ............ both            tied embeddings (no lm_head.weight) ... both
  Llama attention_bias ......... both (q/k/v/o biases -> qkv_bias=True, o_bias=True)
  Qwen2 q/k/v biases ........... both (-> qkv_bias=True, o_bias=False)
  rope 'default'/'linear'/'llama3' both; other rope types: HF -> HF only
  Mistral sliding_window set ... HF -> HF only    Qwen2 use_sliding_window ... HF -> HF only
  Llama mlp_bias ............... HF -> HF only    hidden_act other than silu ... HF -> HF only
  quantization_config .......... refused everywhere (packed weights cannot be pooled)
Buffers `*.rotary_emb.inv_freq` (older Llama saves) are recognised and dropped. Other weight files
(`pytorch_model*.bin`, `original/`, `consolidated*` and Mistral's `params.json` that describes them)
are never read or copied: they would be stale.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from gqa_uptrain import formats, heads, outputs
from gqa_uptrain.byte_tokenizer import write_byte_tokenizer
from gqa_uptrain.safetensors_io import (DTYPE_NAMES, SafetensorsWriter, TensorInfo,
                                        numpy_dtype, read_safetensors_header, read_tensor,
                                        safetensors_dtype, verify_safetensors)

if TYPE_CHECKING:  # model.py imports jax; the HF -> HF path must not.
    from gqa_uptrain.model import ModelConfig

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
CONFIG_FILE = formats.HF_CONFIG_FILE
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PROVENANCE_FILE = "gqa_conversion.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
# Files never copied from an input folder: weights (would be stale after pooling) and what we rewrite.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".h5", ".msgpack", ".gguf",
                    ".npz", ".onnx")
_BUFFER = re.compile(r"(^|\.)rotary_emb\.(inv_freq|cos_cached|sin_cached)$")
# Export default, as transformers' classic save_pretrained: a 7B model in bf16 gives 3 shards.
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


# ============================================================================ reading a folder


def read_hf_config(folder: str) -> dict[str, Any]:
    """config.json as a dict (ValueError if the folder is not a Hugging Face folder or its
    config.json not a JSON object)."""
    if formats.detect(folder) != "hf":
        raise formats.FormatError(f"{folder} is not a Hugging Face folder (no {CONFIG_FILE}, or it "
                                  "is a checkpoint or workdir of this project)")
    path = os.path.join(folder, CONFIG_FILE)
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object")
    return config


def tokenizer_path(folder: str) -> str | None:
    """Path of the folder's tokenizer.json, or None."""
    path = os.path.join(folder, "tokenizer.json")
    return path if os.path.isfile(path) else None


def is_weight_file(name: str) -> bool:
    # params.json is the config of Mistral's consolidated.* weights (its own n_kv_heads): stale too.
    return (name.endswith(_WEIGHT_SUFFIXES) or name.startswith("consolidated")
            or name.endswith(".index.json") or name == "params.json")


def weight_tensors(folder: str) -> tuple[dict[str, TensorInfo], list[str], dict[str, Any] | None]:
    """The folder's safetensors tensors, checked: ({name: TensorInfo}, shard file names, index metadata).

    Reads model.safetensors.index.json when present (every listed shard must exist and hold exactly
    the tensors the index assigns to it), else model.safetensors. Other weight formats are refused.
    """
    index_path = os.path.join(folder, WEIGHTS_INDEX)
    index_meta = None
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                index = json.load(f)
            weight_map = index["weight_map"]
            index_meta = index.get("metadata") or {}
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path} is not a valid index ({e!r})") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if os.path.basename(name) != name:
                raise ValueError(f"{index_path} names a shard outside the folder: {name!r}")
            if not os.path.isfile(os.path.join(folder, name)):
                raise ValueError(f"shard {name} listed in {WEIGHTS_INDEX} is missing from {folder}")
    elif os.path.isfile(os.path.join(folder, WEIGHTS_FILE)):
        files, weight_map = [WEIGHTS_FILE], None
    else:
        others = sorted(n for n in os.listdir(folder) if is_weight_file(n))
        found = f" (found {', '.join(others)}; only safetensors weights are supported)" if others else ""
        raise ValueError(f"{folder} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX}{found}")
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        infos, _ = read_safetensors_header(os.path.join(folder, file))
        for info in infos:
            if weight_map is not None and info.name not in weight_map:
                raise ValueError(f"tensor {info.name} is in {file} but not listed in {WEIGHTS_INDEX}")
            if weight_map is not None and weight_map[info.name] != file:
                raise ValueError(f"tensor {info.name} is in {file} but {WEIGHTS_INDEX} "
                                 f"places it in {weight_map[info.name]}")
            if info.name in tensors:
                raise ValueError(f"tensor {info.name} appears in more than one shard")
            tensors[info.name] = info
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise ValueError(f"{WEIGHTS_INDEX} lists tensor {absent[0]} but {weight_map[absent[0]]} "
                             "does not hold it")
    return tensors, files, index_meta


# ============================================================================ the layout table

# Transforms between HF's torch layout and this project's (views: transposes and reshapes only, hence
# lossless). n is the row's head count (N for q and o, K for k and v), read from the array.
def _keep(a: np.ndarray, layout: "HFLayout") -> np.ndarray:
    return a


def _t(a: np.ndarray, layout: "HFLayout") -> np.ndarray:  # [a, b] <-> [b, a]
    return a.T


def _split_in(w: np.ndarray, layout: "HFLayout") -> np.ndarray:  # [n*H, D] -> [D, n, H]
    return w.T.reshape(layout.d_model, -1, layout.head_dim)


def _join_in(p: np.ndarray, layout: "HFLayout") -> np.ndarray:  # [D, n, H] -> [n*H, D]
    return p.reshape(layout.d_model, -1).T


def _split_out(w: np.ndarray, layout: "HFLayout") -> np.ndarray:  # [D, N*H] -> [N, H, D]
    return w.T.reshape(-1, layout.head_dim, layout.d_model)


def _join_out(p: np.ndarray, layout: "HFLayout") -> np.ndarray:  # [N, H, D] -> [D, N*H]
    return p.reshape(-1, layout.d_model).T


def _split(b: np.ndarray, layout: "HFLayout") -> np.ndarray:  # [n*H] -> [n, H]
    return b.reshape(-1, layout.head_dim)


def _join(p: np.ndarray, layout: "HFLayout") -> np.ndarray:  # [n, H] -> [n*H]
    return p.reshape(-1)


@dataclasses.dataclass(frozen=True)
class LayoutRow:
    """One tensor of a Llama-family folder: names hold {i} (the layer) in per-layer rows; the HF shape
    is in config.json's sizes (HFLayout.dims), 'K*H' being K heads of H stacked on one axis."""

    hf: str
    project: str | None  # None: no param of this project's model (import refuses it; HF -> HF only)
    shape: tuple[str, ...]
    to_project: Callable[[np.ndarray, "HFLayout"], np.ndarray]
    to_hf: Callable[[np.ndarray, "HFLayout"], np.ndarray]
    when: str | None = None  # the HFLayout flag it is present under; None: always


# V vocab_size, D d_model, N num_heads, K num_kv_heads, H head_dim, F mlp_dim.
_TOP_ROWS = (
    # HF name                   project name        HF shape  to project  to HF  present when
    ("model.embed_tokens.weight", "embed",            "V, D",   _keep,      _keep),
    ("model.norm.weight",         "final_norm.scale", "D",      _keep,      _keep),
    ("lm_head.weight",            "lm_head",          "V, D",   _t,         _t,    "untied"),
)
_LAYER_ROWS = (  # under model.layers.{i}. (HF) and layers.{i}. (project)
    # HF name                         project name       HF shape  to project  to HF      present when
    ("input_layernorm.weight",          "attn_norm.scale", "D",      _keep,      _keep),
    ("post_attention_layernorm.weight", "mlp_norm.scale",  "D",      _keep,      _keep),
    ("self_attn.q_proj.weight",         "attn.q_proj",     "N*H, D", _split_in,  _join_in),
    ("self_attn.q_proj.bias",           "attn.q_bias",     "N*H",    _split,     _join,     "qkv_bias"),
    ("self_attn.k_proj.weight",         "attn.k_proj",     "K*H, D", _split_in,  _join_in),
    ("self_attn.k_proj.bias",           "attn.k_bias",     "K*H",    _split,     _join,     "qkv_bias"),
    ("self_attn.v_proj.weight",         "attn.v_proj",     "K*H, D", _split_in,  _join_in),
    ("self_attn.v_proj.bias",           "attn.v_bias",     "K*H",    _split,     _join,     "qkv_bias"),
    ("self_attn.o_proj.weight",         "attn.o_proj",     "D, N*H", _split_out, _join_out),
    ("self_attn.o_proj.bias",           "attn.o_bias",     "D",      _keep,      _keep,     "o_bias"),
    ("mlp.gate_proj.weight",            "mlp.gate_proj",   "F, D",   _t,         _t),
    ("mlp.up_proj.weight",              "mlp.up_proj",     "F, D",   _t,         _t),
    ("mlp.down_proj.weight",            "mlp.down_proj",   "D, F",   _t,         _t),
    ("mlp.gate_proj.bias",              None,              "F",      _keep,      _keep,     "mlp_bias"),
    ("mlp.up_proj.bias",                None,              "F",      _keep,      _keep,     "mlp_bias"),
    ("mlp.down_proj.bias",              None,              "D",      _keep,      _keep,     "mlp_bias"),
)


def _row(hf: str, project: str | None, shape: str, *rest, layer: bool) -> LayoutRow:
    if layer:
        hf, project = "model.layers.{i}." + hf, project and "layers.{i}." + project
    return LayoutRow(hf, project, tuple(shape.split(", ")), *rest)


LAYOUT_TABLE = (tuple(_row(*r, layer=False) for r in _TOP_ROWS)
                + tuple(_row(*r, layer=True) for r in _LAYER_ROWS))
_KV_HEADS = "K*H"  # the dimension K/V pooling shrinks


@dataclasses.dataclass(frozen=True)
class LayoutTensor:
    """A table row for one layer (or a top-level row) of one layout: names filled in, shape in ints."""

    hf: str
    project: str | None
    shape: tuple[int, ...]
    row: LayoutRow


# ============================================================================ config.json -> layout


@dataclasses.dataclass(frozen=True)
class HFLayout:
    """What config.json says about the tensors of a Llama-family folder."""

    architecture: str
    num_layers: int
    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    vocab_size: int
    tie_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool

    @property
    def untied(self) -> bool:
        return not self.tie_embeddings

    @property
    def dims(self) -> dict[str, int]:
        return {"V": self.vocab_size, "D": self.d_model, "N": self.num_heads,
                "K": self.num_kv_heads, "H": self.head_dim, "F": self.mlp_dim}

    def size(self, dim: str) -> int:
        """One HF dimension of the table: 'D' -> d_model, 'K*H' -> num_kv_heads * head_dim."""
        return math.prod(self.dims[d] for d in dim.split("*"))

    def tensors(self) -> list[LayoutTensor]:
        """LAYOUT_TABLE's rows present under this config, top-level rows once, per-layer rows for
        every layer (layer by layer), in table order."""
        top = [r for r in LAYOUT_TABLE if "{i}" not in r.hf]
        per_layer = [r for r in LAYOUT_TABLE if "{i}" in r.hf]
        out = []
        for i, rows in [(None, top)] + [(i, per_layer) for i in range(self.num_layers)]:
            for r in rows:
                if r.when is None or getattr(self, r.when):
                    out.append(LayoutTensor(
                        r.hf.format(i=i), None if r.project is None else r.project.format(i=i),
                        tuple(self.size(d) for d in r.shape), r))
        return out

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """{HF tensor name: shape} of every tensor the folder must hold (lm_head only when untied)."""
        return {t.hf: t.shape for t in self.tensors()}

    def kv_tensors(self) -> list[LayoutTensor]:
        """The tensors that carry K heads (what K/V pooling changes)."""
        return [t for t in self.tensors() if _KV_HEADS in t.row.shape]

    def head_view(self, t: LayoutTensor) -> tuple[tuple[int, ...], int]:
        """(shape, head axis) of a K-head tensor viewed with its heads split out: [K*H, D] ->
        ([K, H, D], 0), [K*H] -> ([K, H], 0)."""
        shape, axis = [], None
        for d in t.row.shape:
            if d == _KV_HEADS:
                axis = len(shape)
                shape += [self.num_kv_heads, self.head_dim]
            else:
                shape.append(self.size(d))
        return tuple(shape), axis


def _int_field(config: dict, key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"config.json: {key}={value!r} (expected a positive integer)")
    return value


def hf_layout(config: dict[str, Any]) -> HFLayout:
    """Reads config.json's architecture and sizes; refuses unsupported architectures by name."""
    archs = config.get("architectures") or []
    if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
        named = ", ".join(map(str, archs)) or f"model_type={config.get('model_type')!r}"
        raise ValueError(f"architecture {named} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    arch = archs[0]
    if config.get("quantization_config"):
        raise ValueError("quantization_config: quantized checkpoints are not supported (their K/V "
                         "weights are packed and cannot be pooled)")
    num_heads = _int_field(config, "num_attention_heads")
    num_kv_heads = config.get("num_key_value_heads")
    num_kv_heads = num_heads if num_kv_heads is None else _int_field(config, "num_key_value_heads")
    d_model = _int_field(config, "hidden_size")
    head_dim = config.get("head_dim")
    if head_dim is None:
        if d_model % num_heads:
            raise ValueError(f"config.json: hidden_size={d_model} is not divisible by "
                             f"num_attention_heads={num_heads} and head_dim is not set")
        head_dim = d_model // num_heads
    else:
        head_dim = _int_field(config, "head_dim")
    try:
        heads.group_size(num_heads, num_kv_heads)
    except ValueError as e:  # said in config.json's own terms
        raise ValueError(f"config.json: num_attention_heads / num_key_value_heads: {e}") from None
    family = SUPPORTED_ARCHITECTURES[arch]
    attention_bias = bool(config.get("attention_bias", False)) if family == "llama" else False
    return HFLayout(
        architecture=arch,
        num_layers=_int_field(config, "num_hidden_layers"),
        d_model=d_model,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        mlp_dim=_int_field(config, "intermediate_size"),
        vocab_size=_int_field(config, "vocab_size"),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases and no o bias; Llama's attention_bias covers all four.
        qkv_bias=family == "qwen2" or attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(config.get("mlp_bias", False)) if family == "llama" else False,
    )


def check_tensors(tensors: dict[str, Any], layout: HFLayout) -> list[str]:
    """Checks tensor names and shapes against config.json; returns the recognised buffers to drop.

    tensors: {HF name: anything with .shape}. A tied lm_head.weight is tolerated (transformers
    ties it anyway). Raises ValueError naming the first missing or unexpected tensor, or a shape
    that disagrees with config.json.
    """
    expected = layout.expected_shapes()
    buffers = sorted(n for n in tensors if _BUFFER.search(n))
    # What only an untied layout holds (lm_head.weight) is tolerated in a tied folder.
    untied = dataclasses.replace(layout, tie_embeddings=False).expected_shapes()
    optional = {n: s for n, s in untied.items() if n not in expected}
    def more(names):
        return f"; {len(names) - 1} more" if len(names) > 1 else ""

    missing = sorted(set(expected) - set(tensors), key=natural_key)
    if missing:
        raise ValueError(f"missing tensor {missing[0]} (config.json implies it{more(missing)})")
    unexpected = sorted(set(tensors) - set(expected) - set(optional) - set(buffers), key=natural_key)
    if unexpected:
        raise ValueError(f"unexpected tensor {unexpected[0]} (not part of a {layout.architecture} "
                         f"with this config.json{more(unexpected)})")
    for name, shape in {**expected, **optional}.items():
        if name in tensors and tuple(tensors[name].shape) != shape:
            raise ValueError(f"tensor {name} has shape {tuple(tensors[name].shape)} but config.json "
                             f"implies {shape}")
    return buffers


def natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def config_dtype(config: dict[str, Any], fallback: str) -> str:
    """config.json's `dtype` (or `torch_dtype`) when float32/bfloat16/float16, else `fallback`."""
    name = config.get("dtype") or config.get("torch_dtype")
    return name if name in ("float32", "bfloat16", "float16") else fallback


# ============================================================================ import: HF -> params


def load_hf_model(folder: str) -> tuple[dict[str, np.ndarray], "ModelConfig"]:
    """Imports a Hugging Face folder as (this project's flat params as numpy arrays, ModelConfig).

    Values are bit-exact (layout changes only). param_dtype/dtype follow the tensors: all floating
    tensors must share one dtype, else the narrower ones are widened (lossless) to the widest.
    A tied folder's redundant lm_head.weight and rotary buffers are dropped. Refuses unsupported
    features by name (hf_config.model_config_from_hf) and tensors that disagree with config.json.
    """
    from gqa_uptrain.hf_config import model_config_from_hf  # noqa: PLC0415 (it imports this module)

    hf_config = read_hf_config(folder)
    config = model_config_from_hf(hf_config)
    layout = hf_layout(hf_config)
    tensors, _, _ = weight_tensors(folder)
    check_tensors(tensors, layout)
    table = {t.hf: t for t in layout.tensors()}  # not in it: buffers and a tied lm_head.weight
    keep = [t for n, t in tensors.items() if n in table]
    order = {"F16": 0, "BF16": 0, "F32": 1, "F64": 2}
    bad = sorted({t.dtype for t in keep} - set(order))
    if bad:
        raise ValueError(f"tensor dtype {bad[0]} cannot be imported (floating point only)")
    widest = max((t.dtype for t in keep), key=lambda d: order[d])
    if widest == "F64":
        raise ValueError("float64 tensors cannot be imported (the model keeps float32 at most)")
    dtypes = {t.dtype for t in keep}
    if len(dtypes) > 1 and widest != "F32":
        raise ValueError(f"tensors mix dtypes {sorted(dtypes)}; cannot import them losslessly")
    param_dtype = DTYPE_NAMES[widest]
    config = config.replace(param_dtype=param_dtype, dtype=param_dtype)
    params = {}
    for info in keep:
        t = table[info.name]
        w = read_tensor(info).astype(numpy_dtype(widest), copy=False)
        params[t.project] = np.ascontiguousarray(t.row.to_project(w, layout))
    return params, config


# ============================================================================ export: params -> HF


def export_hf(params: dict[str, Any], config: "ModelConfig", out_folder: str, *,
              tokenizer_folder: str | None = None, base_hf_config: dict[str, Any] | None = None,
              byte_tokenizer: bool | None = None, provenance: dict[str, Any] | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False) -> list[str]:
    """Writes this project's params as a transformers folder (LlamaForCausalLM, or Qwen2ForCausalLM
    when qkv_bias without o_bias; see hf_config.hf_config_from_model_config). Bit-exact: tensors
    keep their dtype and values. Returns the written file names.

    tokenizer_folder: copy its tokenizer (and generation_config.json) files. Otherwise a byte-level
    tokenizer.json is written when byte_tokenizer is True, or when it is None, there is no
    base_hf_config and vocab_size is byte-sized (checkpoints.BYTE_VOCAB_SIZES, 256..512: a model
    trained here, on bytes; the rule of checkpoints.default_tokenizer). Shards of at most
    max_shard_bytes (one tensor may exceed it) with model.safetensors.index.json when more than one.
    Written to a temporary folder beside out_folder and renamed when complete.
    """
    from gqa_uptrain.checkpoints import BYTE_VOCAB_SIZES  # noqa: PLC0415
    from gqa_uptrain.hf_config import hf_config_from_model_config  # noqa: PLC0415
    from gqa_uptrain.model import abstract_params, check_params_match  # noqa: PLC0415

    hf_config = hf_config_from_model_config(config, base=base_hf_config)
    check_params_match(abstract_params(config), params, what="params to export")
    if os.path.lexists(out_folder) and not overwrite:
        raise ValueError(f"output {out_folder} already exists (pass --overwrite to replace it)")
    if byte_tokenizer is None:
        byte_tokenizer = (tokenizer_folder is None and base_hf_config is None
                          and config.vocab_size in BYTE_VOCAB_SIZES)
    if byte_tokenizer and config.vocab_size < 256:
        raise ValueError(f"vocab_size={config.vocab_size} < 256: no byte-level tokenizer fits")
    layout = hf_layout(hf_config)
    table = {t.hf: t for t in layout.tensors()}
    if {t.project for t in table.values()} != set(params):  # the table and model.py disagree
        raise RuntimeError(f"the params are not the layout table's tensors of {layout}")
    names = sorted(table, key=natural_key)

    def tensor(hf_name):
        t = table[hf_name]
        a = np.ascontiguousarray(t.row.to_hf(np.asarray(params[t.project]), layout))
        if a.shape != t.shape:
            raise RuntimeError(f"{t.project} exports as {a.shape}, the layout says {t.shape}")
        return a

    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = np.asarray(params[table[name].project]).nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = ([WEIGHTS_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    written = []
    with outputs.atomic_folder(out_folder, overwrite) as tmp:
        weight_map, total_size = {}, 0
        for file, shard in zip(files, shards):
            arrays = {n: tensor(n) for n in shard}
            entries = [(n, safetensors_dtype(a.dtype), a.shape) for n, a in arrays.items()]
            with SafetensorsWriter(os.path.join(tmp, file), entries, {"format": "pt"}) as writer:
                for n, a in arrays.items():
                    writer.write(n, a)
                    weight_map[n] = file
                    total_size += a.nbytes
            verify_safetensors(os.path.join(tmp, file), entries)
            written.append(file)
        if len(files) > 1:
            outputs.write_json(os.path.join(tmp, WEIGHTS_INDEX), {
                "metadata": {"total_size": total_size,
                             "total_parameters": int(sum(np.size(p) for p in params.values()))},
                "weight_map": weight_map})
            written.append(WEIGHTS_INDEX)
        outputs.write_json(os.path.join(tmp, CONFIG_FILE), hf_config)
        written.append(CONFIG_FILE)
        if tokenizer_folder is not None:
            if os.path.isfile(tokenizer_folder):  # a tokenizer.json given directly
                shutil.copy2(tokenizer_folder, os.path.join(tmp, "tokenizer.json"))
                written.append("tokenizer.json")
            else:
                found = [f for f in TOKENIZER_FILES
                         if os.path.isfile(os.path.join(tokenizer_folder, f))]
                if not any(f != "generation_config.json" for f in found):
                    raise ValueError(f"tokenizer folder {tokenizer_folder} holds no tokenizer files")
                for f in found:
                    shutil.copy2(os.path.join(tokenizer_folder, f), os.path.join(tmp, f))
                written += found
        elif byte_tokenizer:
            write_byte_tokenizer(tmp, hf_config["max_position_embeddings"])
            written += ["tokenizer.json", "tokenizer_config.json"]
        if provenance is not None:
            outputs.write_json(os.path.join(tmp, PROVENANCE_FILE), provenance)
            written.append(PROVENANCE_FILE)
    return written

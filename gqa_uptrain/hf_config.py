"""config.json <-> ModelConfig: a Llama-family config.json as this project's ModelConfig, and back.

  * model_config_from_hf: config.json -> ModelConfig, refusing by name what the model does not
    implement (sliding windows, mlp_bias, activations other than silu, other rope types, partial
    rotary embeddings). Both rope layouts are read: `rope_parameters` (transformers 5.x) and
    `rope_theta` + `rope_scaling` (older ones).
  * hf_config_from_model_config: ModelConfig -> config.json (Llama, Qwen2 or a base's Mistral),
    keeping a base config.json's other fields and rope layout.
The sizes and architecture are read by hf.hf_layout. Imports neither jax nor torch at import:
model.py (ModelConfig, ROPE_SCALING_TYPES) is imported inside the functions.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from gqa_uptrain.hf import SUPPORTED_ARCHITECTURES, config_dtype, hf_layout

if TYPE_CHECKING:  # model.py imports jax
    from gqa_uptrain.model import ModelConfig


def _rope_from_hf(config: dict[str, Any]) -> tuple[float, tuple | None]:
    """(rope_theta, ModelConfig.rope_scaling) from either config layout; refuses what the model lacks.

    Newer transformers (5.x) write `rope_parameters` {'rope_theta', 'rope_type', ...}; older ones
    `rope_theta` plus `rope_scaling` {'type' or 'rope_type', 'factor', ...}.
    """
    from gqa_uptrain.model import ROPE_SCALING_TYPES  # noqa: PLC0415

    params = config.get("rope_parameters")
    if params is None:
        params = dict(config.get("rope_scaling") or {})
        params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params = dict(params)
    if "type" in params:
        params.setdefault("rope_type", params.pop("type"))
    theta = float(params.pop("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", "default")
    partial = params.pop("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor={partial} is not supported by this project's model")
    if kind == "default":
        return theta, None
    if kind not in ROPE_SCALING_TYPES:
        raise ValueError(f"rope type {kind!r} is not supported by this project's model "
                         f"(supported: default, {', '.join(ROPE_SCALING_TYPES)})")
    needed = {"linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings")}[kind]
    absent = [k for k in needed if params.get(k) is None]
    if absent:
        raise ValueError(f"rope type {kind!r} needs {', '.join(absent)} in config.json")
    extra = sorted(k for k in params if k not in needed and params[k] is not None)
    if extra:
        raise ValueError(f"rope parameter {extra[0]} (rope type {kind!r}) is not supported by "
                         "this project's model")
    scaling = {k: params[k] for k in needed}
    scaling["rope_type"] = kind
    return theta, tuple(sorted(scaling.items()))


def model_config_from_hf(hf_config: dict[str, Any]) -> "ModelConfig":
    """This project's ModelConfig for a Llama-family config.json dict.

    Refuses, naming the feature, what the model does not implement: sliding windows (Mistral
    `sliding_window` set, Qwen2 `use_sliding_window`), `mlp_bias`, activations other than silu,
    rope types other than default/linear/llama3, partial rotary embeddings. param_dtype and dtype
    are config.json's `dtype` (or `torch_dtype`), float32 when absent; hf.load_hf_model follows the
    tensors instead when they disagree.
    """
    from gqa_uptrain.model import ModelConfig  # noqa: PLC0415

    layout = hf_layout(hf_config)
    family = SUPPORTED_ARCHITECTURES[layout.architecture]
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r} is not supported by this project's model (silu only)")
    if layout.mlp_bias:
        raise ValueError("mlp_bias=True is not supported by this project's model")
    if family == "mistral" and hf_config.get("sliding_window") is not None:
        raise ValueError(f"sliding_window={hf_config['sliding_window']} is not supported by this "
                         "project's model (full causal attention only); the HF -> HF conversion "
                         "does support it")
    if family == "qwen2" and (hf_config.get("use_sliding_window")
                              or "sliding_attention" in (hf_config.get("layer_types") or [])):
        raise ValueError("use_sliding_window=True is not supported by this project's model "
                         "(full causal attention only); the HF -> HF conversion does support it")
    theta, scaling = _rope_from_hf(hf_config)
    dtype = config_dtype(hf_config, "float32")
    return ModelConfig(
        vocab_size=layout.vocab_size, d_model=layout.d_model, num_layers=layout.num_layers,
        num_heads=layout.num_heads, num_kv_heads=layout.num_kv_heads, mlp_dim=layout.mlp_dim,
        head_dim=layout.head_dim, rope_theta=theta, rope_scaling=scaling,
        norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=layout.tie_embeddings, qkv_bias=layout.qkv_bias, o_bias=layout.o_bias,
        param_dtype=dtype, dtype=dtype)


def _architecture_for(config: "ModelConfig", base: dict[str, Any] | None) -> str:
    if config.o_bias and not config.qkv_bias:
        raise ValueError("o_bias without qkv_bias has no Llama-family equivalent in transformers")
    base_arch = ((base or {}).get("architectures") or [None])[0]
    if config.qkv_bias and not config.o_bias:
        return "Qwen2ForCausalLM"
    if config.qkv_bias:  # Llama's attention_bias puts a bias on q, k, v and o
        return "LlamaForCausalLM"
    if base_arch in SUPPORTED_ARCHITECTURES and base_arch != "Qwen2ForCausalLM":
        return base_arch  # keep Mistral a Mistral
    return "LlamaForCausalLM"


def hf_config_from_model_config(config: "ModelConfig", *, base: dict[str, Any] | None = None,
                                max_position_embeddings: int = 2048) -> dict[str, Any]:
    """A transformers config.json dict for this project's ModelConfig.

    Architecture: Qwen2 when qkv_bias without o_bias, else Llama (with attention_bias when there
    are biases), or the base's Mistral. `base` (e.g. the config.json the model was imported from)
    keeps every field this does not set — token ids, max_position_embeddings, rope layout: a base
    written with `rope_theta`/`rope_scaling` keeps that layout, else `rope_parameters` (what
    transformers 5.x writes). Without a base, bos/eos/pad token ids are null (byte-level models
    have none).
    """
    arch = _architecture_for(config, base)
    family = SUPPORTED_ARCHITECTURES[arch]
    base_family = SUPPORTED_ARCHITECTURES.get(((base or {}).get("architectures") or [None])[0])
    out: dict[str, Any] = copy.deepcopy(base) if base and base_family == family else {}
    if base and base_family != family:  # a different class: keep only the family-neutral fields
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings",
                    "initializer_range"):
            if key in base:
                out[key] = base[key]
    if not base:
        out.update(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    out.setdefault("max_position_embeddings", max_position_embeddings)
    out.update(
        architectures=[arch], model_type=family, vocab_size=config.vocab_size,
        hidden_size=config.d_model, intermediate_size=config.mlp_dim,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, hidden_act="silu",
        rms_norm_eps=config.norm_eps, tie_word_embeddings=config.tie_embeddings,
        dtype=config.param_dtype, attention_dropout=0.0, use_cache=True)
    out.pop("torch_dtype", None)
    if family == "llama":
        out.update(attention_bias=config.qkv_bias, mlp_bias=False)
    elif family == "mistral":
        out["sliding_window"] = None
    else:
        out["use_sliding_window"] = False
        out.setdefault("sliding_window", None)  # ignored by transformers without use_sliding_window
        if len(out.get("layer_types") or []) != config.num_layers:
            out.pop("layer_types", None)  # transformers rebuilds it (all full attention)
    scaling = dict(config.rope_scaling) if config.rope_scaling else None
    if base and "rope_parameters" not in base and ("rope_theta" in base or "rope_scaling" in base):
        out["rope_theta"] = config.rope_theta
        out["rope_scaling"] = scaling
    else:
        out.pop("rope_theta", None)
        out.pop("rope_scaling", None)
        out["rope_parameters"] = {"rope_theta": config.rope_theta, "rope_type": "default",
                                  **(scaling or {})}
    return out

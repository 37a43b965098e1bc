"""hf.LAYOUT_TABLE, the one source of the HF <-> project layout: every row round-trips (to the
project's layout and back is the identity on shapes and values), the rows present follow
config.json's flags, and the project side is exactly this project's model's params.

No folders, no transformers: random arrays of the HF shapes the table derives from small configs.
"""

import numpy as np
import pytest

from gqa_uptrain import hf
from gqa_uptrain.hf_config import model_config_from_hf
from gqa_uptrain import model as model_lib

_SIZES = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2)

# id -> (config.json, HF tensors of layer 0 that must be present beyond the always-present ones)
CONFIGS = {
    "llama": (dict(architectures=["LlamaForCausalLM"], **_SIZES), set()),
    "llama-attention_bias-tied-head_dim12": (
        dict(architectures=["LlamaForCausalLM"], attention_bias=True, tie_word_embeddings=True,
             head_dim=12, **_SIZES),
        {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
         "self_attn.o_proj.bias"}),
    "mistral-head_dim8": (dict(architectures=["MistralForCausalLM"], head_dim=8, **_SIZES), set()),
    "qwen2-tied": (dict(architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True, **_SIZES),
                   {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"}),
    "llama-mlp_bias": (  # HF -> HF only: rows without a project name
        dict(architectures=["LlamaForCausalLM"], mlp_bias=True, **_SIZES),
        {"mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias"}),
}
_ALWAYS = {"input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
           "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
           "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_every_row_round_trips(case):
    config, extra = CONFIGS[case]
    layout = hf.hf_layout(config)
    tensors = layout.tensors()
    assert len({t.hf for t in tensors}) == len(tensors)
    rng = np.random.default_rng(0)
    for t in tensors:
        w = rng.standard_normal(t.shape).astype(np.float32)
        p = t.row.to_project(w, layout)
        back = t.row.to_hf(p, layout)
        assert back.shape == t.shape == w.shape, t.hf
        np.testing.assert_array_equal(back, w, err_msg=t.hf)
        if t.project is not None:  # the HF -> project -> HF round trip of import and export
            np.testing.assert_array_equal(t.row.to_hf(np.ascontiguousarray(p), layout), w)

    names = {t.hf for t in tensors}
    layer0 = {n.removeprefix("model.layers.0.") for n in names if n.startswith("model.layers.0.")}
    assert layer0 == _ALWAYS | extra
    assert len(names) == 2 + (not layout.tie_embeddings) + layout.num_layers * len(layer0)
    assert ("lm_head.weight" in names) == (not config.get("tie_word_embeddings", False))
    assert layout.expected_shapes() == {t.hf: t.shape for t in tensors}


def test_shapes_and_head_view_from_the_table():
    config, _ = CONFIGS["llama-attention_bias-tied-head_dim12"]
    layout = hf.hf_layout(config)
    assert layout.head_dim == 12 != layout.d_model // layout.num_heads
    shapes = layout.expected_shapes()
    assert shapes["model.layers.1.self_attn.q_proj.weight"] == (4 * 12, 32)
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (2 * 12, 32)
    assert shapes["model.layers.1.self_attn.v_proj.bias"] == (2 * 12,)
    assert shapes["model.layers.1.self_attn.o_proj.weight"] == (32, 4 * 12)
    assert shapes["model.layers.1.self_attn.o_proj.bias"] == (32,)
    kv = {t.hf: layout.head_view(t) for t in layout.kv_tensors()}
    assert sorted(kv) == sorted(f"model.layers.{i}.self_attn.{k}_proj.{w}"
                                for i in range(2) for k in "kv" for w in ("weight", "bias"))
    assert kv["model.layers.0.self_attn.k_proj.weight"] == ((2, 12, 32), 0)
    assert kv["model.layers.0.self_attn.v_proj.bias"] == ((2, 12), 0)


@pytest.mark.parametrize("case", [c for c in CONFIGS if c != "llama-mlp_bias"])
def test_project_side_is_the_models_params(case):
    """The table's project names and the shapes its transforms give are model.py's params."""
    config, _ = CONFIGS[case]
    layout = hf.hf_layout(config)
    want = {n: tuple(s.shape) for n, s in
            model_lib.abstract_params(model_config_from_hf(config)).items()}
    got = {t.project: t.row.to_project(np.zeros(t.shape, np.float32), layout).shape
           for t in layout.tensors()}
    assert got == want

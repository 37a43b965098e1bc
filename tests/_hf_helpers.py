"""Shared helpers for the converter's tests: tiny random transformers models, the real client's logits,
an independent pooled reference, and running the converter's CLI in a subprocess.

The reference pooling here is written out directly (reshape + mean / stride) rather than calling
gqa_uptrain.pooling, so the converter is checked against something it did not compute.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import torch
import transformers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VOCAB = 100


def make_hf_folder(folder, arch="llama", *, dtype="float32", num_heads=4, num_kv_heads=4,
                   hidden=32, head_dim=None, layers=2, mlp=64, vocab=VOCAB, tie=False,
                   max_shard_size=None, seed=0, equal_kv_groups=None, **config_kw):
    """Saves a tiny random model with transformers' own save_pretrained; returns the folder.

    Weights are drawn with std 0.3 (logits of order 1, so a 1e-4 tolerance means something), norm
    scales and biases perturbed away from 1 / 0 so that a mixed-up name would show.
    equal_kv_groups=r makes K/V heads equal within each contiguous group of r heads.
    """
    torch.manual_seed(seed)
    config_cls, model_cls = ARCHS[arch]
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp,
              num_hidden_layers=layers, num_attention_heads=num_heads,
              num_key_value_heads=num_kv_heads, initializer_range=0.3,
              tie_word_embeddings=tie, **config_kw)
    if head_dim is not None:
        kw["head_dim"] = head_dim
    if arch == "mistral":
        kw.setdefault("sliding_window", None)
    model = model_cls(config_cls(**kw))
    head = head_dim or hidden // num_heads
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn_like(p))
            if equal_kv_groups and (".k_proj." in name or ".v_proj." in name):
                heads = p.view(num_kv_heads, head, -1)
                for g in range(0, num_kv_heads, equal_kv_groups):
                    heads[g:g + equal_kv_groups] = heads[g].clone()
    model = model.to(TORCH_DTYPES[dtype])
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **kwargs)
    return str(folder)


def tokens(batch=2, seq=12, vocab=VOCAB, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq)).astype(np.int64)


def load_hf(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def hf_logits(folder_or_model, toks):
    model = load_hf(folder_or_model) if isinstance(folder_or_model, (str, os.PathLike)) else folder_or_model
    return model(torch.from_numpy(toks)).logits.float().numpy()


def reference_pool(w, num_kv_heads, head_dim, method):
    """Direct numpy pooling of an HF k/v weight [K*H, D] or bias [K*H] (float32 in, float32 out)."""
    heads = w.reshape((-1, head_dim) + w.shape[1:])  # [K, H, (D)]
    group = heads.shape[0] // num_kv_heads
    if method == "mean":
        pooled = np.stack([heads[j * group:(j + 1) * group].mean(axis=0)
                           for j in range(num_kv_heads)])
    elif method == "first":
        pooled = heads[::group]
    else:
        raise ValueError(method)
    return pooled.reshape((-1,) + w.shape[1:])


@torch.no_grad()
def pooled_reference_model(src_folder, num_kv_heads, method="mean"):
    """The source model with its K/V heads pooled directly from its torch state dict, rounded to the
    source's dtype as the converter's output is, loaded into a transformers model with
    num_key_value_heads=num_kv_heads (in float32)."""
    src = transformers.AutoModelForCausalLM.from_pretrained(src_folder)  # stored dtype
    stored_dtype = next(src.parameters()).dtype
    config = src.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    state = {k: v.float().numpy() for k, v in src.state_dict().items()}
    for name in list(state):
        if ".k_proj." in name or ".v_proj." in name:
            pooled = reference_pool(state[name], num_kv_heads, head_dim, method)
            state[name] = torch.from_numpy(pooled).to(stored_dtype).float().numpy()
    config.num_key_value_heads = num_kv_heads
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()},
                          strict=True)
    return model


def jax_logits(params, config, toks):
    """This project's JAX model, computing in float32, on the given params."""
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from gqa_uptrain import model as model_lib  # noqa: PLC0415

    config = config.replace(param_dtype="float32", dtype="float32")
    params = {k: np.asarray(v, np.float32) for k, v in params.items()}
    # An abstract model filled with the params, run under jit: one compilation instead of eager
    # op-by-op dispatch and a random init that is thrown away (~10x faster on this CPU).
    m = nnx.eval_shape(lambda: model_lib.Transformer(config, rngs=nnx.Rngs(0)))
    model_lib.set_params(m, params)
    return np.asarray(nnx.jit(lambda mm, t: mm(t))(m, jnp.asarray(toks, jnp.int32)))


def random_params(config, seed=0):
    """Random params for this project's model with numpy (no eager jax init): weights N(0, 0.3²),
    norm scales 1 + N(0, 0.2²), biases N(0, 0.3²), in config.param_dtype."""
    from gqa_uptrain import model as model_lib  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    out = {}
    for name, abstract in sorted(model_lib.abstract_params(config).items()):
        x = rng.standard_normal(abstract.shape) * (0.2 if name.endswith("scale") else 0.3)
        out[name] = (x + (1 if name.endswith("scale") else 0)).astype(abstract.dtype)
    return out


def run_cli(*args, extra_env=None, timeout=300):
    """python -m gqa_uptrain.convert ARGS in a subprocess."""
    env = dict(os.environ)
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "gqa_uptrain.convert", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)


def listing(folder):
    """Every path under folder (hidden ones too), to check that nothing was left behind."""
    out = []
    for root, dirs, files in os.walk(folder):
        for n in dirs + files:
            out.append(os.path.relpath(os.path.join(root, n), folder))
    return sorted(out)


def read_safetensors_folder(folder):
    """{name: (dtype string, shape, raw bytes)} of every tensor in a folder, via the safetensors library."""
    from safetensors import safe_open  # noqa: PLC0415

    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), framework="pt") as st:
                for n in st.keys():
                    t = st.get_tensor(n)
                    raw = t.contiguous().view(torch.uint8).numpy().tobytes()
                    out[n] = (str(t.dtype), tuple(t.shape), raw)
    return out

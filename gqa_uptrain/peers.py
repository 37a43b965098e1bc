"""The peer the benchmarks measure against: Hugging Face `transformers` on PyTorch CPU.

Each function builds the `transformers` model equivalent to a ModelConfig (through hf_config.py's
config mapping, so both sides have the same shapes) and returns a no-arg callable that runs one
step, for `perf.measure_decode` to time side by side with ours. torch and transformers are imported
lazily: they are the `dev` extra, not a dependency of the library.
"""

from __future__ import annotations

import os

from gqa_uptrain.hf_config import hf_config_from_model_config
from gqa_uptrain.model import ModelConfig


def _torch():
    import torch

    # Same thread count as XLA's CPU client, which uses every core.
    torch.set_num_threads(os.cpu_count() or 1)
    return torch


def _hf_model(config: ModelConfig, seed: int, attn_implementation: str = "sdpa"):
    torch = _torch()
    import transformers

    torch.manual_seed(seed)
    hf_config = hf_config_from_model_config(config)
    cls = getattr(transformers, hf_config["architectures"][0])
    config_obj = transformers.AutoConfig.for_model(**hf_config)
    config_obj._attn_implementation = attn_implementation
    model = cls(config_obj).to(getattr(torch, config.param_dtype))
    return torch, model


def hf_decode_step(config: ModelConfig, batch: int, context: int, *, seed: int = 0):
    """One-token decode of `transformers` with its static cache filled to `context` tokens.

    The cache is filled directly with random values rather than by a long prefill (only its size
    matters for speed); every call decodes at position `context` and rewinds, like ours. This is the
    forward `generate` runs per token with a static cache, without `generate`'s sampling loop.
    """
    torch, model = _hf_model(config, seed)
    import transformers

    model.eval()
    cache = transformers.StaticCache(config=model.config, max_cache_len=context + 1)
    tokens = torch.zeros((batch, 1), dtype=torch.long)
    with torch.inference_mode():
        model(tokens, cache=cache, cache_position=torch.tensor([0]), use_cache=True)
        for layer in cache.layers:  # allocated by the first call: [batch, kv_heads, max_len, head_dim]
            layer.keys.normal_()
            layer.values.normal_()
    position = torch.tensor([context])

    def run():
        with torch.inference_mode():
            for layer in cache.layers:
                layer.cumulative_length.fill_(context)
            return model(tokens, cache=cache, cache_position=position,
                         use_cache=True).logits

    run()
    return run


def hf_train_step(config: ModelConfig, batch: int, seq_len: int, *, seed: int = 0,
                  lr: float = 1e-4):
    """One AdamW training step of `transformers`' LlamaForCausalLM (sdpa attention), fp32."""
    torch, model = _hf_model(config, seed, "sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (batch, seq_len), generator=generator)

    def run():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        return float(loss.detach())

    run()
    return run

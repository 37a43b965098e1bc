"""The sub-configs that configs/pretrain.py and configs/uptrain.py share (in the style of
big_vision's configs/common.py), so uptraining continues pretraining on the same data with the same
optimizer unless a config says otherwise.

The config files are loaded by path (`--config=/any/path/pretrain.py`), so they cannot import a
sibling module; they import these from the package instead. Each builder takes the values its
callers must choose as required keywords and any other key as an override; an unknown key is an
error. What each key means: config_keys.py.
"""

from __future__ import annotations

from typing import Any

import ml_collections


def _merged(defaults: dict[str, Any], overrides: dict[str, Any], what: str) -> dict[str, Any]:
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise TypeError(f"{what}: unknown keys {unknown} (known: {', '.join(defaults)})")
    return {**defaults, **overrides}


def data_block(*, tokenizer: str, **overrides: Any) -> ml_collections.ConfigDict:
    """config.data (data.DataSpec's keys): the embedded stdlib corpus, split by hash, in windows
    of 256 tokens. tokenizer: 'byte', a tokenizer.json path or 'auto' (the init checkpoint's)."""
    return ml_collections.ConfigDict(_merged(dict(
        source="stdlib",  # 'stdlib' | 'files' | 'hf' (data.py)
        path="",  # 'files': comma-separated globs
        val_path="",  # 'files': validation globs ('' = split by hash)
        hf_name="",
        hf_config="",
        train_split="train",
        val_split="",  # '' = split train_split by hash
        text_field="text",
        val_fraction=0.02,  # of the stdlib's ~730 files: ~16 files, ~120k bytes
        tokenizer=tokenizer,
        seq_len=256,
        cache_dir="",  # the token stores (data.py); '' = WORKDIR/data_cache
        streaming=True,  # 'files' / 'hf': read through `datasets` streaming (no Arrow copy)
        prefetch=2,  # batches read ahead on a background thread (prefetch.py); 0 = off
    ), overrides, "data_block"))


def optimizer_block(*, learning_rate: float, warmup_steps: int, **overrides: Any
                    ) -> ml_collections.ConfigDict:
    """config.optimizer (optim.py): AdamW with a cosine schedule to 0.1 x the peak; the peak and
    the warmup are each config's own."""
    return ml_collections.ConfigDict(_merged(dict(
        learning_rate=learning_rate,
        schedule="cosine",  # 'cosine' | 'constant' | 'wsd'
        warmup_steps=warmup_steps,
        decay_fraction=0.2,  # 'wsd' only: share of steps in the final decay
        min_lr_ratio=0.1,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        clip_norm=1.0,
    ), overrides, "optimizer_block"))


def output_keys(*, log_every: int, eval_every: int, checkpoint_every: int, **overrides: Any
                ) -> dict[str, Any]:
    """The top-level keys of cadence (logging, validation, checkpoints), output and device mesh,
    for `config.update(...)`; the three cadences are each config's own."""
    return _merged(dict(
        log_every=log_every,
        eval_every=eval_every,  # 0 = only at the end
        eval_batches=4,  # batches per periodic validation (-1 = the whole split)
        final_eval_batches=-1,  # at the last step: the whole validation split (0 = none)
        checkpoint_every=checkpoint_every,  # and always at the end / on SIGTERM
        keep_checkpoints=3,
        mesh=ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)),  # -1 = the rest
        progress_bar=True,
    ), overrides, "output_keys")


def compute_keys(**overrides: Any) -> dict[str, Any]:
    """The top-level keys of how a step computes: precision policy (precision.py), scanned
    layers and their rematerialisation (model.py), the chunked loss (losses.py) and the attention
    implementation, for `config.update(...)`. The defaults suit every config here (a CPU run and a
    pod run alike); a preset for large models overrides remat."""
    return _merged(dict(
        param_dtype="float32",  # master weights: float32 whatever the source's dtype
        compute_dtype="auto",  # bfloat16 on accelerators, float32 on CPU (bf16 is slower there)
        # One jax.lax.scan over the layers: the compiled step no longer grows with depth (a
        # 32-layer 7B-width step took 157 s to compile as a Python loop).
        scan_layers=True,
        remat="none",  # 'none' | 'full' | 'dots' (model.REMAT_POLICIES)
        # Positions per chunk of the cross-entropy: logits of at most [micro_batch, 512, vocab]
        # exist at once (a 4 x 4096-token batch at 32k vocabulary: 256 MiB, not 2 GiB); a sequence
        # this short or shorter takes the plain path.
        loss_chunk_size=512,
        attention_implementation="auto",
    ), overrides, "compute_keys")

"""One line per training-config key: what `train --help` and `train --print_config` show.

ConfigDict keeps no comments, so the meaning of each key the trainer reads lives here, next to
the config files' defaults (configs/pretrain.py, configs/uptrain.py, and the blocks they share:
config_blocks.py). tests/test_train_cli.py checks that every key of every config variant has a
line and that no line names a key that no config has.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterator

DESCRIPTIONS: dict[str, str] = {
    "seed": "seed of the params' initialisation (scratch) and of the training batch order",
    # --- where the params come from (train.py: resume > init_checkpoint > scratch)
    "init_checkpoint": "'' = train from scratch (config.model); else a checkpoint, a training "
                       "workdir (its latest checkpoint) or a Hugging Face folder to start from",
    "num_kv_heads": "G, KV heads of the trained model: -1 = MHA from scratch (num_heads), the "
                    "init checkpoint's own otherwise; fewer pools the init checkpoint's K/V heads",
    "convert_method": "how K/V heads are pooled when num_kv_heads pools: mean | first | random | "
                      "mean_normed",
    "convert_seed": "seed of convert_method='random'",
    "init_optimizer_state": "restore init_checkpoint's optimizer state (Adam moments and count) "
                            "with its params: this project's checkpoint of the same model, no "
                            "conversion (num_kv_heads=-1); the schedule still starts at step 0",
    "distill.weight": "lambda in loss = (1 - lambda) cross-entropy + lambda T^2 KL(teacher || "
                      "student) (train_step.Distill); 0 = no distillation, no teacher read or run",
    "distill.temperature": "T, the temperature of both softmaxes in the KL term",
    "distill.teacher": "the teacher: '' = init_checkpoint before pooling, else a checkpoint, "
                       "workdir or Hugging Face folder of the same vocabulary",
    "model": "the architecture for training from scratch; None = it comes from init_checkpoint",
    "model.vocab_size": "token ids the model embeds (257 for the byte tokenizer: bytes + BOS)",
    "model.d_model": "width of the residual stream",
    "model.num_layers": "decoder blocks",
    "model.num_heads": "query heads per layer",
    "model.mlp_dim": "hidden width of the SwiGLU MLP",
    "model.head_dim": "per-head width; None = d_model // num_heads",
    "model.rope_theta": "RoPE base frequency",
    "model.norm_eps": "RMSNorm epsilon",
    "model.tie_embeddings": "share the input embedding with the output projection",
    "model.qkv_bias": "biases on the q/k/v projections",
    "model.o_bias": "bias on the attention output projection",
    # --- data (data.py)
    "data.source": "'stdlib' (the Python standard library's source, no download) | 'files' "
                   "(data.path globs) | 'hf' (a Hugging Face dataset name)",
    "data.path": "source 'files': comma-separated globs of .txt/.jsonl/.parquet files",
    "data.val_path": "source 'files': validation globs ('' = split data.path by hash)",
    "data.hf_name": "source 'hf': the dataset name",
    "data.hf_config": "source 'hf': the dataset's config name",
    "data.train_split": "source 'hf': the split trained on",
    "data.val_split": "source 'hf': the validation split ('' = split train_split by hash)",
    "data.text_field": "the text column of jsonl/parquet rows and Hugging Face datasets",
    "data.val_fraction": "share of documents (stdlib: files) held out for validation, by hash",
    "data.tokenizer": "'byte', a tokenizer.json path, or 'auto' (the init checkpoint's own)",
    "data.seq_len": "predicted tokens per training and validation window",
    "data.cache_dir": "where the splits' token stores are prepared and read ('' = "
                      "WORKDIR/data_cache; `python -m gqa_uptrain.data prepare` fills it ahead)",
    "data.streaming": "sources 'files' / 'hf': read the rows through `datasets` streaming (no "
                      "Arrow copy of the raw data) rather than its Arrow cache; the same store",
    "data.prefetch": "training batches built ahead on a background thread (0 = off); the "
                     "batches are the same either way (prefetch.py)",
    # --- length and batch
    "num_steps": "optimizer steps of the run; -1 = alpha x the init checkpoint's training steps",
    "alpha": "uptraining share of the source run's steps, read when num_steps == -1",
    "batch_size": "sequences per optimizer step, all devices together",
    "grad_accum_steps": "micro-batches per step (must divide batch_size)",
    # --- how a step computes (config_blocks.compute_keys)
    "param_dtype": "master weights' dtype, for every init source (float32 | bfloat16; the "
                   "optimizer state is float32 either way; precision.py)",
    "compute_dtype": "dtype of matmuls and activations: auto (bfloat16 on accelerators, float32 "
                     "on CPU) | float32 | bfloat16; float16 is refused (no loss scaling)",
    "scan_layers": "run the layers as one jax.lax.scan over stacked params (compile time does "
                   "not grow with depth; checkpoints stay per layer)",
    "remat": "what the backward pass recomputes: none | full (each block) | dots (all but the "
             "matmuls without batch dims)",
    "loss_chunk_size": "positions per chunk of the cross-entropy, so full [batch, seq, vocab] "
                       "logits never exist (0 = no chunking)",
    "attention_implementation": "auto | reference | xla | einsum_vjp | pallas (attention.py)",
    # --- optimizer (optim.py)
    "optimizer.learning_rate": "peak learning rate",
    "optimizer.schedule": "cosine | constant | wsd (warmup-stable-decay)",
    "optimizer.warmup_steps": "linear warmup W: lr = peak (s + 1) / W at step s < W, so step 0 "
                              "moves the weights (capped at num_steps)",
    "optimizer.decay_fraction": "wsd only: share of num_steps spent in the final decay",
    "optimizer.min_lr_ratio": "final learning rate as a fraction of the peak (cosine, wsd)",
    "optimizer.b1": "AdamW first-moment decay",
    "optimizer.b2": "AdamW second-moment decay",
    "optimizer.eps": "AdamW epsilon",
    "optimizer.weight_decay": "AdamW decoupled weight decay",
    "optimizer.clip_norm": "clip gradients to this global norm (0 = no clipping)",
    # --- cadence and output (may change on resume: train.RESUMABLE_CHANGES)
    "log_every": "steps between training-metric lines (metrics.jsonl, TensorBoard)",
    "eval_every": "steps between validations (0 = only at the end)",
    "eval_batches": "batches per periodic validation (-1 = the whole validation split)",
    "final_eval_batches": "batches of the last step's validation (-1 = the whole split, 0 = none)",
    "checkpoint_every": "steps between checkpoints (0 = only at the end; always on SIGINT/SIGTERM)",
    "keep_checkpoints": "newest checkpoints kept in WORKDIR/checkpoints",
    "mesh.data": "devices on the data-parallel axis (-1 = the remaining devices)",
    "mesh.fsdp": "devices on the fully-sharded axis (params and optimizer state sharded)",
    "mesh.tensor": "devices on the tensor-parallel axis (heads and MLP columns)",
    "progress_bar": "show a tqdm progress bar on stderr",
}


def flat_keys(config: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a (Config)dict; a None sub-config is a leaf."""
    for key, value in config.items():
        if hasattr(value, "items"):
            yield from flat_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def closest(key: str, known: list[str]) -> str | None:
    """The known key most like `key` (a typo's intended key), or None."""
    # Whole dotted keys: a typo in a leaf (`num_stepz`, `optimizer.learnin_rate`) stays close to
    # its intended key.
    matches = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return matches[0] if matches else None


def describe(config: Any) -> str:
    """The resolved config, one `key = value  # description` line per key (ValueError naming any
    key without a description)."""
    items = list(flat_keys(config))
    missing = [k for k, _ in items if k not in DESCRIPTIONS]
    if missing:
        raise ValueError(f"config keys without a description in gqa_uptrain/config_keys.py: "
                         f"{missing}")
    width = max(len(f"{k} = {v!r}") for k, v in items)
    return "\n".join(f"{f'{k} = {v!r}':<{width}}  # {DESCRIPTIONS[k]}" for k, v in items)

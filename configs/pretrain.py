r"""Pretrain a multi-head-attention (MHA) decoder from scratch on the embedded corpus.

    # under a minute on 2 CPU cores
    python -m gqa_uptrain.train --config=configs/pretrain.py:smoke --workdir=workdirs/pretrain_smoke
    # the CPU default: ~14 minutes on 2 idle CPU cores; validation loss 1.30 nats/token against a
    # unigram entropy of 3.19 (ratio 0.41; measured once, on a shared and much slower machine)
    python -m gqa_uptrain.train --config=configs/pretrain.py --workdir=workdirs/pretrain_cpu
    # a larger model for an accelerator
    python -m gqa_uptrain.train --config=configs/pretrain.py:size=base --workdir=workdirs/pretrain_base

Argument (after the colon, comma-separated): `smoke` (a tiny run), `size=cpu|base`. Any leaf can be
overridden with --config.a.b=value; unknown keys are errors (the config is locked).

Data: the Python standard library's own source, byte-level (vocab 257: bytes + BOS), see data.py.
Rerunning the same command after a kill resumes from the workdir's latest checkpoint.
"""

import ml_collections
from ml_collections import config_dict

from gqa_uptrain import config_blocks
from gqa_uptrain.config_args import parse_config_arg

# Model sizes. 'cpu': 4 layers, d_model 256, 8 heads of 32 (so it can be pooled to 4, 2 or 1 KV
# heads): 3.5M params. On 2 idle CPU cores a step of 16 x 256 tokens takes ~2.2 s (~1.8k tokens/s:
# measured on this project's 2-core AMD EPYC machine, ~1,850 tokens/s for this shape with 4 heads of
# 64, and 8 heads of 32 measured as fast; `bench train` later measured 1.8 s a step, README
# "Performance"); 350 steps = 1.4M tokens ≈ 13 minutes, plus ~1 minute of validation (the last one
# scores the whole split, ~120k tokens).
SIZES = {
    "cpu": dict(d_model=256, num_layers=4, num_heads=8, mlp_dim=768),
    "base": dict(d_model=768, num_layers=12, num_heads=12, mlp_dim=2048),
}




def get_config(arg=None):
    args = parse_config_arg(arg, smoke=False, size="cpu")
    if args["size"] not in SIZES:
        raise ValueError(f"size={args['size']!r} is not one of {sorted(SIZES)}")
    c = ml_collections.ConfigDict()
    c.seed = 0  # params init and batch order

    # Where the params come from (train.py): resume > init_checkpoint > scratch from `model`.
    c.init_checkpoint = ""  # '' = scratch
    # G, the one dial for KV heads: -1 = MHA from scratch (num_heads KV heads), the checkpoint's
    # own with init_checkpoint; a number trains GQA from scratch or pools init_checkpoint's K/V.
    c.num_kv_heads = -1
    c.convert_method = "mean"  # pooling.METHODS
    c.convert_seed = 0  # for convert_method='random'
    # Off here as in configs/uptrain.py, which explains them: restore init_checkpoint's optimizer
    # state (the same model continued), and distillation from a teacher (weight 0 = none).
    c.init_optimizer_state = False
    c.distill = ml_collections.ConfigDict(dict(weight=0.0, temperature=1.0, teacher=""))

    c.model = ml_collections.ConfigDict(dict(
        vocab_size=257,  # byte tokenizer: 256 bytes + BOS
        head_dim=config_dict.placeholder(int),  # None -> d_model // num_heads
        rope_theta=10000.0,
        norm_eps=1e-6,
        tie_embeddings=False,
        qkv_bias=False,
        o_bias=False,
        **SIZES[args["size"]],
    ))

    c.data = config_blocks.data_block(tokenizer="byte")  # the stdlib corpus, windows of 256

    c.num_steps = 350  # see SIZES: ~14 minutes on 2 idle CPU cores
    c.alpha = 0.0  # only read when num_steps == -1 (uptraining: alpha x the source's steps)
    c.batch_size = 16  # sequences per step (all devices together): 16 x 256 = 4k tokens
    c.grad_accum_steps = 1  # micro-batches per step (batch_size must divide)
    c.update(config_blocks.compute_keys())  # precision, scanned layers, remat, loss

    # AdamW, cosine to 0.1 x the peak (config_blocks.optimizer_block).
    c.optimizer = config_blocks.optimizer_block(
        learning_rate=3e-3,  # high for a transformer, right for a 3M-param model on few steps
        warmup_steps=30)

    # Validation on 4 batches every 100 steps and on the whole split at the end; a checkpoint
    # every 100 steps (the last 3 kept); all devices on the data axis (config_blocks.output_keys).
    c.update(config_blocks.output_keys(log_every=10, eval_every=100, checkpoint_every=100))

    if args["size"] == "base":  # an accelerator run: ~85M params, 64 x 1024 tokens a step
        c.data.seq_len = 1024
        c.batch_size = 64
        c.num_steps = 20000
        c.optimizer.learning_rate = 6e-4
        c.optimizer.warmup_steps = 1000
        c.eval_every = 1000
        c.eval_batches = 16
        c.checkpoint_every = 1000

    if args["smoke"]:  # a tiny model, a few steps: the whole pipeline in under a minute
        c.model.update(d_model=64, num_layers=2, num_heads=4, mlp_dim=128)
        c.data.seq_len = 64
        c.batch_size = 8
        c.num_steps = 20
        c.optimizer.warmup_steps = 5
        c.log_every = 5
        c.eval_every = 10
        c.eval_batches = 2
        c.final_eval_batches = 4
        c.checkpoint_every = 10
    return c

r"""Uptrain a GQA model converted from an MHA checkpoint (Ainslie et al. 2023): pool the K/V heads
to num_kv_heads groups, then continue pretraining for alpha x the source run's steps.

    # pool the CPU pretraining run's 8 KV heads to 2, uptrain alpha = 0.05 of its steps
    python -m gqa_uptrain.train --config=configs/uptrain.py:num_kv_heads=2 \
        --config.init_checkpoint=workdirs/pretrain_cpu --workdir=workdirs/uptrain_g2
    # under a minute: from the pretrain smoke run
    python -m gqa_uptrain.train --config=configs/uptrain.py:smoke,num_kv_heads=2 \
        --config.init_checkpoint=workdirs/pretrain_smoke --workdir=workdirs/uptrain_smoke
    # from a Hugging Face folder (steps must be given: it records no pretraining steps)
    python -m gqa_uptrain.train --config=configs/uptrain.py:num_kv_heads=4 \
        --config.init_checkpoint=/path/to/llama --config.num_steps=500 --workdir=workdirs/up_hf

Argument (after the colon): `num_kv_heads=G` (-1, the default, keeps the source's heads: the
"MHA uptrained for the same alpha" control), `method=mean|first|random|mean_normed`
(pooling.METHODS), `smoke`.

init_checkpoint is a checkpoint or a workdir (its latest checkpoint) of this project, or a Hugging
Face folder (config.json + safetensors; its tokenizer.json becomes the tokenizer, data.tokenizer =
'auto'). Data and model-independent settings match configs/pretrain.py so that, as in the paper,
uptraining continues the same pretraining on the same data; the model comes from the checkpoint.
"""

import ml_collections

from gqa_uptrain import config_blocks
from gqa_uptrain.config_args import parse_config_arg




def get_config(arg=None):
    args = parse_config_arg(arg, num_kv_heads=-1, method="mean", smoke=False)
    c = ml_collections.ConfigDict()
    c.seed = 1  # batch order; differs from pretraining's 0 so uptraining does not replay its batches

    c.init_checkpoint = ""  # required: --config.init_checkpoint=PATH
    c.num_kv_heads = args["num_kv_heads"]
    c.convert_method = args["method"]
    c.convert_seed = 0
    c.model = None  # the architecture comes from init_checkpoint

    # The same data as pretraining (config_blocks.data_block), the same val_fraction included, so
    # the validation split stays unseen.
    c.data = config_blocks.data_block(
        tokenizer="auto")  # the source's own: byte for this project's runs, tokenizer.json for HF

    # The paper's headline: alpha = 0.05 of the pretraining steps. -1 reads the source's steps
    # from its checkpoint (meta.json); a Hugging Face source needs num_steps set explicitly.
    c.num_steps = -1
    c.alpha = 0.05
    c.batch_size = 16  # as pretraining, so alpha x steps is alpha x tokens
    c.grad_accum_steps = 1
    c.update(config_blocks.compute_keys())  # precision, scanned layers, remat, loss

    # The recipe. A fresh optimizer: the source's Adam moments belong to the unpooled K/V heads
    # (different shapes and statistics) and a Hugging Face source has none.
    c.optimizer = config_blocks.optimizer_block(
        # A third of pretraining's peak (3e-3): the converted model already sits near a good
        # solution; re-warming to the full peak first undoes part of the pretraining (the loss
        # rises before it falls), while pretraining's final rate (3e-4) moves the pooled heads too
        # little in alpha x steps. Worth sweeping with alpha.
        learning_rate=1e-3,
        # Cosine to 0.1 x peak over the uptraining, like pretraining's schedule, so the run ends
        # annealed and its loss is comparable with the source's final loss.
        schedule="cosine",
        # Fresh Adam moments: with bias correction its first updates are full-size (about lr per
        # parameter whatever the gradient), so a short warmup keeps them from jolting the converted
        # weights. Short, because alpha x steps is short: 18 steps for the CPU pretraining run.
        # The trainer caps it at num_steps.
        warmup_steps=5)

    # Validation every 10 steps and at step 0 (the converted model's loss before any uptraining).
    c.update(config_blocks.output_keys(log_every=5, eval_every=10, checkpoint_every=10))

    if args["smoke"]:  # matches configs/pretrain.py:smoke
        c.data.seq_len = 64
        c.batch_size = 8
        c.num_steps = 10
        c.optimizer.warmup_steps = 2
        c.log_every = 5
        c.eval_every = 5
        c.eval_batches = 2
        c.final_eval_batches = 4
        c.checkpoint_every = 5
    return c

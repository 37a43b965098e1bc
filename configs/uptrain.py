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
    args = parse_config_arg(arg, num_kv_heads=-1, method="mean", smoke=False,
                            **{name: False for name in POD_PRESETS})
    c = ml_collections.ConfigDict()
    c.seed = 1  # batch order; differs from pretraining's 0 so uptraining does not replay its batches

    c.init_checkpoint = ""  # required: --config.init_checkpoint=PATH
    c.num_kv_heads = args["num_kv_heads"]
    c.convert_method = args["method"]
    c.convert_seed = 0
    c.model = None  # the architecture comes from init_checkpoint
    # The optimizer of a converted model starts fresh (see c.optimizer); True restores the init
    # checkpoint's Adam state instead, for continuing the *same* model (the MHA reference run of
    # experiments/, at pretraining's final rate) and nothing else: the trainer refuses it with a
    # conversion or a source without optimizer state.
    c.init_optimizer_state = False

    # Distillation from the model before conversion (Ainslie et al. uptrain on the LM loss only:
    # off by default, so the default run is the paper's recipe).
    c.distill = ml_collections.ConfigDict(dict(
        # lambda in (1 - lambda) CE + lambda T^2 KL(teacher || student); 0 = off, no teacher built.
        # 0.5 is the usual starting point when turning it on (Hinton et al. 2015 weigh the two
        # terms alike once the T^2 factor has made their gradients comparable).
        weight=0.0,
        # T = 1: the teacher's own distribution. The pooled student starts close to its teacher, so
        # the distribution itself, not a softened one, is what it lost; higher T stresses the
        # teacher's small probabilities (the T^2 factor keeps the term's scale).
        temperature=1.0,
        # '' = init_checkpoint before pooling: the MHA this GQA model was converted from. A path
        # when init_checkpoint is already converted (the suite's runs: pass the MHA's workdir).
        teacher=""))

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
    for name, mesh in POD_PRESETS.items():
        if args[name]:
            _llama2_7b_gqa8(c, **mesh)
    return c


# Uptraining Llama-2-7B (MHA, 32 heads) to GQA-8 on one pod slice: the mesh of each preset, and the
# sequences per device of one micro-batch (python -m gqa_uptrain.plan shows the memory they take).
POD_PRESETS = {
    "llama2_7b_gqa8_h100x8": dict(mesh=(1, 8, 1), seqs_per_device=4, remat="full"),
    "llama2_7b_gqa8_v5e64": dict(mesh=(1, 64, 1), seqs_per_device=1, remat="full"),
}


def _llama2_7b_gqa8(c, *, mesh, seqs_per_device, remat):
    """The paper's recipe at Llama-2-7B scale. Set --config.init_checkpoint=PATH/Llama-2-7b-hf and
    the data (config.data: a token store of the pretraining-like corpus, data.py); plan it first
    with python -m gqa_uptrain.plan --config=configs/uptrain.py:PRESET --model=llama2_7b
    --hardware=h100|v5e."""
    data, fsdp, tensor = mesh
    devices = data * fsdp * tensor
    c.num_kv_heads = 8  # GQA-8, the paper's headline (Ainslie et al. 2023, Table 1)
    c.convert_method = "mean"
    c.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
    # ZeRO-3 over every chip: 6.7B params' float32 weights + Adam moments are ~80 GB, too much for
    # one H100 (or 16 v5e chips) unless split; fsdp splits them with the batch.
    c.data.seq_len = 4096  # Llama-2's context length
    c.remat = remat  # 'full': the block inputs only; 'dots' keeps ~1.6 GiB/layer at 4 x 4096
    # 1M tokens per optimizer step (Llama-2 pretrained with 4M): accumulation to 256 sequences.
    micro = devices * seqs_per_device
    c.grad_accum_steps = max(256 // micro, 1)
    c.batch_size = micro * c.grad_accum_steps
    tokens_per_step = c.batch_size * c.data.seq_len
    # The paper's alpha = 0.05 of pretraining: Llama-2-7B was pretrained on 2.0T tokens (Touvron et
    # al. 2023), so 100B tokens; a Hugging Face source records no steps, hence num_steps here.
    c.alpha = 0.05
    c.num_steps = int(round(c.alpha * 2.0e12 / tokens_per_step))
    # Llama-2's final pretraining rate (10% of its 3e-4 peak): the converted model sits at the end
    # of pretraining, and re-warming far above it undoes part of it (the CPU runs' lesson: a 1e-3
    # re-warm left the MHA reference worse than its source). 2000 warmup steps for the fresh Adam
    # moments (~2% of the run), cosine to a tenth.
    c.optimizer.update(learning_rate=3e-5, warmup_steps=2000, schedule="cosine")
    # Bounded evaluation: 4 batches (4M tokens) every 1000 steps, 16 batches (17M tokens) at the
    # end; the whole validation split of a 50B-token corpus would be ~1B tokens.
    c.update(log_every=10, eval_every=1000, eval_batches=4, final_eval_batches=16,
             checkpoint_every=500, keep_checkpoints=2)

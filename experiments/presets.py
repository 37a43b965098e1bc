"""The reproduction suite's presets: model, pretraining length P, which runs, and the speed setting.

A preset is data; experiments/planning.py turns it into runs. Each preset's docstring records its
token arithmetic: params, tokens per step, steps of every run, alpha x P. Throughputs quoted are the
ones measured on this project's 2-core CPU by this project's trainer: ~2.9-3.0k tokens/s for the
0.92M-param `cpu` model (its first real run; an earlier estimate of ~7k for a 1M model, scaled
from a larger shape, was far off for this one), ~1.5k for the 3.5M `full` model (`bench train`).
The `cpu` and `methods` runs' wall times are in the README's results sections.

Run counts, with A = ablation KV heads, S = seeds, M = ablation methods, W = sweep KV heads, B =
scratch KV heads, alpha = 0.05 and alpha_max = 0.1 (in steps of P):
    pretrain (MHA)           P
    continue (MHA)           alpha P
    uptrain, every G < N     alpha P each                      (mean, seed 0)
    ablation                 alpha P x (|A| x M x S - |A|)      (mean seed 0 is the uptrain run)
    sweep (Fig. 5)           alpha_max P x |W|                  (checkpoints at every alpha)
    scratch                  (1 + alpha) P x |B|
"""

from __future__ import annotations

import dataclasses
import math

from gqa_uptrain import heads

# The paper's uptraining proportions (Fig. 5) and its headline alpha.
SWEEP_ALPHAS = (0.0, 0.01, 0.02, 0.05, 0.1)
ALPHA = 0.05


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    # model.ModelConfig fields; vocab 257 (byte tokenizer), num_kv_heads = num_heads (the MHA source)
    d_model: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    seq_len: int
    batch_size: int
    pretrain_steps: int  # P
    pretrain_warmup_steps: int
    kv_heads: tuple[int, ...]  # every G < num_heads: converted, evaluated at alpha 0, uptrained
    sweep_kv_heads: tuple[int, ...]  # Fig. 5: one constant-schedule uptraining run each
    ablation_kv_heads: tuple[int, ...]  # Fig. 4
    ablation_methods: tuple[str, ...]  # names in merging.METHODS (planning.METHODS)
    ablation_seeds: tuple[int, ...]
    scratch_kv_heads: tuple[int, ...]  # GQA from scratch for (1 + alpha) P steps
    eval_batches: int  # validation batches of batch_size x seq_len per evaluation; -1 = whole split
    speed_batch: int  # decode timing: sequences per step ...
    speed_context: int  # ... each holding this many cached tokens
    speed_repeats: int
    doc: str = ""  # the token arithmetic (printed by --list_presets)
    alpha: float = ALPHA
    sweep_alphas: tuple[float, ...] = SWEEP_ALPHAS

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def steps(self, alpha: float) -> int:
        """Uptraining steps for proportion alpha of pretraining."""
        return round(alpha * self.pretrain_steps)

    @property
    def uptrain_warmup_steps(self) -> int:
        # Warmup ends at the alpha = 0.01 checkpoint, so every swept point past it was trained at
        # the full rate (and the alpha = 0.05 runs warm up for a fifth of their steps).
        return max(1, self.steps(min(a for a in self.sweep_alphas if a > 0)))

    def total_steps(self) -> dict[str, int]:
        """Training steps per kind of run (the docstring's table), and their sum."""
        up = self.steps(self.alpha)
        out = {
            "pretrain": self.pretrain_steps,
            "continue": up,
            "uptrain": up * len(self.kv_heads),
            "ablation": up * (len(self.ablation_kv_heads) * len(self.ablation_methods)
                              * len(self.ablation_seeds) - len(self.ablation_kv_heads)),
            "sweep": self.steps(max(self.sweep_alphas)) * len(self.sweep_kv_heads),
            "scratch": (self.pretrain_steps + up) * len(self.scratch_kv_heads),
        }
        out["total"] = sum(out.values())
        return out

    def validate(self) -> None:
        """ValueError naming the first inconsistency."""
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        for field in ("kv_heads", "sweep_kv_heads", "ablation_kv_heads", "scratch_kv_heads"):
            for g in getattr(self, field):
                try:
                    heads.group_size(self.num_heads, g)
                except ValueError as e:
                    raise ValueError(f"{field} holds num_kv_heads={g}: {e}") from None
                if g == self.num_heads:
                    raise ValueError(f"{field} holds num_kv_heads={g}: it must be smaller than "
                                     f"num_heads={self.num_heads} (that is MHA)")
        for field in ("sweep_kv_heads", "ablation_kv_heads"):
            if not set(getattr(self, field)) <= set(self.kv_heads):
                raise ValueError(f"{field}={getattr(self, field)} must be a subset of "
                                 f"kv_heads={self.kv_heads}")
        steps = [self.steps(a) for a in self.sweep_alphas]
        if steps[0] != 0 or any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"sweep_alphas={self.sweep_alphas} x P={self.pretrain_steps} give "
                             f"steps {steps}: they must start at 0 and strictly increase")
        if self.alpha not in self.sweep_alphas:
            raise ValueError(f"alpha={self.alpha} must be one of sweep_alphas={self.sweep_alphas}")

    @property
    def sweep_checkpoint_every(self) -> int:
        return math.gcd(*[self.steps(a) for a in self.sweep_alphas if a > 0])


TINY = Preset(
    name="tiny",
    doc="""For tests: seconds per run (compilation), numbers meaningless.
13k params (d 16, 1 layer, 2 heads of 8: G in {1, 2}); 4 x 32 = 128 tokens/step; P = 100 steps
(12.8k tokens); alpha P = 5 steps; ablation on MQA with 2 seeds; 250 training steps in all.""",
    d_model=16, num_layers=1, num_heads=2, mlp_dim=32, seq_len=32, batch_size=4,
    pretrain_steps=100, pretrain_warmup_steps=10,
    kv_heads=(1,), sweep_kv_heads=(1,), ablation_kv_heads=(1,),
    ablation_methods=("mean", "first", "random"), ablation_seeds=(0, 1), scratch_kv_heads=(1,),
    eval_batches=2, speed_batch=2, speed_context=256, speed_repeats=3)

QUICK = Preset(
    name="quick",
    doc="""Every kind of run at toy scale, <= 10 minutes on 2 CPU cores (mostly compilation).
140k params (d 64, 2 layers, 8 heads of 8); 8 x 128 = 1,024 tokens/step; P = 300 steps (0.31M
tokens); alpha P = 15 steps (alpha = 0.01: 3 steps, noise); 1,290 training steps = 1.3M tokens in all;
evaluations on 16 x 8 x 128 = 16k validation tokens. Decode timed at batch 8 x 4,096 tokens.""",
    d_model=64, num_layers=2, num_heads=8, mlp_dim=192, seq_len=128, batch_size=8,
    pretrain_steps=300, pretrain_warmup_steps=20,
    kv_heads=(1, 2, 4), sweep_kv_heads=(1, 2), ablation_kv_heads=(1, 2),
    ablation_methods=("mean", "first", "random"), ablation_seeds=(0, 1, 2), scratch_kv_heads=(1, 2),
    eval_batches=16, speed_batch=8, speed_context=4096, speed_repeats=5)

CPU = Preset(
    name="cpu",
    doc="""The default: <= 60 minutes on 2 CPU cores (measured: see the README's results section).
0.92M params (d 128, 4 layers, 8 heads of 16, MLP 384); 16 x 256 = 4,096 tokens/step;
P = 400 steps = 1.6M tokens; alpha P = 20 steps (alpha = 0.01: 4 steps); training steps:
pretrain 400 + continue 20 + uptrain 60 + ablation 320 + sweep 80 + scratch 840 = 1,720 steps
= 7.0M tokens ≈ 40 minutes at the ~2.9k tokens/s this model trained at here (the first attempt
assumed ~7k and P = 1,000: it would have taken ~100 minutes), plus ~42 evaluations of 12 x 16 x 256
= 49k validation tokens (~6 s each) ≈ 4 minutes, compilation and decode timing (batch 8 x 8,192
tokens: MHA's cache is 256 MiB) ≈ 3 minutes.""",
    d_model=128, num_layers=4, num_heads=8, mlp_dim=384, seq_len=256, batch_size=16,
    pretrain_steps=400, pretrain_warmup_steps=20,
    kv_heads=(1, 2, 4), sweep_kv_heads=(1, 2), ablation_kv_heads=(1, 2),
    ablation_methods=("mean", "first", "random"), ablation_seeds=(0, 1, 2), scratch_kv_heads=(1, 2),
    eval_batches=12, speed_batch=8, speed_context=8192, speed_repeats=10)

FULL = Preset(
    name="full",
    doc="""Every run for every G, a 4x larger model, 12.5x the cpu preset's P: an accelerator or a
long CPU run.
3.5M params (d 256, 4 layers, 8 heads of 32, MLP 768); 16 x 256 = 4,096 tokens/step; P = 5,000
steps = 20.5M tokens; alpha P = 250 steps; training steps: pretrain 5,000 + continue 250 + uptrain
750 + ablation 6,000 + sweep 1,500 + scratch 15,750 = 29,250 steps = 120M tokens: ≈ 23 hours on
this 2-core CPU at the ~1.5k tokens/s `bench train` measured for this shape (d256, batch 16 x 256);
on a GPU the small model is launch-bound (time it there).
Decode timed at batch 16 x 8,192 tokens (MHA's cache: 1 GiB).""",
    d_model=256, num_layers=4, num_heads=8, mlp_dim=768, seq_len=256, batch_size=16,
    pretrain_steps=5000, pretrain_warmup_steps=100,
    kv_heads=(1, 2, 4), sweep_kv_heads=(1, 2, 4), ablation_kv_heads=(1, 2, 4),
    ablation_methods=("mean", "first", "random"), ablation_seeds=(0, 1, 2),
    scratch_kv_heads=(1, 2, 4),
    eval_batches=-1, speed_batch=16, speed_context=8192, speed_repeats=10)

METHODS = dataclasses.replace(
    CPU, name="methods",
    doc="""Conversion methods beyond mean pooling (issue 8) on the `cpu` model: validation loss at
alpha = 0 and after alpha = 0.05 for G in {1, 2, 4}, 3 seeds each of `mean`, `similar+fit` (activation
grouping + function-aware merge) and `similar+fit_o` (the same, output projections re-fitted); the
seed picks the calibration rows (16,384 train-split tokens) and the uptraining batch order. Same
model, P and evaluation as `cpu` (0.92M params, 4,096 tokens/step, P = 400, alpha P = 20 steps);
training steps: pretrain 400 + continue 20 + uptrain 60 + ablation 480 = 960 steps = 3.9M tokens
≈ 23 minutes here. With --reuse_from=<a cpu run> the pretraining, the MHA reference and the mean
runs of G = 1, 2 are copied, leaving 400 steps (mean G = 4 seeds 1-2, 18 calibrated runs) and 21
conversions and 39 evaluations: ≈ 15 minutes.""",
    sweep_kv_heads=(), ablation_kv_heads=(1, 2, 4),
    ablation_methods=("mean", "similar+fit", "similar+fit_o"), scratch_kv_heads=())

TINY_METHODS = dataclasses.replace(
    TINY, name="tiny_methods",
    doc="""For tests: the methods preset's shape on the tiny model (mean and similar+fit, G = 1, 2 seeds),
125 training steps in all; meant to run with --reuse_from=<a tiny run>: 2 runs of 5 steps remain.""",
    sweep_kv_heads=(), ablation_methods=("mean", "similar+fit"), scratch_kv_heads=())

PRESETS = {p.name: p for p in (TINY, TINY_METHODS, QUICK, CPU, FULL, METHODS)}
for _p in PRESETS.values():
    _p.validate()

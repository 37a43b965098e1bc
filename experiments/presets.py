"""The reproduction suite's presets: model, pretraining length P, which runs, and the speed setting.

A preset is data; experiments/planning.py turns it into runs. Each preset's docstring records its
token arithmetic: params, tokens per step, steps of every run, alpha x P. Throughputs quoted are the
ones measured on this project's 2-core CPU by this project's trainer: ~2.9-3.0k tokens/s for the
0.92M-param `cpu` model (its first real run; an earlier estimate of ~7k for a 1M model, scaled
from a larger shape, was far off for this one), ~1.5k for the 3.5M `full` model (`bench train`).
The `cpu` and `methods` runs' wall times are in the README's results sections.

Run counts, with A = ablation KV heads, S = seeds, M = ablation methods, W = sweep KV heads, B =
scratch KV heads, R = pretraining seeds, L = swept learning rates x swept methods x swept KV heads,
alpha = 0.05 and alpha_max = 0.1 (in steps of P):
    pretrain (MHA)           P x R
    reference (MHA)          alpha P x R                        (its optimizer state continued)
    continue (MHA)           alpha P x R                        (the GQA recipe)
    lr sweep                 alpha P x L                        (pretraining seed 0)
    uptrain, every G < N     alpha P each x R                   (mean, seed 0)
    ablation                 alpha P x (|A| x M x S - |A|) x R  (mean seed 0 is the uptrain run)
    sweep (Fig. 5)           alpha_max P x |W|                  (pretraining seed 0)
    scratch                  (1 + alpha) P x |B| x R
    distill                  alpha P x |D| x R                  (D = distill KV heads)
    matched (plain, = FLOPs) round(alpha P x F_G) per G of D x R (F_G: distill_flops_ratio)
Training steps the lr sweep shares with the uptraining runs (seed 0 of pretraining seed 0 at the
chosen rate: one workdir) are counted once. total_steps() is this table; cost() turns it into time
at a measured throughput (--list_presets prints both), a distilled step priced at F_G ≈ 1.4 plain
steps (the teacher's forward).

Evaluation: every run is scored on the whole validation split (eval_batches = -1: every window of
the ~16 held-out files, ~122k tokens), the same tokens for every run, so differences are paired and
no file is left out (a prefix of the stream, as before, covered 4 of the 16 files). Only the test
presets score a fixed prefix, to stay seconds long.
"""

from __future__ import annotations

import dataclasses
import math

from gqa_uptrain import heads

# The paper's uptraining proportions (Fig. 5) and its headline alpha.
SWEEP_ALPHAS = (0.0, 0.01, 0.02, 0.05, 0.1)
ALPHA = 0.05
# Decode timing rounds of the CPU presets. The three earlier measurements of the same cpu models
# gave GQA-4 1.10x, 1.05x and 1.03x (median of 10): a 5% difference was inside the noise. With 60
# alternated rounds the 95% interval of a median spans its 22nd to 39th of 60 values, about
# +-0.3 interquartile ranges; a cpu decode step is ~20 ms, so 60 rounds of 4 G's cost ~5 s.
SPEED_REPEATS = 60
# Tokens the whole validation split scores with the byte tokenizer (the README's 122k-token
# split): what an eval_batches = -1 evaluation costs.
VALIDATION_TOKENS = 122_000
EVAL_SPEEDUP = 3.0  # evaluation tokens/s over training tokens/s (Preset.cost)


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
    # Alternated rounds of every G's decode step: enough for a 95% interval of each median and
    # of each paired speed-up (perf.median_ci needs >= 6); see SPEED_REPEATS.
    speed_repeats: int
    doc: str = ""  # the token arithmetic (printed by --list_presets)
    alpha: float = ALPHA
    sweep_alphas: tuple[float, ...] = SWEEP_ALPHAS
    # Pretraining seeds (init and batch order of the MHA source): every run but the lr and alpha
    # sweeps is repeated per seed and the tables give mean ± std over them. The first must be 0.
    pretrain_seeds: tuple[int, ...] = (0,)
    # Uptraining peak learning rates tried per method (lr runs); the best (lowest loss averaged
    # over lr_sweep_kv_heads) is used by all of that method's uptraining. Empty: the recipe's rate
    # (configs/uptrain.py, 1e-3) for every method.
    lr_sweep: tuple[float, ...] = ()
    lr_sweep_methods: tuple[str, ...] = ()
    lr_sweep_kv_heads: tuple[int, ...] = ()
    # Converted and evaluated at alpha = 0 only, beside the ablation (at ablation_kv_heads): the
    # norm-matched mean (pooling.py), which separates "mean shrinks the heads" from "mean blurs them".
    control_methods: tuple[str, ...] = ("mean_normed",)
    # Training tokens/s of this preset's model measured on this project's 2-core CPU by this
    # trainer (0: not measured); cost() prices a re-run with it.
    measured_tokens_per_s: float = 0.0
    # Distillation from the pretrained MHA (planning.py's distill runs): at these G, a `mean`
    # conversion uptrained for alpha P steps with loss (1 - weight) CE + weight T^2 KL, beside its
    # plain uptraining (equal tokens) and a plain run of the same FLOPs. Weight 0.5: the two terms
    # alike (the usual starting point); T = 1: the teacher's own distribution, which the pooled
    # student starts near (configs/uptrain.py).
    distill_kv_heads: tuple[int, ...] = ()
    distill_weight: float = 0.5
    distill_temperature: float = 1.0

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
        # Warmup spans the updates before the alpha = 0.01 checkpoint (the last of them at the
        # peak: optim.make_schedule), so every swept point past it was trained at the full rate
        # (and the alpha = 0.05 runs warm up for a fifth of their steps).
        return max(1, self.steps(min(a for a in self.sweep_alphas if a > 0)))

    def total_steps(self) -> dict[str, int]:
        """Training steps per kind of run (the docstring's table), and their sum."""
        up, r = self.steps(self.alpha), len(self.pretrain_seeds)
        swept = len(self.lr_sweep) * len(self.lr_sweep_methods) * len(self.lr_sweep_kv_heads)
        # seed 0 of pretraining seed 0 of a swept (G, method) is one of the lr runs
        shared = sum(1 for g in self.lr_sweep_kv_heads for m in self.lr_sweep_methods
                     if (m == "mean" and g in self.kv_heads)
                     or (g in self.ablation_kv_heads and m in self.ablation_methods
                         and 0 in self.ablation_seeds))
        from experiments import planning  # noqa: PLC0415 (planning imports this module)

        out = {
            "pretrain": self.pretrain_steps * r,
            "reference": up * r,
            "continue": up * r,
            "lr": up * (swept - shared),
            "uptrain": up * len(self.kv_heads) * r,
            "ablation": up * (len(self.ablation_kv_heads) * len(self.ablation_methods)
                              * len(self.ablation_seeds) - len(self.ablation_kv_heads)) * r,
            "sweep": self.steps(max(self.sweep_alphas)) * len(self.sweep_kv_heads),
            "scratch": (self.pretrain_steps + up) * len(self.scratch_kv_heads) * r,
            "distill": up * len(self.distill_kv_heads) * r,
            "matched": sum(self.steps(planning.matched_alpha(self, g))
                           for g in self.distill_kv_heads) * r,
        }
        out["total"] = sum(out.values())
        return out

    def distill_extra_steps(self) -> float:
        """The distilled steps' teacher forwards, in plain training steps (cost())."""
        from experiments import planning  # noqa: PLC0415

        return sum(self.steps(self.alpha) * (planning.distill_flops_ratio(self, g) - 1)
                   for g in self.distill_kv_heads) * len(self.pretrain_seeds)

    def evaluations(self) -> int:
        """Validation passes: every convert, lr, uptrain and scratch record, and each pretrain
        and continue run's final one; each sweep point (the last one: the trainer's own) once."""
        from experiments import planning  # noqa: PLC0415 (planning imports this module)

        return len(planning.plan(self))

    def cost(self) -> str:
        """What a run of this preset costs on this project's 2-core CPU, one line: training at
        measured_tokens_per_s, evaluation at EVAL_SPEEDUP x that (a forward is a third of a
        training step's FLOPs; the cpu run's 49k-token evaluations took ~6 s, ~8k tokens/s for
        2.9k training). Compilation and decode timing (minutes) are not included."""
        if not self.measured_tokens_per_s:
            return "not priced: this model's training throughput was not measured here"
        steps = self.total_steps()["total"]
        train_s = ((steps + self.distill_extra_steps()) * self.tokens_per_step
                   / self.measured_tokens_per_s)
        per_eval = VALIDATION_TOKENS if self.eval_batches < 0 else min(
            VALIDATION_TOKENS, self.eval_batches * self.tokens_per_step)
        eval_s = self.evaluations() * per_eval / (EVAL_SPEEDUP * self.measured_tokens_per_s)
        return (f"~{(train_s + eval_s) / 3600:.1f} hours: training {train_s / 60:.0f} min "
                f"({steps:,} steps, distilled ones priced with their teacher's forward, x "
                f"{self.tokens_per_step:,} tokens at "
                f"{self.measured_tokens_per_s:,.0f} tokens/s) + {self.evaluations()} evaluations "
                f"of {per_eval:,} tokens {eval_s / 60:.0f} min; compilation and decode timing not "
                "included")

    def validate(self) -> None:
        """ValueError naming the first inconsistency."""
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        for field in ("kv_heads", "sweep_kv_heads", "ablation_kv_heads", "scratch_kv_heads",
                      "distill_kv_heads"):
            for g in getattr(self, field):
                try:
                    heads.group_size(self.num_heads, g)
                except ValueError as e:
                    raise ValueError(f"{field} holds num_kv_heads={g}: {e}") from None
                if g == self.num_heads:
                    raise ValueError(f"{field} holds num_kv_heads={g}: it must be smaller than "
                                     f"num_heads={self.num_heads} (that is MHA)")
        for field in ("sweep_kv_heads", "ablation_kv_heads", "distill_kv_heads"):
            if not set(getattr(self, field)) <= set(self.kv_heads):
                raise ValueError(f"{field}={getattr(self, field)} must be a subset of "
                                 f"kv_heads={self.kv_heads}")
        steps = [self.steps(a) for a in self.sweep_alphas]
        if steps[0] != 0 or any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"sweep_alphas={self.sweep_alphas} x P={self.pretrain_steps} give "
                             f"steps {steps}: they must start at 0 and strictly increase")
        if self.alpha not in self.sweep_alphas:
            raise ValueError(f"alpha={self.alpha} must be one of sweep_alphas={self.sweep_alphas}")
        if not self.pretrain_seeds or self.pretrain_seeds[0] != 0 or len(
                set(self.pretrain_seeds)) != len(self.pretrain_seeds):
            raise ValueError(f"pretrain_seeds={self.pretrain_seeds} must be distinct and start "
                             "at 0 (the lr and alpha sweeps run on pretraining seed 0)")
        if bool(self.lr_sweep) != bool(self.lr_sweep_methods) or bool(self.lr_sweep) != bool(
                self.lr_sweep_kv_heads) or any(lr <= 0 for lr in self.lr_sweep):
            raise ValueError(f"lr_sweep={self.lr_sweep}, lr_sweep_methods="
                             f"{self.lr_sweep_methods} and lr_sweep_kv_heads="
                             f"{self.lr_sweep_kv_heads} must be all empty or all set (rates > 0)")
        if not set(self.lr_sweep_kv_heads) <= set(self.kv_heads):
            raise ValueError(f"lr_sweep_kv_heads={self.lr_sweep_kv_heads} must be a subset of "
                             f"kv_heads={self.kv_heads}")
        if not 0 < self.distill_weight <= 1 or not self.distill_temperature > 0:
            raise ValueError(f"distill_weight={self.distill_weight} must be in (0, 1] and "
                             f"distill_temperature={self.distill_temperature} > 0")
        if self.speed_repeats < 6:
            raise ValueError(f"speed_repeats={self.speed_repeats}: a 95% interval of a median "
                             "needs >= 6 (perf.median_ci)")

    @property
    def sweep_checkpoint_every(self) -> int:
        return math.gcd(*[self.steps(a) for a in self.sweep_alphas if a > 0])


TINY = Preset(
    name="tiny",
    doc="""For tests: seconds per run (compilation), numbers meaningless.
13k params (d 16, 1 layer, 2 heads of 8: G in {1, 2}); 4 x 32 = 128 tokens/step; P = 100 steps
(12.8k tokens); alpha P = 5 steps; 2 pretraining seeds; lr sweep {3e-4, 1e-3} for mean and first
on MQA; ablation on MQA with 2 seeds; MHA reference (its optimizer state continued); MQA
distilled from the MHA, and plain for 7 steps (its FLOPs); 534 training steps in all. Evaluations
score a 256-token
prefix of the validation split (2 batches), not all of it: seconds, not minutes.""",
    d_model=16, num_layers=1, num_heads=2, mlp_dim=32, seq_len=32, batch_size=4,
    pretrain_steps=100, pretrain_warmup_steps=10,
    kv_heads=(1,), sweep_kv_heads=(1,), ablation_kv_heads=(1,),
    ablation_methods=("mean", "first", "random"), ablation_seeds=(0, 1), scratch_kv_heads=(1,),
    eval_batches=2, speed_batch=2, speed_context=256, speed_repeats=8,
    pretrain_seeds=(0, 1), lr_sweep=(3e-4, 1e-3), lr_sweep_methods=("mean", "first"),
    lr_sweep_kv_heads=(1,), distill_kv_heads=(1,))

QUICK = Preset(
    name="quick",
    doc="""Every kind of run at toy scale (was <= 10 minutes on 2 CPU cores for 1,290 steps with
16k-token evaluations; not timed since the second pretraining seed and whole-split evaluations).
140k params (d 64, 2 layers, 8 heads of 8); 8 x 128 = 1,024 tokens/step; P = 300 steps (0.31M
tokens); alpha P = 15 steps (alpha = 0.01: 3 steps, noise); 2 pretraining seeds; lr sweep
{3e-4, 1e-3} for mean and first at G in {1, 2}; distillation at G in {1, 2} (and plain runs of
its FLOPs: 21 and 20 steps); 2,752 training steps = 2.8M tokens in all; every
evaluation on the whole validation split. Decode timed at batch 8 x 4,096 tokens, 30 rounds.""",
    d_model=64, num_layers=2, num_heads=8, mlp_dim=192, seq_len=128, batch_size=8,
    pretrain_steps=300, pretrain_warmup_steps=20,
    kv_heads=(1, 2, 4), sweep_kv_heads=(1, 2), ablation_kv_heads=(1, 2),
    ablation_methods=("mean", "first", "random"), ablation_seeds=(0, 1, 2), scratch_kv_heads=(1, 2),
    eval_batches=-1, speed_batch=8, speed_context=4096, speed_repeats=30,
    pretrain_seeds=(0, 1), lr_sweep=(3e-4, 1e-3), lr_sweep_methods=("mean", "first"),
    lr_sweep_kv_heads=(1, 2), distill_kv_heads=(1, 2))

CPU = Preset(
    name="cpu",
    doc="""The default (its last run, with one pretraining seed, 1,720 steps and 49k-token
evaluations, took 47 minutes: the README's results section).
0.92M params (d 128, 4 layers, 8 heads of 16, MLP 384); 16 x 256 = 4,096 tokens/step;
P = 400 steps = 1.6M tokens; alpha P = 20 steps (alpha = 0.01: 4 steps); 2 pretraining seeds
(every run but the sweeps twice); lr sweep {3e-4, 1e-3} for mean and first at G in {1, 2};
ablation seeds 0, 1 per pretraining seed (4 runs per method and G); distillation at G in {1, 2}
(weight 0.5, T = 1) beside plain runs of its FLOPs (27 steps: a distilled step is ~1.37 plain
ones); training steps: pretrain 800 + reference 40 + continue 40 + lr 80 + uptrain 120 + ablation
400 + sweep 80 + scratch 1,680 + distill 80 + matched 108 = 3,428 steps = 14.0M tokens ≈ 81
minutes (the teacher's forwards priced in) at the ~2.9k tokens/s this model trained at here, plus
82 evaluations of the whole split (122k tokens; the last run's 49k-token ones took ~6 s, so ~15 s
each) ≈ 19 minutes, compilation and decode timing (batch 8 x 8,192 tokens: MHA's cache is 256
MiB; 60 rounds) ≈ 3 minutes: ≈ 1.7 hours.""",
    d_model=128, num_layers=4, num_heads=8, mlp_dim=384, seq_len=256, batch_size=16,
    pretrain_steps=400, pretrain_warmup_steps=20,
    kv_heads=(1, 2, 4), sweep_kv_heads=(1, 2), ablation_kv_heads=(1, 2),
    ablation_methods=("mean", "first", "random"), ablation_seeds=(0, 1), scratch_kv_heads=(1, 2),
    eval_batches=-1, speed_batch=8, speed_context=8192, speed_repeats=SPEED_REPEATS,
    pretrain_seeds=(0, 1), lr_sweep=(3e-4, 1e-3), lr_sweep_methods=("mean", "first"),
    lr_sweep_kv_heads=(1, 2), measured_tokens_per_s=2900.0, distill_kv_heads=(1, 2))

FULL = Preset(
    name="full",
    doc="""Every run for every G, a 4x larger model, 12.5x the cpu preset's P: an accelerator or a
long CPU run.
3.5M params (d 256, 4 layers, 8 heads of 32, MLP 768); 16 x 256 = 4,096 tokens/step; P = 5,000
steps = 20.5M tokens; alpha P = 250 steps; 2 pretraining seeds; lr sweep {3e-4, 1e-3} for mean and
first at G in {1, 2}; distillation at G in {1, 2}; training steps: pretrain 10,000 + reference
500 + continue 500 + lr 1,000 + uptrain 1,500 + ablation 12,000 + sweep 1,500 + scratch 31,500 +
distill 1,000 + matched 1,372 = 60,872 steps = 249M tokens: ≈ 47 hours on this
2-core CPU at the ~1.5k tokens/s `bench train` measured for this shape (d256, batch 16 x 256); on
a GPU the small model is launch-bound (time it there).
Decode timed at batch 16 x 8,192 tokens (MHA's cache: 1 GiB), 60 rounds.""",
    d_model=256, num_layers=4, num_heads=8, mlp_dim=768, seq_len=256, batch_size=16,
    pretrain_steps=5000, pretrain_warmup_steps=100,
    kv_heads=(1, 2, 4), sweep_kv_heads=(1, 2, 4), ablation_kv_heads=(1, 2, 4),
    ablation_methods=("mean", "first", "random"), ablation_seeds=(0, 1, 2),
    scratch_kv_heads=(1, 2, 4),
    eval_batches=-1, speed_batch=16, speed_context=8192, speed_repeats=SPEED_REPEATS,
    pretrain_seeds=(0, 1), lr_sweep=(3e-4, 1e-3), lr_sweep_methods=("mean", "first"),
    lr_sweep_kv_heads=(1, 2), measured_tokens_per_s=1500.0, distill_kv_heads=(1, 2))

METHODS = dataclasses.replace(
    CPU, name="methods",
    doc="""Conversion methods beyond mean pooling (issue 8) on the `cpu` model: validation loss at
alpha = 0 and after alpha = 0.05 for G in {1, 2, 4}, 3 seeds each of `mean`, `similar+fit` (activation
grouping + function-aware merge) and `similar+fit_o` (the same, output projections re-fitted); the
seed picks the calibration rows (16,384 train-split tokens) and the uptraining batch order. Same
model, P, pretraining seeds and evaluation as `cpu` (0.92M params, 4,096 tokens/step, P = 400,
alpha P = 20 steps), each method's uptraining rate from its own lr sweep {3e-4, 1e-3} at G in
{1, 2}; no distillation; training steps: pretrain 800 + reference 40 + continue 40 + lr 120 +
uptrain 120 + ablation 960 = 2,080 steps = 8.5M tokens ≈ 49 minutes at ~2.9k tokens/s, plus 114
whole-split evaluations (~15 s each) ≈ 27 minutes. With --reuse_from=<a cpu run of the same settings> the pretrainings, the MHA runs,
the mean runs of G = 1, 2 (seeds 0, 1) and mean's lr sweep are copied.""",
    sweep_kv_heads=(), ablation_kv_heads=(1, 2, 4), ablation_seeds=(0, 1, 2),
    ablation_methods=("mean", "similar+fit", "similar+fit_o"), scratch_kv_heads=(),
    lr_sweep_methods=("mean", "similar+fit", "similar+fit_o"), control_methods=(),
    distill_kv_heads=())

TINY_METHODS = dataclasses.replace(
    TINY, name="tiny_methods",
    doc="""For tests: the methods preset's shape on the tiny model (mean and similar+fit, G = 1, 2 seeds,
2 pretraining seeds, both methods' lr swept, no distillation), 270 training steps in all; meant
to run with
--reuse_from=<a tiny run>: the similar+fit runs remain.""",
    sweep_kv_heads=(), ablation_methods=("mean", "similar+fit"), scratch_kv_heads=(),
    lr_sweep_methods=("mean", "similar+fit"), control_methods=(), distill_kv_heads=())

PRESETS = {p.name: p for p in (TINY, TINY_METHODS, QUICK, CPU, FULL, METHODS)}
for _p in PRESETS.values():
    _p.validate()

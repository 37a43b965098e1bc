"""The reproduction suite's plan: which runs a preset has, what each one starts from, and the
training config of each kind of run. Pure: nothing here trains, reads or writes (suite.py executes).

Runs (experiments/presets.py sizes them; results.py names and validates their records):
  pretrain  MHA from scratch for P steps (configs/pretrain.py), once per pretraining seed
  reference the same MHA continued for alpha P steps from its own optimizer state
            (config.init_optimizer_state) at pretraining's final learning rate, constant, no
            warmup: what more pretraining gives, the Δ reference
  continue  the same MHA uptrained for alpha P steps with the GQA uptraining recipe (fresh Adam,
            warmup, `mean`'s learning rate, cosine): the MHA on the GQA recipe, reported beside it
  convert   K/V heads reduced to G by a method (METHODS), saved as a checkpoint, evaluated: alpha 0
            (also the norm-matched `mean_normed` control of the preset's control_methods)
  lr        the learning-rate sweep: a conversion uptrained for alpha P steps at one peak rate of
            preset.lr_sweep (pretraining seed 0, seed 0); each swept method's other uptraining runs
            use the rate with the lowest loss averaged over lr_sweep_kv_heads (best_learning_rate)
  uptrain   a converted checkpoint uptrained for alpha P steps (configs/uptrain.py: cosine schedule)
  sweep     one uptraining run per G to max(alpha) P steps at a CONSTANT learning rate after warmup,
            checkpointed at every swept alpha and evaluated there (Fig. 5: the points share one run,
            so they differ only in steps; a cosine run would anneal differently for each length)
  scratch   GQA from scratch for (1 + alpha) P steps
  distill   a `mean` conversion (G in preset.distill_kv_heads) uptrained for alpha P steps like
            its uptrain run, the loss distilled from the pretrained MHA (config.distill: weight
            preset.distill_weight, temperature preset.distill_temperature); beside it an uptrain
            run of matched_alpha(G) P steps, the plain uptraining of the same FLOPs (the
            teacher's forward counted: distill_flops_ratio)
Every kind but lr and sweep is repeated for each of preset.pretrain_seeds (a run of pretraining seed
p > 0 descends from pretrain_g{N}_s0_p{p}); lr and sweep run on pretraining seed 0 only.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import ml_collections

from experiments import results
from experiments.presets import Preset
from gqa_uptrain import merging, perf, train
from gqa_uptrain.model import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Conversion methods: every name of merging.METHODS ('mean', 'first', 'random', 'similar+fit', ...),
# converted by the converter's own path (convert.convert_checkpoint). Methods that read activations draw their
# calibration rows from the train split with the run's seed (CALIBRATION_TOKENS tokens in rows of
# the preset's seq_len), so for them the seed picks the calibration data as well as the uptraining
# batch order.
METHODS = merging.METHODS
CALIBRATION_TOKENS = 16384


# The preset fields that decide what a run of a given name computes (the rest only choose which runs
# there are): two suite directories that agree on these hold the same record for the same name, so
# one may reuse the other's finished runs (suite.Suite.reuse_from).
# The learning-rate sweep's rates and G decide the rate of every uptraining of a swept method;
# which methods are swept is compared per run (suite.Suite.reuse_from: a method swept in one
# preset and not in the other has other uptraining runs).
RUN_FIELDS = ("d_model", "num_layers", "num_heads", "mlp_dim", "seq_len", "batch_size",
              "pretrain_steps", "pretrain_warmup_steps", "eval_batches", "speed_batch",
              "speed_context", "speed_repeats", "alpha", "sweep_alphas", "lr_sweep",
              "lr_sweep_kv_heads", "distill_weight", "distill_temperature")

# The kinds of run that train (the others: convert, which converts and evaluates).
TRAINING_KINDS = ("pretrain", "reference", "continue", "lr", "uptrain", "sweep", "scratch",
                  "distill")
# Batch-order seeds of uptraining: 1 + seed + UPTRAIN_SEED_STRIDE * pretraining seed, so that no
# uptraining replays the batch order of its own pretraining (seed p) and pretraining seed 0 keeps
# the seeds of before (1 + seed).
UPTRAIN_SEED_STRIDE = 1000


def is_seeded(method: str) -> bool:
    """The conversion depends on the seed (else every seed shares the seed-0 checkpoint)."""
    spec = merging.parse_method(method)
    return spec.merge == "random" or spec.needs_calibration


@dataclasses.dataclass(frozen=True)
class Run:
    kind: str
    num_kv_heads: int
    method: str
    alpha: float
    seed: int
    pretrain_seed: int = 0
    learning_rate: float | None = None  # the swept peak rate of an 'lr' run; None for the others

    @property
    def name(self) -> str:
        return results.run_name(self.kind, self.num_kv_heads, self.method, self.alpha, self.seed,
                                self.pretrain_seed, self.learning_rate)


def plan(preset: Preset) -> list[Run]:
    """Every record of the preset, in an order where each run's inputs come before it (the
    learning-rate sweep before every run that uses its choice)."""
    n, a = preset.num_heads, preset.alpha
    runs = [Run("pretrain", n, "scratch", 0.0, 0, p) for p in preset.pretrain_seeds]
    for g in preset.lr_sweep_kv_heads:
        for method in preset.lr_sweep_methods:
            runs.append(Run("convert", g, method, 0.0, convert_seed(method, 0)))
            runs += [Run("lr", g, method, a, 0, 0, lr) for lr in preset.lr_sweep]
    for p in preset.pretrain_seeds:
        runs += [Run("reference", n, "none", a, 0, p), Run("continue", n, "none", a, 0, p)]
        for g in preset.kv_heads:
            runs += [Run("convert", g, "mean", 0.0, 0, p), Run("uptrain", g, "mean", a, 0, p)]
        for g in preset.distill_kv_heads:  # after their conversion and plain uptraining
            runs += [Run("distill", g, "mean", a, 0, p),
                     Run("uptrain", g, "mean", matched_alpha(preset, g), 0, p)]
        if p == preset.pretrain_seeds[0]:
            for g in preset.sweep_kv_heads:
                runs += [Run("sweep", g, "mean", alpha, 0, p) for alpha in preset.sweep_alphas
                         if alpha > 0]
        for g in preset.ablation_kv_heads:
            for method in preset.ablation_methods:
                for seed in preset.ablation_seeds:
                    runs += [Run("convert", g, method, 0.0, convert_seed(method, seed), p),
                             Run("uptrain", g, method, a, seed, p)]
            runs += [Run("convert", g, method, 0.0, 0, p) for method in preset.control_methods]
        for g in preset.scratch_kv_heads:
            runs.append(Run("scratch", g, "scratch", a, 0, p))
    unique = list(dict.fromkeys(runs))  # mean seed 0 is also the main uptrain run; keep the first
    for run in unique:
        if run.kind in ("convert", "lr", "uptrain", "sweep", "distill") and run.method not in METHODS:
            raise ValueError(f"preset {preset.name!r} lists method {run.method!r}, not one of "
                             f"{', '.join(METHODS)}")
    return unique


def best_learning_rate(preset: Preset, method: str, records: dict[str, dict]) -> float | None:
    """The peak rate of preset.lr_sweep with the lowest validation loss after alpha, averaged
    over lr_sweep_kv_heads (pretraining seed 0, seed 0; ties: the first listed), for a swept
    method; None for the others (the config's own rate). records: {name: record}; ValueError
    naming the first missing sweep record."""
    if method not in preset.lr_sweep_methods:
        return None
    mean_loss = {}
    for lr in preset.lr_sweep:
        losses = []
        for g in preset.lr_sweep_kv_heads:
            name = Run("lr", g, method, preset.alpha, 0, 0, lr).name
            if name not in records:
                raise ValueError(f"the learning rate of {method!r} needs the sweep record {name}, "
                                 "which is not finished")
            losses.append(records[name]["val_loss"])
        mean_loss[lr] = sum(losses) / len(losses)
    return min(preset.lr_sweep, key=lambda lr: mean_loss[lr])


def learning_rate(preset: Preset, run: Run, records: dict[str, dict]) -> float | None:
    """The peak rate a training run uses: an 'lr' run's own; pretraining's final rate for the
    reference; the sweep's choice for `mean`'s continue, sweep and distill runs (a distilled run
    differs from its plain uptraining only in the loss) and for the uptraining of swept methods;
    None = the config's own."""
    if run.kind == "lr":
        return run.learning_rate
    if run.kind == "reference":
        return pretrain_final_learning_rate(preset)
    if run.kind in ("continue", "sweep", "distill"):
        return best_learning_rate(preset, "mean", records)
    if run.kind == "uptrain":
        return best_learning_rate(preset, run.method, records)
    return None


def pretrain_final_learning_rate(preset: Preset) -> float:
    """The rate pretraining ends at: its cosine's floor, peak x min_lr_ratio (3e-3 x 0.1)."""
    o = pretrain_config(preset, preset.num_heads, 1, "").optimizer
    return o.learning_rate * o.min_lr_ratio


def distill_flops_ratio(preset: Preset, num_kv_heads: int) -> float:
    """Training FLOPs of a distilled step over a plain one, per token, at G = num_kv_heads: the
    student's forward + backward (perf.train_flops_per_token) plus the MHA teacher's forward, a
    third of its own training FLOPs (about 1 + 1/3 for a teacher of the student's size)."""
    mha = source_model_config(preset)
    student = perf.train_flops_per_token(mha.replace(num_kv_heads=num_kv_heads), preset.seq_len)
    return 1 + perf.train_flops_per_token(mha, preset.seq_len) / 3 / student


def matched_alpha(preset: Preset, num_kv_heads: int) -> float:
    """The uptraining proportion whose plain run costs what the distilled run of alpha P steps
    does (distill_flops_ratio), rounded to whole steps: the equal-FLOPs comparison."""
    steps = round(preset.steps(preset.alpha) * distill_flops_ratio(preset, num_kv_heads))
    return steps / preset.pretrain_steps


def convert_seed(method: str, seed: int) -> int:
    """The seed of the conversion an uptraining run of `seed` starts from."""
    return seed if is_seeded(method) else 0


def source_run(preset: Preset, pretrain_seed: int = 0) -> Run:
    """The MHA pretraining (of one pretraining seed) every other run descends from."""
    return Run("pretrain", preset.num_heads, "scratch", 0.0, 0, pretrain_seed)


def init_run(preset: Preset, run: Run) -> Run | None:
    """The run whose output `run` starts from: the pretraining (reference, continue, convert) or a
    conversion (lr, uptrain, sweep, distill) of the same pretraining seed; None for the runs from
    scratch."""
    p = run.pretrain_seed
    if run.kind in ("reference", "continue", "convert"):
        return source_run(preset, p)
    if run.kind in ("uptrain", "lr", "distill"):
        return Run("convert", run.num_kv_heads, run.method, 0.0,
                   convert_seed(run.method, run.seed), p)
    if run.kind == "sweep":  # one run per (G, method, seed) for all its alphas: seed-0 conversion
        return Run("convert", run.num_kv_heads, run.method, 0.0, 0, p)
    return None


def teacher_run(preset: Preset, run: Run) -> Run | None:
    """The distillation teacher of a distill run: the MHA its conversion was pooled from."""
    return source_run(preset, run.pretrain_seed) if run.kind == "distill" else None


def workdir_name(run: Run, learning_rate: float | None = None) -> str:
    """The directory (under runs/) of a run's training or conversion. A sweep's points share one;
    an uptraining run that is one of the learning-rate sweep's (same conversion, seed and rate:
    the same config) shares that run's (`learning_rate`: the rate it uses)."""
    if run.kind == "sweep":
        suffix = f"_p{run.pretrain_seed}" if run.pretrain_seed else ""
        return f"sweep_g{run.num_kv_heads}_{run.method}_s{run.seed}{suffix}"
    if (run.kind == "uptrain" and learning_rate is not None and run.seed == 0
            and run.pretrain_seed == 0):
        return Run("lr", run.num_kv_heads, run.method, run.alpha, 0, 0, learning_rate).name
    return run.name


# ----------------------------------------------------------------------------- configs


def _config_module(name: str):
    path = os.path.join(REPO, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_suite_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _common(c, preset: Preset, num_steps: int, data_cache: str) -> None:
    c.data.seq_len = preset.seq_len
    c.data.cache_dir = data_cache  # one tokenised corpus for every run
    c.batch_size = preset.batch_size
    c.num_steps = num_steps
    c.eval_every = 0  # no periodic evaluation: only the final one, on the preset's batches
    c.final_eval_batches = preset.eval_batches
    c.log_every = max(1, num_steps // 5)
    # A few resume points per run, but not every step of a short one (each save costs ~0.3 s).
    c.checkpoint_every = max(num_steps // 4, min(num_steps, 20))
    c.keep_checkpoints = 1
    c.progress_bar = False


def pretrain_config(preset: Preset, num_kv_heads: int, num_steps: int, data_cache: str,
                    seed: int = 0):
    """configs/pretrain.py with the preset's model: MHA (num_kv_heads = num_heads) or GQA from
    scratch; `seed` (the pretraining seed) sets the init and the batch order."""
    c = _config_module("pretrain").get_config()
    c.seed = seed
    c.model.update(d_model=preset.d_model, num_layers=preset.num_layers,
                   num_heads=preset.num_heads, mlp_dim=preset.mlp_dim)
    c.num_kv_heads = num_kv_heads
    _common(c, preset, num_steps, data_cache)
    c.optimizer.warmup_steps = preset.pretrain_warmup_steps
    c.lock()
    return c


def uptrain_config(preset: Preset, init_checkpoint: str, num_steps: int, seed: int,
                   data_cache: str, schedule: str = "cosine", pretrain_seed: int = 0,
                   learning_rate: float | None = None):
    """configs/uptrain.py from init_checkpoint (already converted: num_kv_heads = -1 keeps its
    heads), batch order seed 1 + seed + UPTRAIN_SEED_STRIDE x pretrain_seed (pretraining used
    pretrain_seed); learning_rate: the peak (None: configs/uptrain.py's)."""
    c = _config_module("uptrain").get_config()
    c.init_checkpoint = init_checkpoint
    c.seed = 1 + seed + UPTRAIN_SEED_STRIDE * pretrain_seed
    _common(c, preset, num_steps, data_cache)
    c.optimizer.schedule = schedule
    if learning_rate is not None:
        c.optimizer.learning_rate = learning_rate
    c.optimizer.warmup_steps = min(preset.uptrain_warmup_steps, num_steps)
    c.lock()
    return c


def training_config(preset: Preset, run: Run, init_path: str, data_cache: str,
                    learning_rate: float | None = None, teacher_path: str = ""
                    ) -> ml_collections.ConfigDict:
    """The training config of a run of TRAINING_KINDS; init_path: the output of init_run(run)
    (the pretraining's workdir or a converted checkpoint), '' for the runs from scratch;
    learning_rate: an uptraining's peak (the learning_rate function; None: the config's);
    teacher_path: a distill run's teacher (the output of teacher_run(run))."""
    p, ps = preset, run.pretrain_seed
    if run.kind == "pretrain":
        return pretrain_config(p, p.num_heads, p.pretrain_steps, data_cache, seed=ps)
    if run.kind == "scratch":
        return pretrain_config(p, run.num_kv_heads, p.pretrain_steps + p.steps(run.alpha),
                               data_cache, seed=ps)
    if run.kind in ("continue", "uptrain", "lr"):
        return uptrain_config(p, init_path, p.steps(run.alpha), run.seed, data_cache,
                              pretrain_seed=ps, learning_rate=learning_rate)
    if run.kind == "reference":
        # More pretraining: Adam's moments and count restored, the rate pretraining ended at,
        # held constant (with a restored count a schedule would be read from step P; the trainer
        # resets the schedule's count, and a constant schedule is the same at every step anyway).
        config = uptrain_config(p, init_path, p.steps(run.alpha), run.seed, data_cache,
                                schedule="constant", pretrain_seed=ps,
                                learning_rate=learning_rate)
        with config.unlocked():
            config.init_optimizer_state = True
            config.optimizer.warmup_steps = 0  # the moments are warm
        return config
    if run.kind == "distill":
        if not teacher_path:
            raise ValueError(f"{run.name} needs its teacher's path (teacher_run)")
        config = uptrain_config(p, init_path, p.steps(run.alpha), run.seed, data_cache,
                                pretrain_seed=ps, learning_rate=learning_rate)
        with config.unlocked():
            config.distill.update(weight=p.distill_weight, temperature=p.distill_temperature,
                                  teacher=teacher_path)
        return config
    if run.kind == "sweep":
        max_steps = p.steps(max(p.sweep_alphas))
        config = uptrain_config(p, init_path, max_steps, run.seed, data_cache,
                                schedule="constant", pretrain_seed=ps,
                                learning_rate=learning_rate)
        with config.unlocked():
            config.checkpoint_every = p.sweep_checkpoint_every
            config.keep_checkpoints = max_steps // p.sweep_checkpoint_every + 1  # keep them all
        return config
    raise ValueError(f"a {run.kind!r} run does not train")


def source_model_config(preset: Preset) -> ModelConfig:
    """The MHA model every run descends from."""
    c = pretrain_config(preset, preset.num_heads, 1, "")
    return train.scratch_model_config(c)

"""The reproduction suite: a preset's runs, executed in order in one process, each skipped when done.

Runs (experiments/presets.py sizes them; results.py names and validates their records):
  pretrain  MHA from scratch for P steps (configs/pretrain.py)
  continue  the same MHA uptrained for alpha P steps with the uptraining recipe: the fair reference
  convert   K/V heads reduced to G by a method (METHODS), saved as a checkpoint, evaluated: alpha 0
  uptrain   a converted checkpoint uptrained for alpha P steps (configs/uptrain.py: cosine schedule)
  sweep     one uptraining run per G to max(alpha) P steps at a CONSTANT learning rate after warmup,
            checkpointed at every swept alpha and evaluated there (Fig. 5: the points share one run,
            so they differ only in steps; a cosine run would anneal differently for each length)
  scratch   GQA from scratch for (1 + alpha) P steps
Decode speed is measured once for every G (perf.decode_step_setup + perf.measure_decode, variants
alternated) and attached to every record of that G.

Layout of OUTPUT_DIR:
  suite.json            the preset this directory belongs to (a different preset is an error)
  speed.json            decode timing per G
  runs/<run>/           each training's workdir (train.py: resumable) or a converted checkpoint
  records/<name>.json   one finished record each, written atomically: its presence skips the run
  results.json, table.md, *.png   regenerated from the records after every run (a figure with no
                                  data beyond the MHA reference is not written: plots.py)
  data_cache/, jax_cache/         shared by all runs
Interrupting and rerunning the same command continues: finished records are skipped, and a
training interrupted mid-way resumes from its workdir's latest checkpoint. Deleting speed.json
(reproduce.py --remeasure_speed) times decode again and rewrites every record's decode figure.
`reuse_from` copies the finished runs of another directory whose preset computes the same runs
(RUN_FIELDS), e.g. the methods preset reusing a `cpu` run's pretraining and mean conversions.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import time
from typing import Any

import jax

from experiments import plots, results
from experiments.presets import Preset
from gqa_uptrain import checkpoints, convert, evaluate, merging, perf, train
from gqa_uptrain.model import ModelConfig, kv_cache_bytes_per_token

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
# one may reuse the other's finished runs (Suite.reuse_from).
RUN_FIELDS = ("d_model", "num_layers", "num_heads", "mlp_dim", "seq_len", "batch_size",
              "pretrain_steps", "pretrain_warmup_steps", "eval_batches", "speed_batch",
              "speed_context", "speed_repeats", "alpha", "sweep_alphas")


def is_seeded(method: str) -> bool:
    """The conversion depends on the seed (else every seed shares the seed-0 checkpoint)."""
    spec = merging.parse_method(method)
    return spec.merge == "random" or spec.needs_calibration


def log(msg: str) -> None:
    print(f"[reproduce] {msg}", flush=True)


@dataclasses.dataclass(frozen=True)
class Run:
    kind: str
    num_kv_heads: int
    method: str
    alpha: float
    seed: int

    @property
    def name(self) -> str:
        return results.run_name(self.kind, self.num_kv_heads, self.method, self.alpha, self.seed)


def plan(preset: Preset) -> list[Run]:
    """Every record of the preset, in an order where each run's inputs come before it."""
    n, a = preset.num_heads, preset.alpha
    runs = [Run("pretrain", n, "scratch", 0.0, 0), Run("continue", n, "none", a, 0)]
    for g in preset.kv_heads:
        runs += [Run("convert", g, "mean", 0.0, 0), Run("uptrain", g, "mean", a, 0)]
    for g in preset.sweep_kv_heads:
        runs += [Run("sweep", g, "mean", alpha, 0) for alpha in preset.sweep_alphas if alpha > 0]
    for g in preset.ablation_kv_heads:
        for method in preset.ablation_methods:
            for seed in preset.ablation_seeds:
                runs += [Run("convert", g, method, 0.0, _convert_seed(method, seed)),
                         Run("uptrain", g, method, a, seed)]
    for g in preset.scratch_kv_heads:
        runs.append(Run("scratch", g, "scratch", a, 0))
    unique = list(dict.fromkeys(runs))  # mean seed 0 is also the main uptrain run; keep the first
    for run in unique:
        if run.kind in ("convert", "uptrain", "sweep") and run.method not in METHODS:
            raise ValueError(f"preset {preset.name!r} lists method {run.method!r}, not one of "
                             f"{', '.join(METHODS)}")
    return unique


def _convert_seed(method: str, seed: int) -> int:
    return seed if is_seeded(method) else 0


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


def pretrain_config(preset: Preset, num_kv_heads: int, num_steps: int, data_cache: str):
    """configs/pretrain.py with the preset's model: MHA (num_kv_heads = num_heads) or GQA from
    scratch."""
    c = _config_module("pretrain").get_config()
    c.model.update(d_model=preset.d_model, num_layers=preset.num_layers,
                   num_heads=preset.num_heads, mlp_dim=preset.mlp_dim)
    c.num_kv_heads = num_kv_heads
    _common(c, preset, num_steps, data_cache)
    c.optimizer.warmup_steps = preset.pretrain_warmup_steps
    c.lock()
    return c


def uptrain_config(preset: Preset, init_checkpoint: str, num_steps: int, seed: int,
                   data_cache: str, schedule: str = "cosine"):
    """configs/uptrain.py from init_checkpoint (already converted: num_kv_heads = -1 keeps its
    heads), batch order seed 1 + seed (pretraining used 0)."""
    c = _config_module("uptrain").get_config()
    c.init_checkpoint = init_checkpoint
    c.seed = 1 + seed
    _common(c, preset, num_steps, data_cache)
    c.optimizer.schedule = schedule
    c.optimizer.warmup_steps = min(preset.uptrain_warmup_steps, num_steps)
    c.lock()
    return c


def source_model_config(preset: Preset) -> ModelConfig:
    """The MHA model every run descends from."""
    c = pretrain_config(preset, preset.num_heads, 1, "")
    return train.scratch_model_config(c)


# ----------------------------------------------------------------------------- executing runs


class Suite:
    def __init__(self, preset: Preset, output_dir: str):
        preset.validate()
        self.preset = preset
        self.out = os.path.abspath(output_dir)
        self.data_cache = os.path.join(self.out, "data_cache")
        self.model_config = source_model_config(preset)
        self.speed: dict[str, Any] | None = None
        self.records: dict[str, dict[str, Any]] = {}
        self.summary: dict[str, list[str]] = {"ran": [], "skipped": [], "reused": []}

    # -- paths
    def workdir(self, name: str) -> str:
        return os.path.join(self.out, "runs", name)

    def record_path(self, name: str) -> str:
        return os.path.join(self.out, "records", f"{name}.json")

    # -- set-up
    def claim_output_dir(self) -> None:
        """suite.json names the preset; another preset in the same directory is an error."""
        os.makedirs(os.path.join(self.out, "records"), exist_ok=True)
        path = os.path.join(self.out, "suite.json")
        mine = json.loads(json.dumps(dataclasses.asdict(self.preset)))
        mine.pop("doc")  # prose: editing it changes no run
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)["preset"]
            saved.pop("doc", None)
            if saved != mine:
                diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
                raise ValueError(f"{self.out} holds results of preset {saved['name']!r} with "
                                 f"different settings ({', '.join(diff)}); use another "
                                 "--output_dir")
        else:
            results.write_json_atomic(path, {"preset": mine})

    def reuse_from(self, other_dir: str) -> None:
        """Copies the finished runs (record and workdir) and speed.json of another suite directory
        whose preset agrees on RUN_FIELDS, for every run of this preset not finished here, so
        they are skipped instead of repeated (e.g. the methods preset's pretraining from a `cpu`
        run). Sweep runs are not copied (their workdir is shared by several records)."""
        other = os.path.abspath(other_dir)
        path = os.path.join(other, "suite.json")
        if not os.path.exists(path):
            raise ValueError(f"--reuse_from={other_dir}: no suite.json there (not a suite "
                             "output directory)")
        with open(path) as f:
            theirs = json.load(f)["preset"]
        mine = json.loads(json.dumps(dataclasses.asdict(self.preset)))
        diff = [k for k in RUN_FIELDS if theirs.get(k) != mine[k]]
        if diff:
            raise ValueError(f"--reuse_from={other_dir}: its preset {theirs.get('name')!r} "
                             f"differs in {', '.join(diff)}; its runs are not this preset's")
        speed = os.path.join(other, "speed.json")
        if os.path.exists(speed) and not os.path.exists(os.path.join(self.out, "speed.json")):
            shutil.copyfile(speed, os.path.join(self.out, "speed.json.tmp"))
            os.replace(os.path.join(self.out, "speed.json.tmp"), os.path.join(self.out, "speed.json"))
        for run in plan(self.preset):
            src_record = os.path.join(other, "records", f"{run.name}.json")
            if (run.kind == "sweep" or os.path.exists(self.record_path(run.name))
                    or not os.path.exists(src_record)):
                continue
            src_dir, dst_dir = os.path.join(other, "runs", run.name), self.workdir(run.name)
            if os.path.isdir(src_dir):  # the workdir first: a record's presence means done
                shutil.rmtree(dst_dir + ".tmp", ignore_errors=True)
                shutil.copytree(src_dir, dst_dir + ".tmp")
                shutil.rmtree(dst_dir, ignore_errors=True)
                os.replace(dst_dir + ".tmp", dst_dir)
            with open(src_record) as f:
                record = json.load(f)
            self.validate(record)
            results.write_json_atomic(self.record_path(run.name), record)
            self.summary["reused"].append(run.name)
        log(f"reused {len(self.summary['reused'])} finished runs from {other}")

    # -- records
    def load_record(self, name: str) -> dict[str, Any] | None:
        path = self.record_path(name)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            record = json.load(f)
        self.validate(record)
        return record

    def validate(self, record: dict[str, Any]) -> None:
        results.validate_record(record, num_heads=self.preset.num_heads,
                                pretrain_steps=self.preset.pretrain_steps,
                                model_config=self.model_config)

    def finish(self, run: Run, loss: float, wall: float) -> dict[str, Any]:
        g = run.num_kv_heads
        record = {
            "name": run.name, "kind": run.kind, "num_kv_heads": g, "method": run.method,
            "alpha": run.alpha, "seed": run.seed,
            "steps": results.expected_steps(run.kind, run.alpha, self.preset.pretrain_steps),
            "val_loss": float(loss), "val_perplexity": math.exp(min(float(loss), 700.0)),
            "decode_ms_per_token": self.speed["ms"][str(g)],
            "kv_cache_bytes_per_token": kv_cache_bytes_per_token(
                self.model_config.replace(num_kv_heads=g)),
            "wall_seconds": round(float(wall), 3),
        }
        self.validate(record)
        results.write_json_atomic(self.record_path(run.name), record)
        self.records[run.name] = record
        self.summary["ran"].append(run.name)
        log(f"done {run.name}: val loss {loss:.4f} ({wall:.1f} s)")
        return record

    # -- training helpers
    def _train(self, config, name: str) -> tuple[float, float]:
        """(final val loss, accumulated wall seconds) of a training workdir; trains or resumes it
        unless its final evaluation is already in metrics.jsonl."""
        workdir = self.workdir(name)
        wall_path = os.path.join(workdir, "suite_wall_seconds.json")
        wall = 0.0
        if os.path.exists(wall_path):
            with open(wall_path) as f:
                wall = json.load(f)["seconds"]
        loss = _final_val_loss(workdir, config.num_steps)
        if loss is None:
            start = time.perf_counter()
            train.train_and_evaluate(config, workdir)
            # Time of this process's part; an earlier, killed part is lost (not recorded).
            wall += time.perf_counter() - start
            results.write_json_atomic(wall_path, {"seconds": wall})
            loss = _final_val_loss(workdir, config.num_steps)
            if loss is None:  # train.py returns early, checkpointed, on SIGTERM
                raise RuntimeError(f"{workdir} stopped before step {config.num_steps} "
                                   "(interrupted?); rerun the same command to continue")
        return loss, wall

    def _convert_checkpoint(self, g: int, method: str, seed: int) -> str:
        return os.path.join(self.workdir(results.run_name("convert", g, method, 0.0, seed)),
                            "checkpoint")

    def _evaluate(self, path: str) -> float:
        return evaluate.evaluate_model(path, batch_size=self.preset.batch_size,
                                       max_batches=self.preset.eval_batches,
                                       cache_dir=self.data_cache)["loss"]

    # -- the kinds of run
    def run_pretrain(self, run: Run) -> None:
        p = self.preset
        config = pretrain_config(p, p.num_heads, p.pretrain_steps, self.data_cache)
        self.finish(run, *self._train(config, run.name))

    def run_continue(self, run: Run) -> None:
        p = self.preset
        config = uptrain_config(p, self.workdir(results.run_name("pretrain", p.num_heads,
                                                                  "scratch", 0.0, 0)),
                                p.steps(run.alpha), run.seed, self.data_cache)
        self.finish(run, *self._train(config, run.name))

    def run_convert(self, run: Run) -> None:
        start = time.perf_counter()
        p = self.preset
        source = self.workdir(results.run_name("pretrain", p.num_heads, "scratch", 0.0, 0))
        # The converter's own path (loading.load + loading.convert, its provenance); calibrated
        # methods draw CALIBRATION_TOKENS of byte-level train-split rows, chosen by the run's seed.
        path = self._convert_checkpoint(run.num_kv_heads, run.method, run.seed)
        convert.convert_checkpoint(
            source, path, run.num_kv_heads, run.method, run.seed, overwrite=True,
            calibration=convert.CalibrationOptions(data="stdlib", num_tokens=CALIBRATION_TOKENS,
                                                   seq_len=p.seq_len, tokenizer="byte"))
        loss = self._evaluate(path)
        self.finish(run, loss, time.perf_counter() - start)

    def run_uptrain(self, run: Run) -> None:
        init = self._convert_checkpoint(run.num_kv_heads, run.method,
                                        _convert_seed(run.method, run.seed))
        config = uptrain_config(self.preset, init, self.preset.steps(run.alpha), run.seed,
                                self.data_cache)
        self.finish(run, *self._train(config, run.name))

    def run_sweep(self, run: Run) -> None:
        p = self.preset
        max_steps = p.steps(max(p.sweep_alphas))
        name = f"sweep_g{run.num_kv_heads}_{run.method}_s{run.seed}"
        config = uptrain_config(p, self._convert_checkpoint(run.num_kv_heads, run.method, 0),
                                max_steps, run.seed, self.data_cache, schedule="constant")
        with config.unlocked():
            config.checkpoint_every = p.sweep_checkpoint_every
            config.keep_checkpoints = max_steps // p.sweep_checkpoint_every + 1  # keep them all
        _, wall = self._train(config, name)
        start = time.perf_counter()
        loss = self._evaluate(checkpoints.step_dir(self.workdir(name), p.steps(run.alpha)))
        self.finish(run, loss, wall + time.perf_counter() - start)

    def run_scratch(self, run: Run) -> None:
        p = self.preset
        config = pretrain_config(p, run.num_kv_heads, p.pretrain_steps + p.steps(run.alpha),
                                 self.data_cache)
        self.finish(run, *self._train(config, run.name))

    # -- speed
    def measure_speed(self) -> None:
        """speed.json: decode ms per step for every G, all variants alternated in one measurement
        (skipped when speed.json holds the same setting)."""
        p = self.preset
        setting = {"batch": p.speed_batch, "context": p.speed_context, "repeats": p.speed_repeats}
        path = os.path.join(self.out, "speed.json")
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if all(saved.get(k) == v for k, v in setting.items()):
                self.speed = saved
                self.summary["skipped"].append("speed")
                log("skip speed: speed.json is complete")
                return
        gs = [p.num_heads, *sorted(set(p.kv_heads), reverse=True)]
        log(f"speed: decode at batch {p.speed_batch} x {p.speed_context} cached tokens for "
            f"KV heads {gs}")
        start = time.perf_counter()
        variants = [(str(g), perf.decode_step_setup(self.model_config.replace(num_kv_heads=g),
                                                    p.speed_batch, p.speed_context))
                    for g in gs]
        seconds = perf.measure_decode(variants, repeats=p.speed_repeats)
        del variants  # frees the caches
        self.speed = {**setting, "ms": {g: s * 1e3 for g, s in seconds.items()},
                      "wall_seconds": time.perf_counter() - start}
        results.write_json_atomic(path, self.speed)
        self.summary["ran"].append("speed")
        log("speed: " + ", ".join(f"G={g}: {ms:.2f} ms" for g, ms in self.speed["ms"].items()))

    # -- everything
    def results_object(self) -> dict[str, Any]:
        return {
            "preset": json.loads(json.dumps(dataclasses.asdict(self.preset))),
            "model": self.model_config.to_dict(),
            "speed": {k: self.speed[k] for k in ("batch", "context", "repeats")},
            "machine": {"platform": jax.default_backend(),
                        "device": str(jax.devices()[0].device_kind),
                        "cpu_count": os.cpu_count(), "processor": perf.cpu_model(),
                        "python": platform.python_version(), "jax": jax.__version__},
            "records": [self.records[r.name] for r in plan(self.preset)
                        if r.name in self.records],
        }

    def write_outputs(self, report: bool = False) -> list[str]:
        """results.json, table.md and the figures that have data (their names returned); with
        `report`, says which figure was not written and why (plots.make_plots)."""
        obj = self.results_object()
        results.validate_results(obj)
        results.write_json_atomic(os.path.join(self.out, "results.json"), obj)
        results.write_text_atomic(os.path.join(self.out, "table.md"), results.make_table(obj))
        written = plots.make_plots(obj, self.out, log=log if report else None)
        return [os.path.basename(p) for p in written]

    def run_all(self, reuse_from: str = "") -> dict[str, list[str]]:
        self.claim_output_dir()
        if reuse_from:
            self.reuse_from(reuse_from)
        self.measure_speed()
        runs = plan(self.preset)
        log(f"preset {self.preset.name}: {len(runs)} records; "
            f"{self.preset.total_steps()['total']} training steps in all")
        for i, run in enumerate(runs, 1):
            record = self.load_record(run.name)
            if record is not None:
                ms = self.speed["ms"][str(run.num_kv_heads)]
                if record["decode_ms_per_token"] != ms:  # speed.json was measured again
                    record = {**record, "decode_ms_per_token": ms}
                    results.write_json_atomic(self.record_path(run.name), record)
                self.records[run.name] = record
                self.summary["skipped"].append(run.name)
                log(f"skip {run.name} ({i}/{len(runs)}): done")
                continue
            log(f"run {run.name} ({i}/{len(runs)})")
            getattr(self, f"run_{run.kind}")(run)
            self.write_outputs()
        figures = self.write_outputs(report=True)
        log(f"wrote {os.path.join(self.out, 'results.json')}, table.md"
            f"{''.join(', ' + f for f in figures)}; ran {len(self.summary['ran'])}, skipped "
            f"{len(self.summary['skipped'])}")
        return self.summary


def _final_val_loss(workdir: str, num_steps: int) -> float | None:
    """val/loss at step num_steps in WORKDIR/metrics.jsonl, or None (not trained that far)."""
    path = os.path.join(workdir, train.METRICS_FILE)
    if not os.path.exists(path) or checkpoints.latest_checkpoint(workdir) is None:
        return None
    if checkpoints.list_steps(workdir)[-1] != num_steps:
        return None
    with open(path) as f:
        for line in f:
            try:
                m = json.loads(line)
            except json.JSONDecodeError:
                continue
            if m.get("step") == num_steps and "val/loss" in m:
                return float(m["val/loss"])
    return None




def enable_compilation_cache(cache_dir: str) -> None:
    """jax's persistent compilation cache: runs of the same shapes (every seed of a method, a
    rerun of the suite) reuse compiled programs instead of compiling them again."""
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run_suite(preset: Preset, output_dir: str, reuse_from: str = "") -> dict[str, list[str]]:
    """Runs (or continues) every run of `preset` into output_dir, first copying the finished runs
    of the suite directory `reuse_from` (if given; Suite.reuse_from); returns {'ran', 'skipped',
    'reused'}."""
    return Suite(preset, output_dir).run_all(reuse_from)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run experiments/reproduce.py")

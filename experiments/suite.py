"""The reproduction suite: a preset's runs, executed in order in one process, each skipped when done.

What the runs are, what each starts from and each training's config: planning.py (plan()); the
peak learning rate of each uptraining is resolved here from the finished lr records
(planning.learning_rate). Decode speed is measured once for every G (perf.decode_step_setup +
perf.measure_alternating_samples, variants alternated; medians with 95% intervals, paired
speed-ups, and the roofline ideal at the bandwidth and peak measured in the same call) and
attached to every record of that G. The head analysis (head_analysis.py) of each pretrained MHA,
for every G, is computed once it is trained.

Layout of OUTPUT_DIR:
  suite.json            the preset this directory belongs to (a different preset is an error)
  speed.json            decode timing per G
  analysis.json         the head analysis per pretraining seed and G
  runs/<run>/           each training's workdir (train.py: resumable) or a converted checkpoint
  records/<name>.json   one finished record each, written atomically: its presence skips the run
  results.json, table.md, *.png   regenerated from the records after every run (a figure with no
                                  data beyond the MHA reference is not written: plots.py)
  data_cache/, jax_cache/         shared by all runs
Interrupting and rerunning the same command continues: finished records are skipped, and a
training interrupted mid-way resumes from its workdir's latest checkpoint. Deleting speed.json
(reproduce.py --remeasure_speed) times decode again and rewrites every record's decode figure.
`reuse_from` copies the finished runs of another directory whose preset computes the same runs
(planning.RUN_FIELDS), e.g. the methods preset reusing a `cpu` run's pretraining and mean conversions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np

from experiments import planning, plots, results
from experiments.planning import Run, plan
from experiments.presets import Preset
from gqa_uptrain import (checkpoints, convert, evaluate, head_analysis, loading, metrics_log,
                         optim, perf, train)
from gqa_uptrain.model import kv_cache_bytes_per_token

# speed.json's layout: 2 = every round's time kept, intervals, speed-ups and roofline per G.
SPEED_FORMAT = 2
# What makes two suite directories' runs comparable beyond the preset (suite.json): the learning
# rate schedules' version (optim.SCHEDULE_VERSION: runs of another version are other runs).
SUITE_VERSION = {"schedule_version": optim.SCHEDULE_VERSION}


def log(msg: str) -> None:
    print(f"[reproduce] {msg}", flush=True)


# ----------------------------------------------------------------------------- executing runs


class Suite:
    def __init__(self, preset: Preset, output_dir: str):
        preset.validate()
        self.preset = preset
        self.out = os.path.abspath(output_dir)
        self.data_cache = os.path.join(self.out, "data_cache")
        self.model_config = planning.source_model_config(preset)
        self.speed: dict[str, Any] | None = None
        self.analysis: list[dict[str, Any]] = []
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
                whole = json.load(f)
            _check_suite_version(whole, self.out)
            saved = whole["preset"]
            saved.pop("doc", None)
            if saved != mine:
                diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
                raise ValueError(f"{self.out} holds results of preset {saved['name']!r} with "
                                 f"different settings ({', '.join(diff)}); use another "
                                 "--output_dir")
        else:
            results.write_json_atomic(path, {"preset": mine, **SUITE_VERSION})

    def reuse_from(self, other_dir: str) -> None:
        """Copies the finished runs (record and workdir) and speed.json of another suite directory
        whose preset agrees on planning.RUN_FIELDS, for every run of this preset not finished here, so
        they are skipped instead of repeated (e.g. the methods preset's pretraining from a `cpu`
        run). Sweep runs are not copied (their workdir is shared by several records)."""
        other = os.path.abspath(other_dir)
        path = os.path.join(other, "suite.json")
        if not os.path.exists(path):
            raise ValueError(f"--reuse_from={other_dir}: no suite.json there (not a suite "
                             "output directory)")
        with open(path) as f:
            whole = json.load(f)
        _check_suite_version(whole, f"--reuse_from={other_dir}")
        theirs = whole["preset"]
        mine = json.loads(json.dumps(dataclasses.asdict(self.preset)))
        diff = [k for k in planning.RUN_FIELDS if theirs.get(k) != mine[k]]
        if diff:
            raise ValueError(f"--reuse_from={other_dir}: its preset {theirs.get('name')!r} "
                             f"differs in {', '.join(diff)}; its runs are not this preset's")
        speed = os.path.join(other, "speed.json")
        if os.path.exists(speed) and not os.path.exists(os.path.join(self.out, "speed.json")):
            shutil.copyfile(speed, os.path.join(self.out, "speed.json.tmp"))
            os.replace(os.path.join(self.out, "speed.json.tmp"), os.path.join(self.out, "speed.json"))
        for run in plan(self.preset):
            src_record = os.path.join(other, "records", f"{run.name}.json")
            # The rate of an uptraining comes from its method's lr sweep: the same run only when
            # both presets sweep that method, or neither does.
            rate_method = "mean" if run.kind in ("continue", "sweep", "distill") else run.method
            swept_here = rate_method in self.preset.lr_sweep_methods
            swept_there = rate_method in theirs.get("lr_sweep_methods", [])
            if (run.kind == "sweep" or os.path.exists(self.record_path(run.name))
                    or not os.path.exists(src_record)
                    or (run.kind in ("continue", "uptrain", "distill")
                        and swept_here != swept_there)):
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

    def finish(self, run: Run, loss: float, wall: float,
               learning_rate: float | None = None) -> dict[str, Any]:
        g = run.num_kv_heads
        record = {
            "name": run.name, "kind": run.kind, "num_kv_heads": g, "method": run.method,
            "alpha": run.alpha, "seed": run.seed, "pretrain_seed": run.pretrain_seed,
            "learning_rate": learning_rate,
            "steps": results.expected_steps(run.kind, run.alpha, self.preset.pretrain_steps),
            "val_loss": float(loss), "val_perplexity": math.exp(min(float(loss), 700.0)),
            "decode_ms_per_step": self.speed["ms"][str(g)],
            "decode_tokens_per_step": self.speed["batch"],
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

    def _output(self, run: Run) -> str:
        """Where a run's training or conversion is: its workdir, or a conversion's checkpoint."""
        workdir = self.workdir(self._workdir_name(run))
        return os.path.join(workdir, "checkpoint") if run.kind == "convert" else workdir

    def _learning_rate(self, run: Run) -> float | None:
        return planning.learning_rate(self.preset, run, self.records)

    def _workdir_name(self, run: Run) -> str:
        # Only an uptraining of the preset's alpha can be one of the lr sweep's runs (not the
        # longer plain run of a distilled run's FLOPs).
        lr = (self._learning_rate(run) if run.kind == "uptrain" and run.alpha == self.preset.alpha
              else None)
        return planning.workdir_name(run, lr)

    def _evaluate(self, path: str) -> float:
        return evaluate.evaluate_model(path, batch_size=self.preset.batch_size,
                                       max_batches=self.preset.eval_batches,
                                       cache_dir=self.data_cache)["loss"]

    def _training_config(self, run: Run):
        init = planning.init_run(self.preset, run)
        teacher = planning.teacher_run(self.preset, run)
        return planning.training_config(self.preset, run, self._output(init) if init else "",
                                        self.data_cache, self._learning_rate(run),
                                        teacher_path=self._output(teacher) if teacher else "")

    # -- the kinds of run
    def run_training(self, run: Run) -> None:
        """pretrain, reference, continue, lr, uptrain, scratch, distill: the record of the
        training's final evaluation."""
        config = self._training_config(run)
        self.finish(run, *self._train(config, self._workdir_name(run)),
                    learning_rate=config.optimizer.learning_rate)

    run_pretrain = run_reference = run_continue = run_lr = run_uptrain = run_scratch = \
        run_distill = run_training

    def run_convert(self, run: Run) -> None:
        start = time.perf_counter()
        p = self.preset
        source = self._output(planning.init_run(p, run))
        # The converter's own path (loading.load + loading.convert, its provenance); calibrated
        # methods draw CALIBRATION_TOKENS of byte-level train-split rows, chosen by the run's seed.
        path = self._output(run)
        convert.convert_checkpoint(
            source, path, run.num_kv_heads, run.method, run.seed, overwrite=True,
            calibration=convert.CalibrationOptions(data="stdlib",
                                                   num_tokens=planning.CALIBRATION_TOKENS,
                                                   seq_len=p.seq_len, tokenizer="byte"))
        loss = self._evaluate(path)
        self.finish(run, loss, time.perf_counter() - start)

    def run_sweep(self, run: Run) -> None:
        """Trains (or finds) the sweep's one run to max(alpha) and evaluates its checkpoint at
        this point's alpha."""
        name = self._workdir_name(run)
        config = self._training_config(run)
        _, wall = self._train(config, name)
        start = time.perf_counter()
        loss = self._evaluate(checkpoints.step_dir(self.workdir(name),
                                                   self.preset.steps(run.alpha)))
        self.finish(run, loss, wall + time.perf_counter() - start,
                    learning_rate=config.optimizer.learning_rate)

    # -- speed
    def measure_speed(self) -> None:
        """speed.json: decode ms per step for every G, all variants alternated in one measurement
        (every round kept: medians with 95% intervals, speed-ups paired by round), and the
        roofline's ideal step at the bandwidth and matmul peak measured right after; skipped when
        speed.json holds the same setting."""
        p = self.preset
        setting = {"batch": p.speed_batch, "context": p.speed_context, "repeats": p.speed_repeats,
                   "format": SPEED_FORMAT}
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
        samples = perf.measure_alternating_samples(variants, repeats=p.speed_repeats)
        del variants  # frees the caches
        # The machine's limits in the same session: 256 MiB >> this CPU's last-level cache.
        bandwidth = perf.measure_bandwidth(num_bytes=1 << 28)
        peak = perf.measure_peak_flops(n=1024)
        per_g = {}
        mha = samples[str(p.num_heads)]
        for g, times in samples.items():
            lo, hi = perf.median_ci(times)
            ratio = perf.paired_ratio(mha, times)
            cost = perf.decode_cost(self.model_config.replace(num_kv_heads=int(g)),
                                    p.speed_batch, p.speed_context)
            per_g[g] = {"ms": float(np.median(times)) * 1e3, "ms_lo": lo * 1e3, "ms_hi": hi * 1e3,
                        "speed_up": ratio["median"], "speed_up_lo": ratio["lo"],
                        "speed_up_hi": ratio["hi"],
                        "roofline_ms": cost.roofline_seconds(bandwidth, peak) * 1e3,
                        "samples_ms": [t * 1e3 for t in times]}
        self.speed = {**setting, "ms": {g: v["ms"] for g, v in per_g.items()},
                      "per_kv_heads": per_g, "bandwidth_bytes_per_s": bandwidth,
                      "peak_flops": peak, "wall_seconds": time.perf_counter() - start}
        results.write_json_atomic(path, self.speed)
        self.summary["ran"].append("speed")
        log("speed: " + ", ".join(f"G={g}: {v['ms']:.2f} ms [{v['ms_lo']:.2f}, {v['ms_hi']:.2f}]"
                                  for g, v in per_g.items()))

    # -- head analysis
    def update_analysis(self) -> None:
        """analysis.json: head_analysis.analyse of every finished pretraining, for every G of the
        preset (each computed once: the pretrained params never change)."""
        path = os.path.join(self.out, "analysis.json")
        entries = []
        if os.path.exists(path):
            with open(path) as f:
                entries = json.load(f)
        done = {e["pretrain_seed"] for e in entries}
        added = False
        for run in plan(self.preset):
            if run.kind != "pretrain" or run.name not in self.records or run.pretrain_seed in done:
                continue
            params, _, _ = loading.load(self._output(run), what="the pretrained MHA")
            params = {k: np.asarray(v) for k, v in params.items()}
            for g in sorted(self.preset.kv_heads, reverse=True):
                entries.append({"pretrain_seed": run.pretrain_seed, "num_kv_heads": g,
                                "layers": head_analysis.analyse(params, g)})
            added = True
        if added:
            results.write_json_atomic(path, entries)
        self.analysis = entries

    # -- everything
    def results_object(self) -> dict[str, Any]:
        per_g = {g: {k: v for k, v in row.items() if k != "samples_ms"}  # in speed.json
                 for g, row in self.speed["per_kv_heads"].items()}
        return {
            "format": results.FORMAT,
            "preset": json.loads(json.dumps(dataclasses.asdict(self.preset))),
            "model": self.model_config.to_dict(),
            "speed": {**{k: self.speed[k] for k in ("batch", "context", "repeats",
                                                     "bandwidth_bytes_per_s", "peak_flops")},
                      "per_kv_heads": per_g},
            "analysis": self.analysis,
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
                if record["decode_ms_per_step"] != ms:  # speed.json was measured again
                    record = {**record, "decode_ms_per_step": ms}
                    results.write_json_atomic(self.record_path(run.name), record)
                self.records[run.name] = record
                self.summary["skipped"].append(run.name)
                log(f"skip {run.name} ({i}/{len(runs)}): done")
                continue
            log(f"run {run.name} ({i}/{len(runs)})")
            getattr(self, f"run_{run.kind}")(run)
            self.update_analysis()
            self.write_outputs()
        self.update_analysis()
        figures = self.write_outputs(report=True)
        log(f"wrote {os.path.join(self.out, 'results.json')}, table.md"
            f"{''.join(', ' + f for f in figures)}; ran {len(self.summary['ran'])}, skipped "
            f"{len(self.summary['skipped'])}")
        return self.summary


def _check_suite_version(saved: dict[str, Any], where: str) -> None:
    """ValueError unless a suite.json was written under SUITE_VERSION (one line naming why)."""
    theirs = {k: saved.get(k) for k in SUITE_VERSION}
    if theirs != SUITE_VERSION:
        raise ValueError(f"{where} holds runs made under {theirs} (None: before versions were "
                         f"recorded), not {SUITE_VERSION}: their learning rates differ from this "
                         "code's; use another --output_dir")


def _final_val_loss(workdir: str, num_steps: int) -> float | None:
    """val/loss at step num_steps in WORKDIR/metrics.jsonl, or None (not trained that far)."""
    if checkpoints.latest_checkpoint(workdir) is None:
        return None
    if checkpoints.list_steps(workdir)[-1] != num_steps:
        return None
    return metrics_log.read_value(workdir, num_steps, "val/loss")


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

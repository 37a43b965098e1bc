"""The training loop: pretrain an MHA model, or uptrain a converted GQA model, from a config file.

    python -m gqa_uptrain.train --config=configs/pretrain.py:smoke --workdir=/tmp/pre
    python -m gqa_uptrain.train --config=configs/uptrain.py:num_kv_heads=2 \\
        --config.init_checkpoint=/tmp/pre --workdir=/tmp/up

Initialisation, in this order (train_and_evaluate, _new_run):
  1. resume: the workdir's latest complete checkpoint (params, optimizer state, step). The workdir's
     saved train_config.json must agree with the command's config except for the changes listed
     below ("Resume with a changed config"), else an error.
  2. config.init_checkpoint: a checkpoint or workdir of this project, or a Hugging Face folder;
     its K/V heads are pooled to config.num_kv_heads on the fly (loading.convert; -1 keeps
     the source's heads); the optimizer starts fresh, or, with config.init_optimizer_state, from
     the checkpoint's own (the same model: no conversion; train_step.StepSetup.continue_state).
  3. scratch: config.model, initialised from config.seed.

Exact resume: the batch of step s is a pure function of (config.seed, s) (data.py), params and the
optimizer state (including its step count) are checkpointed exactly, and nothing else carries state
between steps, so a run killed at any moment and rerun with the same command ends bit-identical to
one never interrupted (tests/test_resume.py). Metrics of a step are written before its checkpoint,
and on resume metrics.jsonl is cut back to the restored step, so no step appears twice.
Faults: a non-finite loss, gradient norm or parameter norm stops the run with an error naming the
step (nothing is saved after it). SIGTERM or SIGINT (Ctrl-C, to the process or to its process group)
lets the current step finish, saves a checkpoint at it and exits with one line: status 0 for
SIGTERM, 130 for SIGINT; a second SIGINT aborts at once (status 130, nothing saved since the last
checkpoint). A signal before the run's first step stops it with nothing to save.

Resume with a changed config: keys that only change cadence and output (RESUMABLE_CHANGES) are
accepted and recorded in WORKDIR/config_changes.jsonl; num_steps (or alpha, when num_steps is -1)
may change only when the learning rate of every step already taken stays the same under the new
value (a 'constant' schedule, or 'wsd' whose decay had not begun), so the resumed run is exactly
the run that the new value would have made from the start; any other change is refused, naming
the keys.

Step numbering: step s means s optimizer updates done; the update from s to s+1 trains on batch s.
Metrics at step s: train/* of the update that produced step s, val/* of the params at step s.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from gqa_uptrain import (checkpoints, config_keys, data, evaluate, layer_stack, loading, losses,
                         precision, run_checkpoints, sharded_init, sharding)
from gqa_uptrain import train_step as train_step_lib
from gqa_uptrain.metrics_log import MetricsLog
from gqa_uptrain.model import ModelConfig
from gqa_uptrain.prefetch import BatchPrefetcher
from gqa_uptrain.run_config import (CONFIG_FILE, RUN_FILE, TrainError,
                                    check_resume_config, config_dict, is_main, log,
                                    make_schedule, num_steps_of, sync, write_json_atomic)
from gqa_uptrain.stop_signals import SIGINT_EXIT, StopSignals

MANIFEST_FILE = "data_manifest.json"


# ----------------------------------------------------------------------------- run set-up


def _data_spec(config, workdir: str) -> data.DataSpec:
    d = config.data.to_dict()
    d["cache_dir"] = os.path.abspath(d["cache_dir"] or os.path.join(workdir, "data_cache"))
    return data.DataSpec.from_dict(d)


def _load_init_checkpoint(config) -> tuple[Any, ModelConfig, dict[str, Any]]:
    """(params, ModelConfig, run info) from config.init_checkpoint, converted to
    config.num_kv_heads when it is not -1: a sharded_init.Deferred for what is read per shard
    (checkpoints, HF folders), host params otherwise (loading.load + loading.convert), None when
    config.init_optimizer_state restores it with its optimizer state."""
    what = "config.init_checkpoint"
    # data.tokenizer='auto': the source's own tokenizer, looked up before any array is read; none
    # (no tokenizer.json, not a byte-level model trained here) is an error naming the key to set,
    # never a silent byte-level tokenizer.
    source = loading.inspect(config.init_checkpoint, what)
    tokenizer = None
    if config.data.tokenizer == "auto":
        tokenizer = source.require_tokenizer("--config.data.tokenizer=PATH/tokenizer.json")
    teacher = _distill_teacher(config, source)
    init = ({"hf_folder": source.path} if source.format == "hf" else
            {"gguf_file": source.path} if source.format == "gguf" else
            {"checkpoint": source.path, "checkpoint_step": source.step})
    info = {"init": init, "source_step": source.source_step, "auto_tokenizer": tokenizer,
            "distill_teacher": teacher}
    if config.init_optimizer_state:
        # The same model continued with its own Adam state: params and optimizer state are both
        # restored from the checkpoint in the state set-up (_train_and_evaluate), read once.
        _check_init_optimizer_state(config, source)
        init["optimizer_state"] = True
        return None, source.config.replace(param_dtype=config.param_dtype), info
    # A checkpoint or an HF folder is placed in the state set-up, each process reading only its
    # devices' slices (sharded_init.py); the rest (GGUF, calibrated methods) on the host.
    pending, record = sharded_init.deferred(
        source, param_dtype=config.param_dtype, num_kv_heads=config.num_kv_heads,
        method=config.convert_method, seed=config.convert_seed)
    if pending is not None:
        if record is not None:
            init["converted"] = record
        return pending, pending.config, info
    # Cast to the run's master-weight dtype before pooling (precision.py): the mean of fp16
    # heads is taken in float32.
    params, model_config, source = loading.load(source, param_dtype=config.param_dtype)
    params = {k: np.asarray(v) for k, v in params.items()}
    if config.num_kv_heads != -1:  # also when equal: method='random' then re-draws K/V
        params, model_config, record = loading.convert(
            params, model_config, config.num_kv_heads, config.convert_method,
            seed=config.convert_seed)
        init["converted"] = record
    return params, model_config, info


def _check_init_optimizer_state(config, source: loading.Source) -> None:
    """TrainError, in one line and before any array is read, unless config.init_optimizer_state
    can restore the init checkpoint's optimizer state: this project's checkpoint, of the same
    model (no conversion), holding one."""
    key = "config.init_optimizer_state=True"
    if source.format != "checkpoint":
        raise TrainError(f"{key} restores this project's optimizer state, but "
                         f"config.init_checkpoint={source.path} is a {source.format} source "
                         "(no optimizer state); set config.init_optimizer_state=False")
    if config.num_kv_heads != -1:
        raise TrainError(f"{key} continues the same model, but config.num_kv_heads="
                         f"{config.num_kv_heads} converts it (the moments of pooled K/V heads do "
                         "not exist); set config.num_kv_heads=-1 or init_optimizer_state=False")
    if not os.path.isdir(os.path.join(source.path, "opt_state")):
        raise TrainError(f"{key}: {source.path} holds no optimizer state (a converted or "
                         "exported checkpoint?); set config.init_optimizer_state=False")


def _distill_teacher(config, init_source: loading.Source | None) -> dict[str, Any] | None:
    """The distillation teacher to record in run.json (re-read from it on resume), or None when
    config.distill.weight is 0: {'path': resolved, 'format', 'step'} of config.distill.teacher, or
    of the init checkpoint before pooling when it is ''. TrainError (one line) when there is none."""
    d = config.distill
    if d.weight == 0:
        return None  # no teacher is built or read (distill.teacher is not even looked at)
    if not 0 < d.weight <= 1 or not d.temperature > 0:
        raise TrainError(f"config.distill.weight={d.weight} must be in [0, 1] and "
                         f"config.distill.temperature={d.temperature} > 0")
    if d.teacher:
        source = loading.inspect(d.teacher, "config.distill.teacher")
    elif init_source is None:
        raise TrainError("config.distill.teacher='' means the init checkpoint before pooling, "
                         "but config.init_checkpoint is empty; set config.distill.teacher=PATH")
    elif config.num_kv_heads == -1:
        raise TrainError("config.distill.teacher='' means the init checkpoint before pooling, but "
                         "this run pools nothing (num_kv_heads=-1), so the teacher would be the "
                         "student; set config.distill.teacher=PATH (e.g. the MHA the init "
                         "checkpoint was converted from)")
    else:
        source = init_source
    student_vocab = (init_source.config.vocab_size if init_source is not None
                     else config.model.vocab_size)
    if source.config.vocab_size != student_vocab:
        raise TrainError(f"config.distill.teacher {source.path} has vocab_size="
                         f"{source.config.vocab_size}, the student {student_vocab}: the KL term "
                         "needs one vocabulary (the same tokenizer)")
    return {"path": source.path, "format": source.format, "step": source.step,
            "model_config": source.config.to_dict()}


def scratch_model_config(config) -> ModelConfig:
    """The model a config trains from scratch: config.model with config.num_kv_heads KV heads
    (the one dial for G; -1 = num_heads, MHA) and the run's precision policy (precision.py)."""
    model = config.model.to_dict()
    moved = sorted({"param_dtype", "dtype"} & set(model))
    if moved:  # a config file written before the policy: say where the keys went
        raise TrainError(f"config.model.{moved[0]} is no longer a model key: set "
                         "config.param_dtype (master weights) and config.compute_dtype (matmuls "
                         "and activations) instead; they apply to every initialisation source")
    return ModelConfig.from_dict({**model, "num_kv_heads": (
        model["num_heads"] if config.num_kv_heads == -1 else config.num_kv_heads)})


def _new_run(config) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(host params or None for scratch, run info) for a workdir without checkpoints."""
    # The precision policy is checked before anything is read (a 7B load takes minutes).
    platform = jax.default_backend()
    try:
        precision.compute_dtype_for(config.compute_dtype, platform)
        precision.check_param_dtype(config.param_dtype)
    except precision.PrecisionError as e:
        raise TrainError(str(e)) from None
    if config.init_checkpoint:
        params, model_config, info = _load_init_checkpoint(config)
    else:
        if config.model is None:
            raise TrainError("config.init_checkpoint is empty and config.model is None: set "
                             "--config.init_checkpoint=PATH (a checkpoint, workdir or Hugging "
                             "Face folder) or train from scratch with a config.model")
        model_config = scratch_model_config(config)
        if config.init_optimizer_state:
            raise TrainError("config.init_optimizer_state=True restores the optimizer state of "
                             "config.init_checkpoint, which is empty")
        params, info = None, {"init": {"scratch_seed": config.seed}, "source_step": None,
                              "auto_tokenizer": None,
                              "distill_teacher": _distill_teacher(config, None)}
    model_config = precision.apply(model_config, config.param_dtype, config.compute_dtype,
                                   platform)
    num_steps = num_steps_of(config, info["source_step"],
                           config.init_checkpoint or "scratch training")
    tokenizer = config.data.tokenizer
    if tokenizer == "auto":  # an init's own (_load_init_checkpoint); scratch trains on bytes
        tokenizer = info["auto_tokenizer"] if config.init_checkpoint else "byte"
    elif tokenizer != "byte":
        tokenizer = os.path.abspath(tokenizer)
    run = {"num_steps": num_steps, "source_step": info["source_step"], "init": info["init"],
           "tokenizer": tokenizer, "model_config": model_config.to_dict()}
    if info["distill_teacher"] is not None:
        run["distill_teacher"] = info["distill_teacher"]
    return params, run


def _training_layout(setup: train_step_lib.StepSetup, params: dict[str, jax.Array],
                     shardings=None, num_layers: int | None = None) -> dict[str, jax.Array]:
    """Placed per-layer params -> the step's layout (stacked when scan_layers), in `shardings`
    (default: the step's params')."""
    if not setup.scan_layers:
        return params
    n = num_layers or setup.model_config.num_layers
    return jax.jit(lambda p: layer_stack.stack(p, n),
                   out_shardings=shardings or setup.param_sh)(params)


def _teacher_params(setup, source: loading.Source, distill, mesh):
    """The teacher's params in the step's teacher shardings, read per shard where the format
    allows (sharded_init), else through the host (GGUF)."""
    dtype = distill.teacher_config.dtype
    pending, _ = sharded_init.deferred(source, param_dtype=dtype)
    if pending is None:
        host, _, _ = loading.load(source, param_dtype=dtype)
        return setup.put_teacher_params({k: np.asarray(v) for k, v in host.items()})
    return _training_layout(setup, pending.load(mesh), setup.teacher_sh,
                            distill.teacher_config.num_layers)


def _distill(config, run: dict[str, Any], model_config: ModelConfig
             ) -> tuple[train_step_lib.Distill | None, loading.Source | None]:
    """The step's distillation term and the teacher's source, from run.json's record (so a
    resumed run re-reads the teacher it started with); (None, None) without distillation. The
    teacher's params are kept in the run's compute dtype: the model casts every param to it
    before use (model.py), so its outputs are those of float32 storage, at half the memory when
    the compute dtype is bfloat16."""
    teacher = run.get("distill_teacher")  # absent: a run without distillation
    if teacher is None:
        return None, None
    source = loading.inspect(teacher["path"], "the distillation teacher recorded in run.json")
    now = json.loads(json.dumps(source.config.to_dict()))  # as run.json holds it
    if source.step != teacher["step"] or now != teacher["model_config"]:
        raise TrainError(f"the distillation teacher {teacher['path']} changed since this run "
                         f"started (step {teacher['step']} -> {source.step}); resuming would not "
                         "reproduce the run")
    compute = model_config.dtype
    teacher_config = source.config.replace(param_dtype=compute, dtype=compute)
    return train_step_lib.Distill(teacher_config=teacher_config, weight=config.distill.weight,
                                  temperature=config.distill.temperature), source


def _load_data(spec: data.DataSpec, tokenizer, workdir: str, resumed: bool, need_val: bool):
    train_stream, train_manifest = data.load_split(spec, tokenizer, "train", spec.cache_dir)
    manifests = {"train": train_manifest}
    val_stream = None
    if need_val:
        val_stream, manifests["validation"] = data.load_split(spec, tokenizer, "validation",
                                                              spec.cache_dir)
    path = os.path.join(workdir, MANIFEST_FILE)
    if resumed and os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        for split, manifest in manifests.items():
            if saved.get(split, {}).get("sha256") != manifest["sha256"]:
                raise TrainError(f"the {split} data changed since this run started (manifest "
                                 f"{path}); resuming would not reproduce the run")
    elif is_main():
        write_json_atomic(path, manifests)
    return train_stream, val_stream, manifests


# ----------------------------------------------------------------------------- the loop


def _check_finite(step: int, step_metrics: dict[str, jax.Array], workdir: str,
                  manager: run_checkpoints.RunCheckpoints) -> dict[str, float]:
    """Fetches a step's metrics (blocking); raises FloatingPointError naming the step when the
    loss, the gradient or the updated params are not finite."""
    values = {k: float(v) for k, v in step_metrics.items()}
    if not all(math.isfinite(v) for v in values.values()):
        manager.wait()  # an earlier step's save still in flight is the last good checkpoint
        latest = checkpoints.latest_checkpoint(workdir)
        raise FloatingPointError(
            f"training diverged at step {step} (the update on batch {step - 1}): "
            + ", ".join(f"{k}={v}" for k, v in sorted(values.items()))
            + f"; nothing was saved after it; the last good checkpoint is {latest or 'none'}")
    return values


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) the training described by `config` in `workdir`; returns the final
    metrics record, or {'stopped_by': 'SIGTERM' | 'SIGINT', 'step': s} when a signal stopped it
    (after saving step s)."""
    with StopSignals() as stop:
        return _train_and_evaluate(config, workdir, stop)


def _train_and_evaluate(config, workdir: str, stop: StopSignals) -> dict[str, Any]:
    workdir = os.path.abspath(workdir)
    # --- initialisation order: resume > init_checkpoint > scratch (module docstring).
    latest = checkpoints.latest_checkpoint(workdir)
    run_path = os.path.join(workdir, RUN_FILE)
    if latest is not None:
        with open(run_path) as f:
            run = json.load(f)
        run = check_resume_config(config, workdir, run, int(os.path.basename(latest)))
        host_params = None
    else:
        # A workdir without checkpoints holds nothing to resume: a new run there starts over.
        host_params, run = _new_run(config)
        if is_main():  # only now: a run that cannot start leaves no workdir behind
            os.makedirs(workdir, exist_ok=True)
            write_json_atomic(os.path.join(workdir, CONFIG_FILE), config_dict(config))
            write_json_atomic(run_path, run)
    sync("run")
    model_config = ModelConfig.from_dict(run["model_config"])
    num_steps = run["num_steps"]

    spec = _data_spec(config, workdir)
    if latest is not None and run["tokenizer"] != "byte" and not os.path.isfile(run["tokenizer"]):
        # The tokenizer.json the run started from is gone (say, its init checkpoint was
        # deleted): every checkpoint of the run carries a copy, checked against its sha256.
        run = dict(run, tokenizer=checkpoints.tokenizer_spec(latest) or run["tokenizer"])
    tokenizer = data.load_tokenizer(run["tokenizer"])
    if tokenizer.vocab_size > model_config.vocab_size:
        raise TrainError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but the "
                         f"model's vocab_size is {model_config.vocab_size}")
    need_val = config.eval_every > 0 or config.final_eval_batches != 0
    train_stream, val_stream, manifests = _load_data(spec, tokenizer, workdir, latest is not None,
                                                     need_val)
    seq_len, batch_size, accum = spec.seq_len, config.batch_size, config.grad_accum_steps
    num_windows = train_stream.num_windows(seq_len, full_only=True)
    if num_windows < 1:
        raise TrainError(f"the training split has {len(train_stream.tokens)} tokens, fewer than "
                         f"one window of seq_len={seq_len}")

    # --- mesh, shardings, optimizer.
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    if batch_size % accum:
        raise TrainError(f"batch_size={batch_size} is not divisible by "
                         f"grad_accum_steps={accum}")
    micro = batch_size // accum
    if micro % sharding.batch_divisor(mesh):
        raise TrainError(f"micro-batch {micro} (batch_size / grad_accum_steps) is not divisible "
                         f"by the data x fsdp mesh size {sharding.batch_divisor(mesh)}")
    schedule = make_schedule(config, num_steps)
    distill, teacher_source = _distill(config, run, model_config)
    setup = train_step_lib.build(
        model_config, mesh, schedule, config.optimizer,
        implementation=config.attention_implementation, remat=config.remat,
        scan_layers=config.scan_layers, loss_chunk_size=config.loss_chunk_size, distill=distill)
    repl, batch_sh, train_step = setup.repl, setup.batch_sh, setup.step

    # --- state (checkpoints hold the per-layer layout: setup.to_disk / from_disk).
    if latest is not None:
        params, meta, opt_state = checkpoints.restore(
            latest, expected_config=model_config, opt_state_target=setup.disk_opt_target(),
            param_shardings=setup.disk_sh)
        params, opt_state = setup.from_disk(params, opt_state)
        start_step = meta.step
        log(f"resumed from {latest} (step {start_step} of {num_steps})")
    elif run["init"].get("optimizer_state"):  # config.init_optimizer_state: the same model
        params, _, opt_state = checkpoints.restore(
            run["init"]["checkpoint"], opt_state_target=setup.disk_opt_target(),
            param_shardings=setup.disk_sh)
        params, opt_state = setup.continue_state(params, opt_state)
        start_step = 0
        log(f"new run: {json.dumps(run['init'])} (its optimizer state restored, the schedule "
            f"indexed from step 0); {num_steps} steps")
    else:
        if host_params is None:
            params = setup.scratch_params(config.seed)
        elif isinstance(host_params, sharded_init.Deferred):
            params = _training_layout(setup, host_params.load(mesh))
        else:
            params = setup.put_host_params(host_params)
        opt_state = setup.init_opt_state(params)
        start_step = 0
        log(f"new run: {json.dumps(run['init'])}; {num_steps} steps")
    del host_params
    # The teacher is re-read from its recorded source at every start, new or resumed (_distill).
    teacher_args = ()
    if distill is not None:
        teacher_args = (_teacher_params(setup, teacher_source, distill, mesh),)
        log(f"distillation: weight {distill.weight}, temperature {distill.temperature}, teacher "
            f"{teacher_source.path} ({distill.teacher_config.num_kv_heads} KV heads, "
            f"{distill.teacher_config.param_dtype})")
    num_params = sum(int(np.prod(x.shape)) for x in setup.shapes.values())
    tokens_per_step = batch_size * seq_len
    log(f"model {model_config.to_dict()}: {num_params:,} params ({model_config.param_dtype} "
        f"master weights, {model_config.dtype} compute, float32 optimizer state); mesh "
        f"{dict(mesh.shape)}; {tokens_per_step:,} tokens/step; train "
        f"{len(train_stream.tokens):,} tokens ({num_windows:,} windows)")

    eval_step = losses.make_eval_step(model_config, config.attention_implementation,
                                      out_sharding=repl, scan_layers=config.scan_layers,
                                      loss_chunk_size=config.loss_chunk_size)
    eval_sh = jax.sharding.NamedSharding(mesh, sharding.batch_spec())

    def put_eval_batch(rows_fn):
        return sharding.make_global_batch((batch_size, seq_len), eval_sh, rows_fn,
                                          data.BATCH_KEYS)

    def run_eval(max_batches: int) -> dict[str, float]:
        result = evaluate.evaluate_stream(eval_step, params, val_stream, seq_len=seq_len,
                                          batch_size=batch_size, max_batches=max_batches,
                                          put_batch=put_eval_batch)
        return {"val/loss": result["loss"], "val/perplexity": result["perplexity"],
                "val/tokens": result["tokens"]}

    def host_rows(step: int, rows: np.ndarray) -> dict[str, np.ndarray]:
        ids = data.train_window_ids(config.seed, step, batch_size, num_windows, rows)
        return data.window_rows(train_stream, ids, seq_len)

    # The next data.prefetch steps' rows are read on a background thread (prefetch.py).
    batches = BatchPrefetcher(host_rows, lambda rows_fn: sharding.make_global_batch(
        (accum, micro, seq_len), batch_sh, rows_fn, data.BATCH_KEYS), config.data.prefetch,
        stop_step=num_steps)

    def make_batch(step: int) -> dict[str, jax.Array]:
        return batches.batch(step)

    def save(step: int) -> None:
        meta = checkpoints.Meta(
            model_config=model_config, step=step, source_step=run["source_step"],
            data_position={"seed": config.seed, "next_batch": step, "batch_size": batch_size,
                           "seq_len": seq_len},
            provenance={"init": run["init"], "tokenizer": run["tokenizer"],
                        "data": spec.to_dict(), "tokens_per_step": tokens_per_step,
                        "data_manifest_sha256": {k: m["sha256"] for k, m in manifests.items()},
                        "config": config_dict(config)})
        # A tokenizer.json run: every checkpoint carries a copy (self-contained; checkpoints.save).
        tok = run["tokenizer"]
        tok_file = (None if tok == "byte" else os.path.join(tok, checkpoints.TOKENIZER_FILE)
                    if os.path.isdir(tok) else tok)
        disk_params, disk_opt_state = setup.to_disk(params, opt_state)
        # Async: returns once the arrays are copied; committed in the background (wait()).
        manager.save(step, disk_params, meta, disk_opt_state, tokenizer_file=tok_file)

    # Every process has read `latest` (and the restore is done): what killed saves left goes now.
    run_checkpoints.clear_incomplete(workdir)
    manager = run_checkpoints.RunCheckpoints(workdir, keep=config.keep_checkpoints,
                                             every=config.checkpoint_every)
    metrics = MetricsLog(workdir, start_step, resumed=latest is not None)
    bar = tqdm(total=num_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (config.progress_bar and is_main()))
    final: dict[str, Any] = {}
    try:
        with jax.set_mesh(mesh):
            if start_step == 0 and config.eval_every > 0:
                record = run_eval(config.eval_batches)
                metrics.write(0, record)
                log(f"step 0: val loss {record['val/loss']:.4f}")
            pending = None  # (step, metrics arrays) not yet checked for NaN: checked one step late
            last_log = (start_step, time.perf_counter())
            for step in range(start_step, num_steps):
                if step == start_step and stop.stop_after(step):  # set-up or the first eval
                    log(f"{stop.received}: stopped before step {step + 1} of {num_steps}; no "
                         "step was taken, nothing to save")
                    final = {"stopped_by": stop.received, "step": step}
                    break
                batch = make_batch(step)
                params, opt_state, step_metrics = train_step(params, opt_state, batch,
                                                             *teacher_args)
                s = step + 1
                if pending is not None:  # the previous step's, while this one runs
                    _check_finite(*pending, workdir, manager)
                pending = (s, step_metrics)
                # Read once: a signal arriving later in this iteration is handled after the next
                # step (it must not print "saved" for a step whose save was not scheduled).
                # Several processes: jax's preemption sync point, the same step on every one.
                stopping = stop.stop_after(s)
                is_last = s == num_steps
                do_log = s % config.log_every == 0 or is_last
                periodic_eval = config.eval_every > 0 and s % config.eval_every == 0
                final_eval = is_last and config.final_eval_batches != 0
                do_eval = periodic_eval or final_eval
                # The cadence (orbax's policies: a function of s, so every host agrees) is asked
                # at every step, like the preemption sync point it also reads.
                do_save = manager.should_save(s) or is_last or stopping is not None
                record: dict[str, Any] = {}
                if do_log or do_eval or do_save:
                    values = _check_finite(s, step_metrics, workdir, manager)
                    pending = None
                if do_log:
                    now = time.perf_counter()
                    tokens_per_s = (s - last_log[0]) * tokens_per_step / (now - last_log[1])
                    loss = values["loss"]
                    record.update({"train/loss": loss, "train/grad_norm": values["grad_norm"],
                                   "train/param_norm": values["param_norm"],
                                   "train/lr": float(schedule(step)),
                                   "train/tokens_per_s": tokens_per_s,
                                   "train/tokens": s * tokens_per_step})
                    if distill is not None:  # loss = (1 - weight) ce + weight T^2 kl
                        record.update({"train/ce": values["ce"], "train/kl": values["kl"]})
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}",
                                    refresh=False)
                if do_eval:
                    record.update(run_eval(config.final_eval_batches if final_eval
                                           else config.eval_batches))
                    if final_eval:
                        scored = evaluate.scored_tokens(
                            val_stream, seq_len, config.final_eval_batches * batch_size
                            if config.final_eval_batches >= 0 else -1)
                        record["val/unigram_entropy"] = data.unigram_entropy(scored)
                metrics.write(s, record)  # before the checkpoint: see the module docstring
                bar.update(1)
                if do_save:
                    save(s)
                    if is_last or stopping:  # committed before the run says so, or exits
                        manager.wait()
                    metrics.flush()
                if do_log or do_eval or do_save:
                    last_log = (s, time.perf_counter())  # tokens/s counts training time only
                if do_eval and "val/loss" in record:
                    log(f"step {s}: train loss {record.get('train/loss', float('nan')):.4f}, "
                         f"val loss {record['val/loss']:.4f} ({record['val/tokens']:,} tokens)")
                if is_last:
                    final = {"step": s, **record}
                if stopping and not is_last:
                    log(f"{stopping}: saved a checkpoint at step {s} of {num_steps}; "
                         "rerun the same command to resume")
                    final = {"stopped_by": stopping, "step": s}
                    break
            else:
                if start_step >= num_steps:
                    log(f"{workdir} is already complete ({num_steps} steps)")
    finally:
        manager.close()  # waits for a save in flight: committed, or (on an error) still whole
        bar.close()
        metrics.close()
    if "val/unigram_entropy" in final:
        # Say how much was scored: a few batches (final_eval_batches) can differ from
        # `evaluate`'s whole split by more than the gaps a reader compares.
        split_tokens = int(evaluate.scored_tokens(val_stream, seq_len).size)
        log(f"final validation loss {final['val/loss']:.4f} nats/token on "
             f"{final['val/tokens']:,} of the validation split's {split_tokens:,} tokens "
             f"(perplexity {final['val/perplexity']:.3f}); unigram entropy of those tokens "
             f"{final['val/unigram_entropy']:.4f} nats/token; ratio "
             f"{final['val/loss'] / final['val/unigram_entropy']:.3f}")
    return final


# ----------------------------------------------------------------------------- command line


def main(argv):
    from absl import flags, logging  # noqa: PLC0415

    from gqa_uptrain import cli  # noqa: PLC0415

    del argv
    f = flags.FLAGS
    if f.print_config:
        try:
            print(config_keys.describe(f.config))
        except ValueError as e:
            cli.fail(e)
        return
    if not f.workdir:
        cli.fail("--workdir is required (the run's directory: checkpoints, metrics)",
                 cli.USAGE_EXIT)
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    if f.coordinator_address:
        jax.distributed.initialize(coordinator_address=f.coordinator_address,
                                   num_processes=f.num_processes, process_id=f.process_id,
                                   initialization_timeout=f.distributed_timeout)
    elif f.jax_distributed:
        jax.distributed.initialize()  # cluster auto-detection (TPU pods, SLURM, ...)
    try:
        final = train_and_evaluate(f.config, f.workdir)
    except (ValueError, OSError, FloatingPointError) as e:  # incl. TrainError, CheckpointError
        cli.fail(e)
    if final.get("stopped_by") == "SIGINT":
        sys.exit(SIGINT_EXIT)


if __name__ == "__main__":
    from gqa_uptrain import cpu

    # The CPU tuning (gqa_uptrain/cpu/), first of all the malloc re-run (cpu/hostmem.py: XLA's
    # per-step page faults); nothing else is done yet, since the process may be replaced.
    cpu.enable(tune_malloc=True)
    from absl import flags
    from ml_collections import config_flags

    from gqa_uptrain import cli

    config_flags.DEFINE_config_file(
        "config", None, "config file and its argument, e.g. configs/pretrain.py:smoke; override "
        "any key with --config.KEY=VALUE (listed below)", lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, TensorBoard "
                        "events); rerunning with the same one resumes")
    flags.DEFINE_bool("print_config", False, "print the resolved config, one described key a "
                      "line, and exit without training")
    flags.DEFINE_bool("jax_distributed", False, "call jax.distributed.initialize() with the "
                      "cluster's auto-detection (multi-host pods)")
    flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (explicit "
                        "multi-process set-up, e.g. on one machine)")
    flags.DEFINE_integer("num_processes", 1, "number of processes, with --coordinator_address")
    flags.DEFINE_integer("process_id", 0, "this process's index, with --coordinator_address")
    flags.DEFINE_integer("distributed_timeout", 300, "seconds to wait for all processes")
    flags.mark_flags_as_required(["config"])
    cli.run(main, description=__doc__.split("\n\n")[0], config_flag="config")

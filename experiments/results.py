"""The suite's result records: names, validation, results.json, and table.md (the Table 1 analogue).

results.json = {"preset": {...}, "model": {ModelConfig of the MHA source}, "speed": {"batch",
"context", "repeats"}, "records": [record, ...]} where a record is one run (or one evaluated point
of a run):
    name                      kind_g{G}[_{method}][_a{alpha}]_s{seed}, e.g. uptrain_g2_mean_a0.05_s0
    kind                      pretrain | continue | convert | uptrain | sweep | scratch
    num_kv_heads, method, alpha, seed, steps
                              method: a conversion method, 'scratch' (pretrain, scratch) or
                              'none' (continue); alpha: the uptraining proportion (0 for pretrain
                              and convert; a scratch run's budget is (1 + alpha) P steps)
    val_loss                  nats per predicted token on the validation split
    val_perplexity            exp(val_loss)
    decode_ms_per_token       ms for one decode step (one token for each of speed.batch sequences
                              at speed.context cached tokens), median of speed.repeats, per G
    kv_cache_bytes_per_token  model.kv_cache_bytes_per_token of the run's model
    wall_seconds              this suite's time on the run (sweep points share their run's)
table.md is a pure function of results.json (`make_table`), so a committed table can be checked.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from gqa_uptrain import heads
from gqa_uptrain import model as model_lib

FIELDS = ("name", "kind", "num_kv_heads", "method", "alpha", "seed", "steps", "val_loss",
          "val_perplexity", "decode_ms_per_token", "kv_cache_bytes_per_token", "wall_seconds")
KINDS = ("pretrain", "continue", "convert", "uptrain", "sweep", "scratch")
# Runs that train from scratch record method 'scratch'; the MHA continued, 'none'.
NON_CONVERSION_METHODS = {"pretrain": "scratch", "scratch": "scratch", "continue": "none"}


class RecordError(ValueError):
    """A result record that is malformed or inconsistent with its run."""


def run_name(kind: str, num_kv_heads: int, method: str, alpha: float, seed: int) -> str:
    """The canonical name of a run: what the record's fields must spell."""
    parts = [kind, f"g{num_kv_heads}"]
    if kind not in NON_CONVERSION_METHODS:
        parts.append(method)
    if kind not in ("pretrain", "convert"):
        parts.append(f"a{alpha:g}")
    parts.append(f"s{seed}")
    return "_".join(parts)


def expected_steps(kind: str, alpha: float, pretrain_steps: int) -> int:
    up = round(alpha * pretrain_steps)
    return {"pretrain": pretrain_steps, "scratch": pretrain_steps + up, "convert": 0}.get(kind, up)


def validate_record(record: dict[str, Any], *, num_heads: int, pretrain_steps: int,
                    model_config: model_lib.ModelConfig | None = None) -> None:
    """Raises RecordError unless `record` has every field, finite losses, and num_kv_heads /
    method / alpha / steps consistent with its kind and name."""
    name = record.get("name", "<unnamed>")

    def fail(msg):
        raise RecordError(f"record {name}: {msg}")

    missing = [f for f in FIELDS if f not in record]
    if missing:
        fail(f"missing fields {missing}")
    kind, g, method, alpha = record["kind"], record["num_kv_heads"], record["method"], record["alpha"]
    if kind not in KINDS:
        fail(f"kind={kind!r} is not one of {KINDS}")
    if not isinstance(g, int):
        fail(f"num_kv_heads={g!r} is not an int")
    try:
        heads.group_size(num_heads, g)
    except ValueError:
        fail(f"num_kv_heads={g!r} does not divide num_heads={num_heads}")
    if kind in ("pretrain", "continue") and g != num_heads:
        fail(f"a {kind} run is the MHA model: num_kv_heads must be {num_heads}, got {g}")
    if kind in ("convert", "uptrain", "sweep", "scratch") and g == num_heads:
        fail(f"a {kind} run has fewer KV heads than num_heads={num_heads}, got {g}")
    if kind in NON_CONVERSION_METHODS:
        if method != NON_CONVERSION_METHODS[kind]:
            fail(f"a {kind} run has method {NON_CONVERSION_METHODS[kind]!r}, got {method!r}")
    elif method in NON_CONVERSION_METHODS.values() or not isinstance(method, str) or not method:
        fail(f"a {kind} run needs a conversion method, got {method!r}")
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        fail(f"alpha={alpha!r} is not in [0, 1]")
    if (alpha == 0) != (kind in ("pretrain", "convert")):
        fail(f"alpha={alpha} is inconsistent with kind {kind!r} (alpha is 0 exactly for "
             "pretrain and convert)")
    if record["steps"] != expected_steps(kind, alpha, pretrain_steps):
        fail(f"steps={record['steps']} but a {kind} run at alpha={alpha} of P={pretrain_steps} "
             f"takes {expected_steps(kind, alpha, pretrain_steps)}")
    expected_name = run_name(kind, g, method, alpha, record["seed"])
    if name != expected_name:
        fail(f"the fields spell {expected_name!r}")
    for key in ("val_loss", "val_perplexity", "decode_ms_per_token", "wall_seconds"):
        value = record[key]
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            fail(f"{key}={value!r} is not a finite non-negative number")
    if record["val_loss"] <= 0 or record["decode_ms_per_token"] <= 0:
        fail(f"val_loss={record['val_loss']} and decode_ms_per_token="
             f"{record['decode_ms_per_token']} must be positive")
    if not math.isclose(record["val_perplexity"], math.exp(record["val_loss"]), rel_tol=1e-6):
        fail(f"val_perplexity={record['val_perplexity']} != exp(val_loss={record['val_loss']})")
    if model_config is not None:
        kv = model_lib.kv_cache_bytes_per_token(model_config.replace(num_kv_heads=g))
        if record["kv_cache_bytes_per_token"] != kv:
            fail(f"kv_cache_bytes_per_token={record['kv_cache_bytes_per_token']}, the model's "
                 f"is {kv}")


def validate_results(results: dict[str, Any]) -> None:
    """validate_record on every record of a results.json object, and unique names."""
    config = model_lib.ModelConfig.from_dict(results["model"])
    names = [r.get("name") for r in results["records"]]
    if len(set(names)) != len(names):
        raise RecordError(f"duplicate record names in {sorted(names)}")
    for r in results["records"]:
        validate_record(r, num_heads=config.num_heads,
                        pretrain_steps=results["preset"]["pretrain_steps"], model_config=config)


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_results(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- table.md


def _by_name(records):
    return {r["name"]: r for r in records}


def _find(records, **fields):
    return [r for r in records if all(r[k] == v for k, v in fields.items())]


def _fmt(x, spec):
    return "–" if x is None else format(x, spec)


def make_table(results: dict[str, Any]) -> str:
    """table.md's text from a results.json object: the main table (Table 1 analogue), the
    uptraining-proportion sweep (Fig. 5) and the ablation (Fig. 4). Deterministic."""
    preset, speed, records = results["preset"], results["speed"], results["records"]
    config = model_lib.ModelConfig.from_dict(results["model"])
    n, alpha = config.num_heads, preset["alpha"]
    ref = _find(records, kind="continue")
    ref = ref[0] if ref else None
    mha_ms = ref["decode_ms_per_token"] if ref else None
    cache_tokens = speed["batch"] * speed["context"]
    lines = [
        f"Preset `{preset['name']}`: {config.num_layers} layers, d_model {config.d_model}, "
        f"{n} query heads; pretraining P = {preset['pretrain_steps']} steps of "
        f"{preset['batch_size']} x {preset['seq_len']} tokens. Δ is to the MHA continued for "
        f"α = {alpha:g} (the fair reference). Decode: one step for a batch of {speed['batch']} at "
        f"{speed['context']} cached tokens, median of {speed['repeats']}, variants alternated; "
        f"KV MiB is that batch's cache.",
        "",
        "| model | KV heads | method | α | val loss | Δ to MHA | perplexity | decode ms/step "
        "| speed-up | KV MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def row(label, r):
        delta = r["val_loss"] - ref["val_loss"] if ref else None
        speed_up = mha_ms / r["decode_ms_per_token"] if mha_ms else None
        kv_mib = r["kv_cache_bytes_per_token"] * cache_tokens / 2**20
        lines.append(f"| {label} | {r['num_kv_heads']} | {r['method']} | {r['alpha']:g} | "
                     f"{r['val_loss']:.4f} | {_fmt(delta, '+.4f')} | {r['val_perplexity']:.3f} | "
                     f"{r['decode_ms_per_token']:.2f} | {_fmt(speed_up, '.2f')}x | {kv_mib:.1f} |")

    for r in _find(records, kind="pretrain"):
        row("MHA pretrained", r)
    if ref:
        row(f"MHA continued α={alpha:g}", ref)
    gs = sorted({r["num_kv_heads"] for r in records if r["num_kv_heads"] < n}, reverse=True)
    for g in gs:
        label = "MQA" if g == 1 else f"GQA-{g}"
        for r in _find(records, kind="convert", num_kv_heads=g, method="mean", seed=0):
            row(f"{label} converted", r)
        for r in _find(records, kind="uptrain", num_kv_heads=g, method="mean", seed=0,
                       alpha=alpha):
            row(f"{label} uptrained", r)
        for r in _find(records, kind="scratch", num_kv_heads=g):
            row(f"{label} from scratch", r)

    sweep = [r for r in records if r["kind"] == "sweep"]
    if sweep:
        alphas = preset["sweep_alphas"]
        lines += ["", "Uptraining proportion (Fig. 5): validation loss after α x P steps of one "
                  "uptraining run per G at a constant learning rate (after warmup), from its "
                  "checkpoints; α = 0 is the converted model.", "",
                  "| KV heads | " + " | ".join(f"α={a:g}" for a in alphas) + " |",
                  "|---|" + "---|" * len(alphas)]
        for g in sorted({r["num_kv_heads"] for r in sweep}, reverse=True):
            cells = []
            for a in alphas:
                kind = "convert" if a == 0 else "sweep"
                found = _find(records, kind=kind, num_kv_heads=g, method="mean", seed=0, alpha=a)
                cells.append(f"{found[0]['val_loss']:.4f}" if found else "–")
            lines.append(f"| {g} | " + " | ".join(cells) + " |")

    ablation = ablation_summary(results)
    if ablation:
        pre = _find(records, kind="pretrain")
        lines += ["", f"Conversion methods (Fig. 4 ablation): validation loss at α = 0 (converted) "
                  f"and after α = {alpha:g}, mean ± sample std over seeds (seed = uptraining batch "
                  "order, and the draw of `random` / the calibration rows of calibrated methods). "
                  "Gap closed = (loss of `mean` − loss) / (loss of `mean` − loss of the MHA "
                  "pretrained), at α = 0; vs mean = loss − loss of `mean`, after α.", "",
                  f"| KV heads | method | seeds | val loss α=0 | gap closed α=0 | val loss α={alpha:g} "
                  f"| vs mean α={alpha:g} |",
                  "|---|---|---|---|---|---|---|"]
        for (g, method), s in ablation.items():
            base = ablation.get((g, "mean"))
            gap = None
            if base and base["convert_mean"] is not None and s["convert_mean"] is not None and pre:
                width = base["convert_mean"] - pre[0]["val_loss"]
                gap = (base["convert_mean"] - s["convert_mean"]) / width if width > 0 else None
            vs = s["mean"] - base["mean"] if base else None
            conv = ("–" if s["convert_mean"] is None else
                    f"{s['convert_mean']:.4f} ± {s['convert_std']:.4f}")
            lines.append(f"| {g} | {method} | {s['n']} | {conv} | {_fmt(gap, '.0%')} | "
                         f"{s['mean']:.4f} ± {s['std']:.4f} | {_fmt(vs, '+.4f')} |")
    return "\n".join(lines) + "\n"


def _std(xs: list[float]) -> float:
    """Sample standard deviation; 0 for fewer than two values (e.g. a seed-independent method's
    single converted checkpoint)."""
    return float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def ablation_summary(results: dict[str, Any]) -> dict[tuple[int, str], dict[str, Any]]:
    """{(G, method): {n, mean, std, losses, convert_losses, convert_mean, convert_std}} of the
    uptrained runs at alpha (and the converted checkpoints they started from), for the
    (G, method) pairs that have more than one seed or a non-mean method (the ablation's)."""
    preset, records = results["preset"], results["records"]
    up = [r for r in records if r["kind"] == "uptrain" and r["alpha"] == preset["alpha"]]
    keys = sorted({(r["num_kv_heads"], r["method"]) for r in up})
    ablated_g = {g for g, m in keys if m != "mean" or len(_find(up, num_kv_heads=g, method=m)) > 1}
    out = {}
    for g, method in sorted(keys, key=lambda k: (-k[0], k[1])):
        if g not in ablated_g:
            continue
        losses = [r["val_loss"] for r in sorted(_find(up, num_kv_heads=g, method=method),
                                                 key=lambda r: r["seed"])]
        conv = [r["val_loss"] for r in sorted(_find(records, kind="convert", num_kv_heads=g,
                                                    method=method), key=lambda r: r["seed"])]
        out[(g, method)] = {"n": len(losses), "mean": float(np.mean(losses)),
                            "std": _std(losses), "losses": losses,
                            "convert_losses": conv,
                            "convert_mean": float(np.mean(conv)) if conv else None,
                            "convert_std": _std(conv)}
    return out

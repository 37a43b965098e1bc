"""The suite's result records: names, validation, results.json, and table.md (the Table 1 analogue).

results.json = {"format": FORMAT, "preset": {...}, "model": {ModelConfig of the MHA source},
"speed": {"batch", "context", "repeats", "per_kv_heads", "bandwidth_bytes_per_s", "peak_flops"},
"analysis": [...], "records": [record, ...]} where a record is one run (or one evaluated point of
a run):
    name                      kind_g{G}[_{method}][_a{alpha}][_lr{rate}]_s{seed}[_p{pretraining
                              seed}], e.g. uptrain_g2_mean_a0.05_s0, lr_g1_first_a0.05_lr0.0003_s0
    kind                      pretrain | reference | continue | convert | lr | uptrain | sweep |
                              scratch | distill (experiments/planning.py: what each is)
    num_kv_heads, method, alpha, seed, pretrain_seed, steps
                              method: a conversion method, 'scratch' (pretrain, scratch) or
                              'none' (reference, continue); alpha: the uptraining proportion (0 for pretrain
                              and convert; a scratch run's budget is (1 + alpha) P steps);
                              pretrain_seed: the MHA pretraining the run descends from
    learning_rate             the run's peak learning rate (null for convert)
    val_loss                  nats per predicted token on the validation split
    val_perplexity            exp(val_loss)
    decode_ms_per_step        ms for one decode step of the run's G: one new token for each of
                              decode_tokens_per_step (= speed.batch) sequences at speed.context
                              cached tokens; median of speed.repeats alternated rounds
    decode_tokens_per_step    tokens one decode step generates (ms per token = the ratio)
    kv_cache_bytes_per_token  model.kv_cache_bytes_per_token of the run's model
    wall_seconds              this suite's time on the run (sweep points share their run's)
speed.per_kv_heads[G] = {ms, ms_lo, ms_hi (95% interval of the median: perf.median_ci), speed_up,
speed_up_lo, speed_up_hi (MHA / G per alternated round: perf.paired_ratio), roofline_ms (the
bytes/FLOPs model's ideal, perf.decode_cost, at the bandwidth and peak measured beside it)}.
analysis = [{pretrain_seed, num_kv_heads, layers: head_analysis.analyse(...)}]: the pretrained
MHA's K/V heads, for each G they are pooled to.

Format 1 (results.json without "format", e.g. the committed experiments/results/cpu and methods)
held decode_ms_per_token (which was ms per step of speed.batch tokens), no pretrain_seed,
learning_rate, speed intervals or analysis; `load_results` upgrades it (upgrade_results) so its
records validate and tabulate, with unknowns as null.
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

FORMAT = 2
FIELDS = ("name", "kind", "num_kv_heads", "method", "alpha", "seed", "pretrain_seed",
          "learning_rate", "steps", "val_loss", "val_perplexity", "decode_ms_per_step",
          "decode_tokens_per_step", "kv_cache_bytes_per_token", "wall_seconds")
KINDS = ("pretrain", "reference", "continue", "convert", "lr", "uptrain", "sweep", "scratch",
         "distill")
# Runs that train from scratch record method 'scratch'; the MHA continued, 'none'.
NON_CONVERSION_METHODS = {"pretrain": "scratch", "scratch": "scratch", "continue": "none",
                          "reference": "none"}
# The MHA runs; the runs with fewer KV heads.
MHA_KINDS = ("pretrain", "reference", "continue")


class RecordError(ValueError):
    """A result record that is malformed or inconsistent with its run."""


def run_name(kind: str, num_kv_heads: int, method: str, alpha: float, seed: int,
             pretrain_seed: int = 0, learning_rate: float | None = None) -> str:
    """The canonical name of a run: what the record's fields must spell (pretraining seed 0 and
    the rate of any kind but 'lr' are not spelled, so format-1 names stay valid)."""
    parts = [kind, f"g{num_kv_heads}"]
    if kind not in NON_CONVERSION_METHODS:
        parts.append(method)
    if kind not in ("pretrain", "convert"):
        parts.append(f"a{alpha:g}")
    if kind == "lr":
        parts.append(f"lr{learning_rate:g}")
    parts.append(f"s{seed}")
    if pretrain_seed:
        parts.append(f"p{pretrain_seed}")
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
    if kind in MHA_KINDS and g != num_heads:
        fail(f"a {kind} run is the MHA model: num_kv_heads must be {num_heads}, got {g}")
    if kind not in MHA_KINDS and g == num_heads:
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
    lr = record["learning_rate"]
    if kind == "lr" and not isinstance(lr, (int, float)):
        fail(f"an lr run records its learning rate, got {lr!r}")
    if lr is not None and (not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0):
        fail(f"learning_rate={lr!r} is not a positive number or null")
    if not isinstance(record["pretrain_seed"], int) or record["pretrain_seed"] < 0:
        fail(f"pretrain_seed={record['pretrain_seed']!r} is not a non-negative int")
    expected_name = run_name(kind, g, method, alpha, record["seed"], record["pretrain_seed"], lr)
    if name != expected_name:
        fail(f"the fields spell {expected_name!r}")
    for key in ("val_loss", "val_perplexity", "decode_ms_per_step", "wall_seconds"):
        value = record[key]
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            fail(f"{key}={value!r} is not a finite non-negative number")
    if record["val_loss"] <= 0 or record["decode_ms_per_step"] <= 0:
        fail(f"val_loss={record['val_loss']} and decode_ms_per_step="
             f"{record['decode_ms_per_step']} must be positive")
    if not isinstance(record["decode_tokens_per_step"], int) or record["decode_tokens_per_step"] < 1:
        fail(f"decode_tokens_per_step={record['decode_tokens_per_step']!r} is not a positive int")
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
    """A results.json object, in the current format (upgrade_results)."""
    with open(path) as f:
        return upgrade_results(json.load(f))


def upgrade_results(obj: dict[str, Any]) -> dict[str, Any]:
    """A format-1 object (no "format") in format 2 (module docstring), unchanged otherwise:
    decode_ms_per_token -> decode_ms_per_step (it was already ms per step), decode_tokens_per_step
    = speed.batch, pretrain_seed 0, learning_rate / speed intervals / analysis unknown."""
    if obj.get("format", 1) == FORMAT:
        return obj
    if obj.get("format", 1) != 1:
        raise RecordError(f"results format {obj['format']!r} is not 1 or {FORMAT}")
    batch = obj["speed"]["batch"]
    records = []
    for r in obj["records"]:
        r = dict(r)
        r["decode_ms_per_step"] = r.pop("decode_ms_per_token")
        r.update(decode_tokens_per_step=batch, pretrain_seed=0, learning_rate=None)
        records.append(r)
    preset = {"pretrain_seeds": [0], "lr_sweep": [], "lr_sweep_methods": [],
              "lr_sweep_kv_heads": [], "control_methods": [], "distill_kv_heads": [],
              **obj["preset"]}
    return {**obj, "format": FORMAT, "preset": preset, "records": records,
            "analysis": obj.get("analysis", [])}


# ----------------------------------------------------------------------------- table.md


def _by_name(records):
    return {r["name"]: r for r in records}


def _find(records, **fields):
    return [r for r in records if all(r[k] == v for k, v in fields.items())]


def _fmt(x, spec):
    return "–" if x is None else format(x, spec)


def _label(g: int, n: int) -> str:
    return "MHA" if g == n else ("MQA" if g == 1 else f"GQA-{g}")


def _pm(xs: list[float], spec: str = ".4f") -> str:
    """'mean ± sample std' of xs; the value alone for one."""
    if not xs:
        return "–"
    if len(xs) == 1:
        return format(xs[0], spec)
    return f"{np.mean(xs):{spec}} ± {_std(xs):{spec.lstrip('+')}}"


def _by_pretrain_seed(rs):
    return sorted(rs, key=lambda r: r["pretrain_seed"])


def make_table(results: dict[str, Any]) -> str:
    """table.md's text from a results.json object: the main table (Table 1 analogue), the
    learning-rate sweep, the uptraining-proportion sweep (Fig. 5), the ablation (Fig. 4) and the
    head analysis with its norm-matched control. Deterministic."""
    preset, speed, records = results["preset"], results["speed"], results["records"]
    config = model_lib.ModelConfig.from_dict(results["model"])
    n, alpha = config.num_heads, preset["alpha"]
    ref_kind = delta_reference_kind(records)
    refs = {r["pretrain_seed"]: r for r in _find(records, kind=ref_kind)}
    ref0 = refs.get(0)
    ref_text = ("the MHA continued for α = {a:g} from its own optimizer state at pretraining's "
                "final learning rate (more pretraining)" if ref_kind == "reference" else
                "the MHA continued for α = {a:g} on the GQA uptraining recipe (results before the "
                "reference run existed)").format(a=alpha)
    per_g = speed.get("per_kv_heads", {})
    cache_tokens = speed["batch"] * speed["context"]
    num_seeds = len({r["pretrain_seed"] for r in records}) or 1
    lines = [
        f"Preset `{preset['name']}`: {config.num_layers} layers, d_model {config.d_model}, "
        f"{n} query heads; pretraining P = {preset['pretrain_steps']} steps of "
        f"{preset['batch_size']} x {preset['seq_len']} tokens; {num_seeds} pretraining seed(s): "
        "each loss is the mean ± sample std over them, Δ the mean ± std of the per-seed "
        f"differences to {ref_text}. Decode: one step for a batch of {speed['batch']} (tokens per step) at "
        f"{speed['context']} cached tokens, median of {speed['repeats']} alternated rounds "
        "[95% interval]; speed-up = MHA / G per round, median [95% interval]; roofline = the "
        "bytes/FLOPs model's ideal step at the bandwidth and peak measured beside it; KV MiB is "
        "that batch's cache.",
        "",
        "| model | KV heads | method | α | seeds | val loss | Δ to MHA | perplexity "
        "| decode ms/step | speed-up | roofline ms | KV MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def row(label, rs):
        if not rs:
            return
        rs = _by_pretrain_seed(rs)
        r0 = rs[0]
        g = r0["num_kv_heads"]
        losses = [r["val_loss"] for r in rs]
        deltas = [r["val_loss"] - refs[r["pretrain_seed"]]["val_loss"] for r in rs
                  if r["pretrain_seed"] in refs]
        sp = per_g.get(str(g))
        ms = r0["decode_ms_per_step"]
        if sp:
            ms_cell = f"{sp['ms']:.2f} [{sp['ms_lo']:.2f}, {sp['ms_hi']:.2f}]"
            up_cell = f"{sp['speed_up']:.3f}x [{sp['speed_up_lo']:.3f}, {sp['speed_up_hi']:.3f}]"
            roof = f"{sp['roofline_ms']:.3g}"
        else:  # format 1: medians only
            ms_cell, roof = f"{ms:.2f}", "–"
            up_cell = (f"{ref0['decode_ms_per_step'] / ms:.2f}x" if ref0 else "–")
        kv_mib = r0["kv_cache_bytes_per_token"] * cache_tokens / 2**20
        lines.append(f"| {label} | {g} | {r0['method']} | {r0['alpha']:g} | {len(rs)} | "
                     f"{_pm(losses)} | {_pm(deltas, '+.4f')} | {math.exp(np.mean(losses)):.3f} | "
                     f"{ms_cell} | {up_cell} | {roof} | {kv_mib:.1f} |")

    row("MHA pretrained", _find(records, kind="pretrain"))
    row(f"MHA continued α={alpha:g} (own optimizer state)", _find(records, kind="reference"))
    row(f"MHA on the GQA recipe α={alpha:g}", _find(records, kind="continue"))
    gs = sorted({r["num_kv_heads"] for r in records if r["num_kv_heads"] < n}, reverse=True)
    for g in gs:
        label = _label(g, n)
        row(f"{label} converted", _find(records, kind="convert", num_kv_heads=g, method="mean",
                                        seed=0))
        row(f"{label} uptrained", _find(records, kind="uptrain", num_kv_heads=g, method="mean",
                                        seed=0, alpha=alpha))
        row(f"{label} distilled", _find(records, kind="distill", num_kv_heads=g))
        row(f"{label} from scratch", _find(records, kind="scratch", num_kv_heads=g))

    lr_runs = [r for r in records if r["kind"] == "lr"]
    if lr_runs:
        rates = sorted({r["learning_rate"] for r in lr_runs})
        lines += ["", f"Uptraining learning rate: validation loss after α = {alpha:g} at each "
                  "peak rate (pretraining seed 0, seed 0); `used` is the rate every uptraining of "
                  "the method then ran at (the lowest loss averaged over these G).", "",
                  "| KV heads | method | " + " | ".join(f"lr={x:g}" for x in rates)
                  + " | used |", "|---|---|" + "---|" * (len(rates) + 1)]
        for g, method in sorted({(r["num_kv_heads"], r["method"]) for r in lr_runs},
                                key=lambda k: (-k[0], k[1])):
            cells = []
            for x in rates:
                found = _find(lr_runs, num_kv_heads=g, method=method, learning_rate=x)
                cells.append(f"{found[0]['val_loss']:.4f}" if found else "–")
            used = sorted({r["learning_rate"] for r in _find(records, kind="uptrain",
                                                              method=method)})
            lines.append(f"| {g} | {method} | " + " | ".join(cells) + " | "
                         + (", ".join(f"{x:g}" for x in used) or "–") + " |")

    sweep = [r for r in records if r["kind"] == "sweep"]
    if sweep:
        alphas = preset["sweep_alphas"]
        lines += ["", "Uptraining proportion (Fig. 5): validation loss after α x P steps of one "
                  "uptraining run per G at a constant learning rate (after warmup), from its "
                  "checkpoints; α = 0 is the converted model (pretraining seed 0).", "",
                  "| KV heads | " + " | ".join(f"α={a:g}" for a in alphas) + " |",
                  "|---|" + "---|" * len(alphas)]
        for g in sorted({r["num_kv_heads"] for r in sweep}, reverse=True):
            cells = []
            for a in alphas:
                kind = "convert" if a == 0 else "sweep"
                found = _find(records, kind=kind, num_kv_heads=g, method="mean", seed=0, alpha=a,
                              pretrain_seed=0)
                cells.append(f"{found[0]['val_loss']:.4f}" if found else "–")
            lines.append(f"| {g} | " + " | ".join(cells) + " |")

    lines += _distill_lines(results)

    ablation = ablation_summary(results)
    if ablation:
        pre = [r["val_loss"] for r in _find(records, kind="pretrain")]
        lines += ["", f"Conversion methods (Fig. 4 ablation): validation loss at α = 0 (converted) "
                  f"and after α = {alpha:g}, mean ± sample std over runs (pretraining seeds x "
                  "seeds; the seed = uptraining batch order, and the draw of `random` / the "
                  "calibration rows of calibrated methods). Gap closed = (loss of `mean` − loss) / "
                  "(loss of `mean` − loss of the MHA pretrained), at α = 0; vs mean = loss − loss "
                  "of `mean`, after α.", "",
                  f"| KV heads | method | runs | lr | val loss α=0 | gap closed α=0 "
                  f"| val loss α={alpha:g} | vs mean α={alpha:g} |",
                  "|---|---|---|---|---|---|---|---|"]
        for (g, method), s in ablation.items():
            base = ablation.get((g, "mean"))
            gap = None
            if base and base["convert_mean"] is not None and s["convert_mean"] is not None and pre:
                width = base["convert_mean"] - float(np.mean(pre))
                gap = (base["convert_mean"] - s["convert_mean"]) / width if width > 0 else None
            vs = s["mean"] - base["mean"] if base else None
            conv = ("–" if s["convert_mean"] is None else
                    f"{s['convert_mean']:.4f} ± {s['convert_std']:.4f}")
            rates = ", ".join(f"{x:g}" for x in s["learning_rates"]) or "–"
            lines.append(f"| {g} | {method} | {s['n']} | {rates} | {conv} | {_fmt(gap, '.0%')} | "
                         f"{s['mean']:.4f} ± {s['std']:.4f} | {_fmt(vs, '+.4f')} |")

    lines += _analysis_lines(results)
    return "\n".join(lines) + "\n"


def delta_reference_kind(records: list[dict[str, Any]]) -> str:
    """The kind of the Δ reference: 'reference' (the MHA continued from its optimizer state), or
    'continue' (the MHA on the GQA recipe) in results made before the reference run existed."""
    return "reference" if any(r["kind"] == "reference" for r in records) else "continue"


def training_flops(record: dict[str, Any], config: model_lib.ModelConfig, seq_len: int,
                   tokens_per_step: int) -> float:
    """Model FLOPs of a record's own training steps (perf.train_flops_per_token x tokens), plus the
    MHA teacher's forward (a third of its training FLOPs per token) for a distill run."""
    from gqa_uptrain import perf  # noqa: PLC0415

    tokens = record["steps"] * tokens_per_step
    flops = perf.train_flops_per_token(config.replace(num_kv_heads=record["num_kv_heads"]),
                                       seq_len) * tokens
    if record["kind"] == "distill":
        flops += perf.train_flops_per_token(config, seq_len) / 3 * tokens
    return float(flops)


def _distill_lines(results: dict[str, Any]) -> list[str]:
    """Distilled vs plain uptraining per G: at equal tokens (the uptrain run of alpha) and at
    equal FLOPs (the plain run of the distilled run's FLOPs: planning.matched_alpha), with the
    training FLOPs, tokens and wall time of each."""
    preset, records = results["preset"], results["records"]
    distilled = [r for r in records if r["kind"] == "distill"]
    if not distilled:
        return []
    config = model_lib.ModelConfig.from_dict(results["model"])
    alpha, tps = preset["alpha"], preset["batch_size"] * preset["seq_len"]
    lines = ["", f"Distillation from the pretrained MHA (weight {preset['distill_weight']:g}, "
             f"temperature {preset['distill_temperature']:g}): `mean` conversions uptrained "
             f"for α = {alpha:g} with loss (1 − weight) CE + weight T² KL(MHA ‖ GQA), against "
             "plain uptraining at equal tokens (α) and at equal FLOPs (the plain run of the "
             "distilled run's FLOPs, the teacher's forward counted: longer by its extra steps). "
             "FLOPs: training only (the model's 6N + attention per token, the teacher's forward "
             "a third of its own); wall: this machine's seconds, mean over pretraining seeds; Δ: "
             "per-seed difference to the plain run at α.", "",
             "| KV heads | run | steps | tokens | train PFLOPs | val loss | Δ to plain α | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for g in sorted({r["num_kv_heads"] for r in distilled}, reverse=True):
        plain = {r["pretrain_seed"]: r for r in _find(records, kind="uptrain", num_kv_heads=g,
                                                       method="mean", seed=0, alpha=alpha)}
        matched = [r for r in records if r["kind"] == "uptrain" and r["num_kv_heads"] == g
                   and r["method"] == "mean" and r["seed"] == 0 and r["alpha"] > alpha]
        for label, rs in (("plain, equal tokens", list(plain.values())),
                          ("distilled", _find(distilled, num_kv_heads=g)),
                          ("plain, equal FLOPs", matched)):
            if not rs:
                continue
            rs = _by_pretrain_seed(rs)
            deltas = [r["val_loss"] - plain[r["pretrain_seed"]]["val_loss"] for r in rs
                      if r["pretrain_seed"] in plain]
            flops = training_flops(rs[0], config, preset["seq_len"], tps)
            lines.append(f"| {g} | {label} | {rs[0]['steps']} | {rs[0]['steps'] * tps:,} | "
                         f"{flops / 1e15:.4g} | {_pm([r['val_loss'] for r in rs])} | "
                         f"{_pm(deltas, '+.4f')} | "
                         f"{np.mean([r['wall_seconds'] for r in rs]):.1f} |")
    return lines


def _analysis_lines(results: dict[str, Any]) -> list[str]:
    """The head analysis (head_analysis.py) per G and layer, mean over pretraining seeds, and the
    alpha = 0 losses of mean, its norm-matched control and first."""
    analysis, records = results.get("analysis") or [], results["records"]
    if not analysis:
        return []
    n = results["model"]["num_heads"]
    lines = ["", "Why the methods differ (head analysis of the pretrained MHA, mean over "
             "pretraining seeds): per layer, the mean pairwise cosine similarity of the K (V) "
             "heads pooled into one group, and |mean of the group| / mean of its members' norms "
             "(1 for equal heads, 1/√r for r orthogonal heads of equal norm: the factor `mean` "
             "scales keys and values by; `first` and `mean_normed` keep 1).", "",
             "| KV heads | layer | r | K cosine | K norm ratio | V cosine | V norm ratio | 1/√r |",
             "|---|---|---|---|---|---|---|---|"]
    gs = sorted({a["num_kv_heads"] for a in analysis}, reverse=True)
    for g in gs:
        entries = [a for a in analysis if a["num_kv_heads"] == g]
        r = n // g
        for i, layer in enumerate(entries[0]["layers"]):
            cell = {k: _pm([e["layers"][i][k] for e in entries], ".3f")
                    for k in ("k_cosine", "k_norm_ratio", "v_cosine", "v_norm_ratio")}
            lines.append(f"| {g} | {layer['layer']} | {r} | {cell['k_cosine']} | "
                         f"{cell['k_norm_ratio']} | {cell['v_cosine']} | {cell['v_norm_ratio']} | "
                         f"{1 / math.sqrt(r):.3f} |")
    controls = sorted({r["method"] for r in records if r["kind"] == "convert"}
                      & {"mean", "mean_normed", "first"})
    if "mean_normed" in controls:
        lines += ["", "The norm-matched control at α = 0: validation loss of the converted "
                  "models (mean ± std over pretraining seeds, seed 0). `mean_normed` is `mean` "
                  "rescaled to its members' average norm: what it recovers of the gap between "
                  "`mean` and `first` is the share due to the shrunk norms.", "",
                  "| KV heads | " + " | ".join(controls) + " |", "|---|" + "---|" * len(controls)]
        for g in gs:
            cells = [_pm([r["val_loss"] for r in _find(records, kind="convert", num_kv_heads=g,
                                                        method=m, seed=0)]) for m in controls]
            lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return lines


def _std(xs: list[float]) -> float:
    """Sample standard deviation; 0 for fewer than two values (e.g. a seed-independent method's
    single converted checkpoint)."""
    return float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def ablation_summary(results: dict[str, Any]) -> dict[tuple[int, str], dict[str, Any]]:
    """{(G, method): {n, mean, std, losses, learning_rates, convert_losses, convert_mean,
    convert_std}} of the uptrained runs at alpha over every pretraining seed and seed (and the
    converted checkpoints they started from), for the (G, method) pairs that have more than one
    run or a non-mean method (the ablation's)."""
    preset, records = results["preset"], results["records"]
    up = [r for r in records if r["kind"] == "uptrain" and r["alpha"] == preset["alpha"]]
    keys = sorted({(r["num_kv_heads"], r["method"]) for r in up})
    ablated_g = {g for g, m in keys if m != "mean" or len(_find(up, num_kv_heads=g, method=m)) > 1}
    out = {}
    order = lambda r: (r["pretrain_seed"], r["seed"])  # noqa: E731
    for g, method in sorted(keys, key=lambda k: (-k[0], k[1])):
        if g not in ablated_g:
            continue
        runs = sorted(_find(up, num_kv_heads=g, method=method), key=order)
        losses = [r["val_loss"] for r in runs]
        conv = [r["val_loss"] for r in sorted(_find(records, kind="convert", num_kv_heads=g,
                                                    method=method), key=order)]
        out[(g, method)] = {"n": len(losses), "mean": float(np.mean(losses)),
                            "std": _std(losses), "losses": losses,
                            "learning_rates": sorted({r["learning_rate"] for r in runs
                                                      if r["learning_rate"] is not None}),
                            "convert_losses": conv,
                            "convert_mean": float(np.mean(conv)) if conv else None,
                            "convert_std": _std(conv)}
    return out

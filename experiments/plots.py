"""The suite's three figures, from a results.json object (matplotlib, Agg backend: no display).

  quality_vs_speed.png  validation loss vs decode ms/step across G: converted (alpha 0), uptrained
                        (alpha), from scratch, and MHA (paper Fig. 6 / Table 1); each point the
                        mean over pretraining seeds with a ±1 sample-std bar (none for one seed),
                        and the decode time's 95% interval as a horizontal bar where recorded
  quality_vs_alpha.png  validation loss vs uptraining proportion alpha per G (paper Fig. 5)
  ablation.png          validation loss after alpha per conversion method, each seed a dot and the
                        mean a bar drawn from the MHA reference (its length is the table's Δ), per G
                        (paper Fig. 4)

A figure that would show no data series beyond the MHA reference (e.g. quality_vs_alpha.png for a
preset without an alpha sweep) is not written: make_plots says so and removes a stale copy.
Losses are nats per predicted token (the suite's tokenizer is byte-level: nats per byte).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments import results  # noqa: E402

FILES = ("quality_vs_speed.png", "quality_vs_alpha.png", "ablation.png")
LOSS_LABEL = "validation loss (nats/token; byte-level tokens)"


def _save(fig, path: str) -> None:
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def _label(g: int, n: int) -> str:
    return "MHA" if g == n else ("MQA" if g == 1 else f"GQA-{g}")


def _reference(recs: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    """The MHA record of `kind` ('pretrain' | 'reference' | 'continue'), its loss the mean over
    pretraining seeds; None if there is none."""
    found = [r for r in recs if r["kind"] == kind]
    if not found:
        return None
    return {**found[0], "val_loss": float(np.mean([r["val_loss"] for r in found]))}


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return float(np.mean(xs)), (float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0)


def _ms_interval(obj: dict[str, Any], g: int) -> tuple[float, float] | None:
    row = obj["speed"].get("per_kv_heads", {}).get(str(g))
    return (row["ms_lo"], row["ms_hi"]) if row else None


def _speed_series(obj: dict[str, Any]) -> list[tuple[str, str, str, str, list]]:
    """Per kind: [(ms, loss mean, loss std, G), ...] over pretraining seeds, ordered by ms."""
    recs, alpha = obj["records"], obj["preset"]["alpha"]
    out = []
    for label, kind, marker, color in (("converted (α=0)", "convert", "o", "tab:gray"),
                                       (f"uptrained (α={alpha:g})", "uptrain", "s", "tab:blue"),
                                       (f"from scratch ({1 + alpha:g} P)", "scratch", "^",
                                        "tab:green")):
        by_g: dict[int, list] = {}
        for r in recs:
            if (r["kind"] == kind and r["method"] in ("mean", "scratch") and r["seed"] == 0
                    and (kind != "uptrain" or r["alpha"] == alpha)):  # not the FLOP-matched
                by_g.setdefault(r["num_kv_heads"], []).append(r)
        pts = sorted((rs[0]["decode_ms_per_step"], *_mean_std([r["val_loss"] for r in rs]), g)
                     for g, rs in by_g.items())
        if pts:
            out.append((label, kind, marker, color, pts))
    return out


def _alpha_series(obj: dict[str, Any]) -> list[tuple[int, list]]:
    recs = obj["records"]
    out = []
    for g in sorted({r["num_kv_heads"] for r in recs if r["kind"] == "sweep"}, reverse=True):
        pts = sorted((r["alpha"], r["val_loss"]) for r in recs if r["num_kv_heads"] == g
                     and r["method"] == "mean" and r["seed"] == 0 and r["pretrain_seed"] == 0
                     and r["kind"] in ("sweep", "convert"))
        out.append((g, pts))
    return out


def quality_vs_speed(obj: dict[str, Any], path: str) -> None:
    recs, n = obj["records"], obj["model"]["num_heads"]
    alpha = obj["preset"]["alpha"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label, kind, marker, color, pts in _speed_series(obj):
        xerr = []
        for x, _, _, g in pts:
            ci = _ms_interval(obj, g)
            xerr.append((x - ci[0], ci[1] - x) if ci else (0.0, 0.0))
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                    xerr=np.array(xerr).T, marker=marker, color=color, label=label, capsize=3,
                    linestyle="-" if kind == "uptrain" else "none")
        for x, y, _, g in pts:
            ax.annotate(_label(g, n), (x, y), textcoords="offset points", xytext=(5, 4),
                        fontsize=8)
    # The two MHA points share their decode time and differ by ~0.02 nats: distinct markers (a
    # hollow diamond around a star) and a label each, one above and one below, pointing at them.
    for kind, marker, label, dy, va in (
            ("pretrain", "D", "MHA pretrained", -9, "top"),
            (results.delta_reference_kind(recs), "*",
             f"MHA continued (α={alpha:g}): the Δ reference", 9, "bottom")):
        r = _reference(recs, kind)
        if r is None:
            continue
        hollow = marker == "D"
        ax.plot([r["decode_ms_per_step"]], [r["val_loss"]], marker=marker, color="tab:red",
                markersize=11 if hollow else 8, markerfacecolor="none" if hollow else "tab:red",
                markeredgewidth=1.5 if hollow else 1.0, linestyle="none", label=label)
        ax.annotate(f"{' '.join(label.split()[:2])} {r['val_loss']:.3f}",
                    (r["decode_ms_per_step"], r["val_loss"]), textcoords="offset points",
                    xytext=(-12, dy), ha="right", va=va, fontsize=8, color="tab:red",
                    arrowprops=dict(arrowstyle="-", color="tab:red", lw=0.6))
    s = obj["speed"]
    ax.set_xlabel(f"decode time per step, ms (batch {s['batch']}, {s['context']} cached tokens)")
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title("Quality vs decode time across KV heads")
    ax.margins(x=0.08, y=0.12)
    # Outside the axes: inside, it covered a point's label.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3)
    _save(fig, path)


def quality_vs_alpha(obj: dict[str, Any], path: str) -> None:
    recs, n = obj["records"], obj["model"]["num_heads"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for g, pts in _alpha_series(obj):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=_label(g, n))
    for r in recs:
        if r["pretrain_seed"] != 0:  # the sweep runs on pretraining seed 0: its references
            continue
        if r["kind"] == "pretrain":
            ax.axhline(r["val_loss"], color="tab:red", linestyle="--", label="MHA pretrained")
        if r["kind"] == results.delta_reference_kind(recs):
            ax.plot([r["alpha"]], [r["val_loss"]], marker="*", color="tab:red", markersize=10,
                    linestyle="none", label=f"MHA continued (α={r['alpha']:g})")
    p = obj["preset"]["pretrain_steps"]
    ax.set_xlabel(f"uptraining proportion α = uptraining steps / P (P = {p} steps);\n"
                  "constant learning rate, one run per G")
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title("Quality vs uptraining proportion")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def ablation(obj: dict[str, Any], path: str) -> None:
    summary = results.ablation_summary(obj)
    recs, n = obj["records"], obj["model"]["num_heads"]
    alpha = obj["preset"]["alpha"]
    cont = _reference(recs, results.delta_reference_kind(recs))
    pre = _reference(recs, "pretrain")
    means = [s["mean"] for s in summary.values()]
    # Bars start at the reference, so a bar's length is the table's Δ to MHA (bars from an
    # arbitrary axis floor exaggerated the gaps); without a reference, dots and error bars only.
    ref = cont["val_loss"] if cont else None
    fig, ax = plt.subplots(figsize=(7, 4.6) if len(summary) > 6 else (6, 4.2))
    labels = []
    for i, ((g, method), s) in enumerate(summary.items()):
        if ref is not None:
            ax.bar(i, s["mean"] - ref, bottom=ref, color="tab:blue", alpha=0.35, width=0.6)
        ax.errorbar(i, s["mean"], yerr=s["std"], color="black", capsize=4, marker="_",
                    markersize=14)
        ax.plot([i] * len(s["losses"]), s["losses"], "o", color="tab:blue", markersize=4)
        labels.append(f"{_label(g, n)}\n{method}")
    if cont is not None:
        ax.axhline(cont["val_loss"], color="tab:red", linestyle="--", lw=1.2,
                   label=f"MHA continued (α={alpha:g}):\n{cont['val_loss']:.3f}, the Δ reference")
    if pre is not None:
        ax.axhline(pre["val_loss"], color="tab:red", linestyle=":", lw=1.2,
                   label=f"MHA pretrained:\n{pre['val_loss']:.3f}")
    values = [v for s in summary.values() for v in s["losses"]] + means
    values += [r["val_loss"] for r in (cont, pre) if r is not None]
    lo, hi = min(values), max(values)
    pad = 0.06 * max(hi - lo, 1e-3)
    ax.set_ylim(lo - pad, hi + pad)
    crowded = len(labels) > 6  # e.g. the methods preset's 3 G x 3 methods: names would overlap
    ax.set_xticks(range(len(labels)), labels, fontsize=7 if crowded else 8,
                  rotation=35 if crowded else 0, ha="right" if crowded else "center")
    ax.set_ylabel(f"validation loss after α={alpha:g}\n(nats/token; byte-level tokens)")
    ax.set_title("Conversion method ablation\n(dots: seeds; black: mean ± std; bar: mean − MHA "
                 "reference)", fontsize=10)
    if cont is not None or pre is not None:  # outside the axes: inside, it covered the dots
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


def _skip_reason(name: str, obj: dict[str, Any]) -> str:
    """Why figure `name` would show no data beyond the MHA reference ('' = it has data)."""
    if name == "quality_vs_speed.png":
        return "" if _speed_series(obj) else "no converted, uptrained or from-scratch records"
    if name == "quality_vs_alpha.png":
        return "" if _alpha_series(obj) else "no alpha-sweep records"
    if name == "ablation.png":
        return "" if results.ablation_summary(obj) else "no ablation records"
    raise ValueError(name)


def _print(msg: str) -> None:
    print(f"[reproduce] {msg}", flush=True)


def make_plots(obj: dict[str, Any], output_dir: str,
               log: Callable[[str], None] | None = _print) -> list[str]:
    """Writes the FILES that have data into output_dir (atomically each) and returns their paths.

    A figure with no data series beyond the MHA reference is not written (a stale copy in
    output_dir is removed); `log` (None: silent) gets one line saying which and why.
    """
    written = []
    for name, fn in zip(FILES, (quality_vs_speed, quality_vs_alpha, ablation)):
        path = os.path.join(output_dir, name)
        reason = _skip_reason(name, obj)
        if reason:
            stale = os.path.exists(path)
            if stale:
                os.remove(path)
            if log is not None:
                log(f"not writing {name}: {reason}, only the MHA reference"
                    + (" (removed the old one)" if stale else ""))
            continue
        fn(obj, path)
        written.append(path)
    return written

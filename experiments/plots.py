"""The suite's three figures, from a results.json object (matplotlib, Agg backend: no display).

  quality_vs_speed.png  validation loss vs decode ms/step across G: converted (alpha 0), uptrained
                        (alpha), from scratch, and MHA (paper Fig. 6 / Table 1)
  quality_vs_alpha.png  validation loss vs uptraining proportion alpha per G (paper Fig. 5)
  ablation.png          validation loss after alpha per conversion method, each seed a dot and the
                        mean a bar, per G (paper Fig. 4)
"""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import results  # noqa: E402

FILES = ("quality_vs_speed.png", "quality_vs_alpha.png", "ablation.png")


def _save(fig, path: str) -> None:
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def _label(g: int, n: int) -> str:
    return "MHA" if g == n else ("MQA" if g == 1 else f"GQA-{g}")


def quality_vs_speed(obj: dict[str, Any], path: str) -> None:
    recs, n = obj["records"], obj["model"]["num_heads"]
    alpha = obj["preset"]["alpha"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    series = [("converted (α=0)", "convert", "o", "tab:gray"),
              (f"uptrained (α={alpha:g})", "uptrain", "s", "tab:blue"),
              (f"from scratch ({1 + alpha:g} P)", "scratch", "^", "tab:green")]
    for label, kind, marker, color in series:
        pts = sorted((r["decode_ms_per_token"], r["val_loss"], r["num_kv_heads"]) for r in recs
                     if r["kind"] == kind and r["method"] in ("mean", "scratch") and r["seed"] == 0)
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=label,
                linestyle="-" if kind == "uptrain" else "none")
        for x, y, g in pts:
            ax.annotate(_label(g, n), (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
    for kind, marker, label in (("pretrain", "D", "MHA pretrained"),
                                ("continue", "*", f"MHA continued (α={alpha:g})")):
        for r in recs:
            if r["kind"] == kind:
                ax.plot([r["decode_ms_per_token"]], [r["val_loss"]], marker=marker,
                        color="tab:red", markersize=9 if marker == "*" else 6, linestyle="none",
                        label=label)
    s = obj["speed"]
    ax.set_xlabel(f"decode ms per step (batch {s['batch']}, {s['context']} cached tokens)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Quality vs decode time across KV heads")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def quality_vs_alpha(obj: dict[str, Any], path: str) -> None:
    recs, n = obj["records"], obj["model"]["num_heads"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for g in sorted({r["num_kv_heads"] for r in recs if r["kind"] == "sweep"}, reverse=True):
        pts = sorted((r["alpha"], r["val_loss"]) for r in recs if r["num_kv_heads"] == g
                     and r["method"] == "mean" and r["seed"] == 0
                     and r["kind"] in ("sweep", "convert"))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=_label(g, n))
    for r in recs:
        if r["kind"] == "pretrain":
            ax.axhline(r["val_loss"], color="tab:red", linestyle="--", label="MHA pretrained")
        if r["kind"] == "continue":
            ax.plot([r["alpha"]], [r["val_loss"]], marker="*", color="tab:red", markersize=10,
                    linestyle="none", label=f"MHA continued (α={r['alpha']:g})")
    ax.set_xlabel("uptraining proportion α (constant learning rate, one run per G)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Quality vs uptraining proportion")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def ablation(obj: dict[str, Any], path: str) -> None:
    summary = results.ablation_summary(obj)
    n = obj["model"]["num_heads"]
    fig, ax = plt.subplots(figsize=(7, 4.6) if len(summary) > 6 else (6, 4.2))
    labels = []
    for i, ((g, method), s) in enumerate(summary.items()):
        ax.bar(i, s["mean"], color="tab:blue", alpha=0.35)
        ax.errorbar(i, s["mean"], yerr=s["std"], color="black", capsize=4)
        ax.plot([i] * len(s["losses"]), s["losses"], "o", color="tab:blue", markersize=4)
        labels.append(f"{_label(g, n)}\n{method}")
    if summary:
        lo = min(min(s["losses"]) for s in summary.values())
        hi = max(max(s["losses"]) for s in summary.values())
        pad = max(hi - lo, 1e-3)
        ax.set_ylim(lo - pad, hi + pad)  # bars from 0 would hide differences of 0.01 nats
    crowded = len(labels) > 6  # e.g. the methods preset's 3 G x 3 methods: names would overlap
    ax.set_xticks(range(len(labels)), labels, fontsize=7 if crowded else 8,
                  rotation=35 if crowded else 0, ha="right" if crowded else "center")
    ax.set_ylabel(f"validation loss after α={obj['preset']['alpha']:g}")
    ax.set_title("Conversion method ablation (dots: seeds; bar: mean ± std)")
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


def make_plots(obj: dict[str, Any], output_dir: str) -> list[str]:
    """Writes FILES into output_dir (atomically each); returns their paths."""
    paths = [os.path.join(output_dir, f) for f in FILES]
    for fn, path in zip((quality_vs_speed, quality_vs_alpha, ablation), paths):
        fn(obj, path)
    return paths

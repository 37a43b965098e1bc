r"""Reproduce the GQA paper's quality/speed trade-off at this machine's scale, in one command.

    # the default: ~50 minutes on 2 CPU cores (measured 47; table + plots like the README's)
    python experiments/reproduce.py --preset=cpu --output_dir=results/cpu
    # every kind of run at toy scale, <= 10 minutes
    python experiments/reproduce.py --preset=quick --output_dir=results/quick
    # every run for every G, a larger model, P = 5,000: an accelerator or a long CPU run (cost: presets.py)
    python experiments/reproduce.py --preset=full --output_dir=results/full
    # conversion methods beyond mean pooling (issue 8), reusing the cpu run's pretraining
    python experiments/reproduce.py --preset=methods --output_dir=results/methods \
        --reuse_from=results/cpu
    python experiments/reproduce.py --list_presets   # each preset's token arithmetic and cost

Rerunning the same command continues an interrupted suite: finished runs are skipped and a
training cut short resumes from its checkpoint (experiments/suite.py). Outputs in --output_dir:
results.json (one record per run, experiments/results.py), table.md, quality_vs_speed.png,
quality_vs_alpha.png, ablation.png. `--table_only` rewrites table.md and the plots from an
existing results.json; `--remeasure_speed` times decode again (after a change to the decode path)
and rewrites the records' decode figures without retraining anything.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Offline by default: the suite's corpus is the Python standard library (data.py).
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")

from experiments import planning, presets  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu", choices=sorted(presets.PRESETS),
                        help="which suite to run (default cpu; --list_presets describes each)")
    parser.add_argument("--output_dir", default="",
                        help="where results.json, table.md, the plots and the runs (runs/NAME/) go "
                             "(required unless --list_presets); rerun with it to continue")
    parser.add_argument("--compilation_cache_dir", default="",
                        help="jax's persistent compilation cache ('' = OUTPUT_DIR/jax_cache)")
    parser.add_argument("--table_only", action="store_true",
                        help="regenerate table.md and the plots from OUTPUT_DIR/results.json")
    parser.add_argument("--reuse_from", default="",
                        help="another suite output directory whose preset computes the same runs "
                             "(same model, P, alpha, evaluation and speed settings): its finished "
                             "runs are copied instead of repeated")
    parser.add_argument("--remeasure_speed", action="store_true",
                        help="time decode again (deletes OUTPUT_DIR/speed.json) and update every "
                             "record's decode_ms_per_step")
    parser.add_argument("--list_presets", action="store_true",
                        help="print each preset's description and step counts, and exit")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_presets:
        for p in presets.PRESETS.values():
            print(f"{p.name}: {p.doc}\n  steps: {p.total_steps()}\n  runs: {len(planning.plan(p))}"
                  f"\n  cost here: {p.cost()}\n")
        return 0
    if not args.output_dir:
        print("error: --output_dir is required", file=sys.stderr)
        return 2

    from experiments import plots, results, suite  # noqa: PLC0415 (jax import: after parsing)
    from gqa_uptrain import cpu  # noqa: PLC0415

    try:
        if args.table_only:
            obj = results.load_results(os.path.join(args.output_dir, "results.json"))
            results.validate_results(obj)
            results.write_text_atomic(os.path.join(args.output_dir, "table.md"),
                                      results.make_table(obj))
            plots.make_plots(obj, args.output_dir)
            return 0
        cpu.enable()  # trains and decodes as the command lines do (gqa_uptrain/cpu/)
        suite.enable_compilation_cache(args.compilation_cache_dir
                                       or os.path.join(args.output_dir, "jax_cache"))
        if args.remeasure_speed and os.path.exists(os.path.join(args.output_dir, "speed.json")):
            os.remove(os.path.join(args.output_dir, "speed.json"))
        suite.run_suite(presets.PRESETS[args.preset], args.output_dir, args.reuse_from)
    except (ValueError, OSError, FloatingPointError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

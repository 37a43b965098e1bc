"""Benchmarks, one subcommand each (each module's docstring says what it measures and its keys):

    python -m gqa_uptrain.bench decode  [--quick]  decode per num_kv_heads: roofline, transformers
    python -m gqa_uptrain.bench train   [--quick]  training step tokens/s and MFU vs transformers
    python -m gqa_uptrain.bench convert [--quick]  HF -> HF converter vs a plain copy: time, memory
    python -m gqa_uptrain.bench kernels [--quick] [--sweep-blocks]  Pallas attention kernels
    python -m gqa_uptrain.bench data    [--quick]  preparing and loading tokens vs what they feed

Every subcommand prints a readable (Markdown) table and, as its LAST line, one JSON object of
headline figures (gqa_uptrain/benchmarks/<name>.py documents its keys). decode, train and convert
judge the issue's targets: the JSON's `targets` holds true (met), false (missed) or null (the run
lacks what one needs), and the line `Targets: NAME met; ...` before the JSON says the same.
`--quick` shrinks a benchmark to a smoke test that runs in under a minute on a CPU; its times mean
nothing, so every target is reported as "not judged (--quick)" instead, in both places.
Bad arguments print one line on stderr and exit 2; a benchmark that cannot run (bad values, no
disk space) prints `error: ...` and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from gqa_uptrain import cpu
from gqa_uptrain.benchmarks import convert, data, decode, kernels, train
from gqa_uptrain.benchmarks.common import BenchError

_MODULES = (decode, train, convert, kernels, data)
# name -> (add_arguments(parser), run(args) -> headline dict)
SUBCOMMANDS: dict[str, tuple[Callable, Callable]] = {
    module.__name__.rsplit(".", 1)[1]: (module.add_arguments, module.run) for module in _MODULES
}
_HELP = {module.__name__.rsplit(".", 1)[1]: module.__doc__.splitlines()[0] for module in _MODULES}
NOT_JUDGED = "not judged (--quick)"  # every target of a --quick run, in the JSON and printed


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, not argparse's usage block
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m gqa_uptrain.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                help="the benchmark to run (each has its own --help)")
    for name, (add_arguments, _) in SUBCOMMANDS.items():
        add_arguments(sub.add_parser(name, help=_HELP.get(name), description=_HELP.get(name)))
    return parser


def judge_targets(headline: dict[str, Any], quick: bool) -> str | None:
    """The one place where a run's targets are reported: under --quick every one becomes
    NOT_JUDGED in `headline` (in place); returns the `Targets: ...` line (None: no targets)."""
    targets = headline.get("targets")
    if not targets:
        return None
    if quick:
        headline["targets"] = targets = {name: NOT_JUDGED for name in targets}
    words = {True: "met", False: "missed", None: "n/a"}
    return "Targets: " + "; ".join(
        f"{name} {value if isinstance(value, str) else words[value]}"
        for name, value in targets.items())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cpu.enable()  # the CPU tuning the command lines run with (gqa_uptrain/cpu/)
    try:
        headline = SUBCOMMANDS[args.command][1](args)
    except BenchError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    line = judge_targets(headline, args.quick)
    if line is not None:
        print(line)
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    # malloc settings only for train: cpu/hostmem.py says why not decode and convert.
    cpu.enable(tune_malloc=sys.argv[1:2] == ["train"])
    sys.exit(main())

"""Benchmarks, one subcommand each (each module's docstring says what it measures and its keys):

    python -m gqa_uptrain.bench decode  [--quick]  decode per num_kv_heads: roofline, transformers
    python -m gqa_uptrain.bench train   [--quick]  training step tokens/s and MFU vs transformers
    python -m gqa_uptrain.bench convert [--quick]  HF -> HF converter vs a plain copy: time, memory
    python -m gqa_uptrain.bench kernels [--quick] [--sweep-blocks]  Pallas attention kernels

Every subcommand prints a readable (Markdown) table and, as its LAST line, one JSON object of
headline figures (gqa_uptrain/benchmarks/<name>.py documents its keys). `--quick` shrinks a
benchmark to a smoke test that runs in under a minute on a CPU; its times mean nothing.
Bad arguments print one line on stderr and exit 2; a benchmark that cannot run (bad values, no
disk space) prints `error: ...` and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from gqa_uptrain import hostmem
from gqa_uptrain.benchmarks import convert, decode, kernels, train
from gqa_uptrain.benchmarks.common import BenchError

_MODULES = (decode, train, convert, kernels)
# name -> (add_arguments(parser), run(args) -> headline dict)
SUBCOMMANDS: dict[str, tuple[Callable, Callable]] = {
    module.__name__.rsplit(".", 1)[1]: (module.add_arguments, module.run) for module in _MODULES
}
_HELP = {module.__name__.rsplit(".", 1)[1]: module.__doc__.splitlines()[0] for module in _MODULES}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, not argparse's usage block
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m gqa_uptrain.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (add_arguments, _) in SUBCOMMANDS.items():
        add_arguments(sub.add_parser(name, help=_HELP.get(name), description=_HELP.get(name)))
    args = parser.parse_args(argv)
    try:
        headline = SUBCOMMANDS[args.command][1](args)
    except BenchError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["train"]:  # only train: hostmem.py says why not decode and convert
        hostmem.reexec_with_tuned_malloc()
    sys.exit(main())

"""The `--help` convention of the command lines: `--help` exits 0 and shows every flag the parser
defines, each with a non-empty help text.

The flags come from each command's own parser object (ENTRY_POINTS: a function per command that
returns {flag: help text}), not from a list written here, so a flag added without a help text
fails this test. To add a command, append an EntryPoint; an absl-flags one (gqa_uptrain.train,
gqa_uptrain.evaluate) needs only an `options` function that reads its flags, e.g.
{f"--{name}": flag.help for name, flag in FLAGS.__flags.items()} for the module's own flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from typing import Callable
from unittest import mock

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import reproduce  # noqa: E402
from gqa_uptrain import bench, convert, plan  # noqa: E402


@dataclasses.dataclass(frozen=True)
class EntryPoint:
    name: str  # the test id
    command: tuple[str, ...]  # arguments after sys.executable, before --help
    options: Callable[[], dict[str, str | None]]  # every flag (and subcommand) -> its help text


def argparse_options(parser: argparse.ArgumentParser) -> dict[str, str | None]:
    """Every option string of `parser` -> its help text as --help shows it (%(default)s
    expanded; None: no help text or hidden); subcommands by name, with the help of their line."""
    formatter = parser._get_formatter()
    options: dict[str, str | None] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                options[choice.dest] = choice.help or None
        help_text = (None if action.help in (None, argparse.SUPPRESS)
                     else formatter._expand_help(action))
        for option in action.option_strings:
            options[option] = help_text
    return options


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {name: sub for action in parser._actions
            if isinstance(action, argparse._SubParsersAction)
            for name, sub in action.choices.items()}


def parser_built_by(fn: Callable, *args) -> argparse.ArgumentParser:
    """The parser that fn(*args) builds and parses with, caught at its parse_args call: for a
    command that has no function returning its parser (gqa_uptrain.convert's parse_args)."""
    built = []

    class Caught(Exception):
        pass

    def catch(self, *_, **__):
        built.append(self)
        raise Caught

    with mock.patch.object(argparse.ArgumentParser, "parse_args", catch):
        with pytest.raises(Caught):
            fn(*args)
    return built[0]


def _entry_points() -> list[EntryPoint]:
    entries = [
        EntryPoint("convert", ("-m", "gqa_uptrain.convert"),
                   lambda: argparse_options(parser_built_by(convert.parse_args, []))),
        EntryPoint("bench", ("-m", "gqa_uptrain.bench"),
                   lambda: argparse_options(bench.build_parser())),
    ]
    for name in subparsers(bench.build_parser()):
        entries.append(EntryPoint(
            f"bench {name}", ("-m", "gqa_uptrain.bench", name),
            lambda name=name: argparse_options(subparsers(bench.build_parser())[name])))
    entries.append(EntryPoint("reproduce", (os.path.join("experiments", "reproduce.py"),),
                              lambda: argparse_options(reproduce.build_parser())))
    entries.append(EntryPoint("plan", ("-m", "gqa_uptrain.plan"),
                              lambda: argparse_options(plan.build_parser())))
    return entries


ENTRY_POINTS = _entry_points()


def _squeeze(text: str) -> str:
    """Without whitespace: help texts are re-wrapped (and broken at hyphens) by the formatter."""
    return "".join(text.split())


def check_help(options: dict[str, str | None], help_output: str) -> list[str]:
    """What is wrong: each flag with no help text, or missing from the --help output."""
    problems, shown = [], _squeeze(help_output)
    for option, help_text in options.items():
        if not (help_text and help_text.strip()):
            problems.append(f"{option}: no help text")
        elif option not in help_output or _squeeze(help_text) not in shown:
            problems.append(f"{option}: not shown with its help text by --help")
    return problems


def test_every_bench_subcommand_is_covered():
    assert {e.name for e in ENTRY_POINTS} >= {f"bench {name}" for name in bench.SUBCOMMANDS}


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda e: e.name)
def test_help_exits_0_and_shows_every_flag_with_its_help(entry):
    options = entry.options()
    assert "--help" in options
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               COLUMNS="100")
    proc = subprocess.run([sys.executable, *entry.command, "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert check_help(options, proc.stdout) == [], proc.stdout


def test_the_check_catches_a_flag_without_help():
    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--documented", default=3, help="a number (default %(default)s)")
    parser.add_argument("--bare")
    parser.add_argument("--hidden", help=argparse.SUPPRESS)
    options = argparse_options(parser)
    assert options["--documented"] == "a number (default 3)"
    assert check_help(options, parser.format_help()) == ["--bare: no help text",
                                                         "--hidden: no help text"]

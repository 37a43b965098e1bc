"""The command-line front of the absl entry points (train, evaluate): help, flag and config errors.

absl's own handling is made for servers: `--help` exits 1 and lists absl/orbax internals, and a
config override with a typo (`--config.num_stepz=5`) ends in a 55-line traceback. `run(main, ...)`
keeps absl (ml_collections' config flags need it) but parses the command line itself first:
  --help / -h        every flag of the entry point with its help text (and, for train, every
                     config key with its description), exit 0;
  a bad flag         one line `error: ...` naming it, exit 2;
  a bad config       one line naming the config argument or key and the closest valid one, exit 2.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any, Callable, NoReturn

from gqa_uptrain import config_keys

HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull", "-?")
USAGE_EXIT = 2  # bad command line, as argparse
ERROR_EXIT = 1  # the command was understood but cannot be done


class UsageError(ValueError):
    """A command line that names a flag, config argument or config key that does not exist."""


def one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split())


def fail(message: Any, code: int = ERROR_EXIT) -> NoReturn:
    print(f"error: {one_line(message)}", file=sys.stderr)
    sys.exit(code)


# ----------------------------------------------------------------------------- config files


def split_config_flag(value: str) -> tuple[str, str | None]:
    """'configs/pretrain.py:smoke,size=cpu' -> ('configs/pretrain.py', 'smoke,size=cpu')."""
    path, sep, arg = value.partition(":")
    return path, (arg if sep else None)


def load_config(value: str):
    """get_config(arg) of `--config=PATH[:ARG]`; UsageError naming the file or the argument."""
    path, arg = split_config_flag(value)
    if not os.path.isfile(path):
        raise UsageError(f"--config={value}: no such config file {path!r}")
    spec = importlib.util.spec_from_file_location("_gqa_uptrain_config", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 (any error in a user's config file)
        raise UsageError(f"--config={value}: cannot load {path}: {type(e).__name__}: {e}") from None
    try:
        return module.get_config(arg)
    except ValueError as e:
        raise UsageError(f"--config={value}: {e}") from None


def _override_keys(argv: list[str], flag: str) -> list[str]:
    prefix = f"--{flag}."
    keys = []
    for a in argv:
        if a.startswith(prefix):
            keys.append(a[len(prefix):].partition("=")[0])
        elif a.startswith(f"--no{flag}."):  # absl's boolean negation
            keys.append(a[len(f"--no{flag}."):])
    return keys


def check_config_overrides(argv: list[str], flag: str = "config") -> None:
    """Every `--config.KEY=...` names a key of the config; UsageError with the closest one."""
    value = next((a.partition("=")[2] for a in argv if a.startswith(f"--{flag}=")), None)
    if value is None:
        if f"--{flag}" in argv and argv.index(f"--{flag}") + 1 < len(argv):
            value = argv[argv.index(f"--{flag}") + 1]
        else:
            return  # absl reports the missing flag
    config = load_config(value)
    known = [k for k, _ in config_keys.flat_keys(config)]
    for key in _override_keys(argv, flag):
        if key in known:
            continue
        parent = next((k for k in known if key.startswith(k + ".")), None)
        if parent is not None:
            raise UsageError(f"--{flag}.{key}: {parent!r} is {_config_value(config, parent)!r} "
                             f"in {split_config_flag(value)[0]}, so it has no key "
                             f"{key[len(parent) + 1:]!r}")
        near = config_keys.closest(key, known)
        hint = f"; did you mean --{flag}.{near}?" if near else ""
        raise UsageError(f"--{flag}.{key}: unknown config key {key!r}{hint} "
                         f"(--print_config lists every key)")


def _config_value(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


# ----------------------------------------------------------------------------- help


def help_text(description: str, config_flag: str | None) -> str:
    from absl import flags  # noqa: PLC0415

    lines = [description.strip(), "", "flags:"]
    for f in flags.FLAGS.get_key_flags_for_module(sys.argv[0]):
        default = "" if f.default in (None, "") else f" (default: {f.default!r})"
        lines.append(f"  --{f.name}{default}")
        lines.append(f"      {f.help}")
    lines.append("  --help")
    lines.append("      print this help and exit")
    if config_flag:
        lines += ["", f"config keys (override any with --{config_flag}.KEY=VALUE; "
                      f"--print_config prints a config's resolved values):"]
        for key, text in config_keys.DESCRIPTIONS.items():
            lines.append(f"  {key}: {text}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- entry


def run(main: Callable[[list[str]], Any], *, description: str,
        config_flag: str | None = None) -> None:
    """absl.app.run(main) behind the checks of the module docstring."""
    from absl import app, flags  # noqa: PLC0415

    def parse(argv: list[str]) -> list[str]:
        if any(a in HELP_FLAGS for a in argv[1:]):
            print(help_text(description, config_flag))
            sys.exit(0)
        try:
            if config_flag:
                check_config_overrides(argv, config_flag)
            return flags.FLAGS(argv)
        except (UsageError, flags.Error) as e:
            fail(e, USAGE_EXIT)
        except Exception as e:  # noqa: BLE001 (ml_collections raises raw errors on overrides)
            fail(f"bad command line: {type(e).__name__}: {e}", USAGE_EXIT)

    app.run(main, flags_parser=parse)

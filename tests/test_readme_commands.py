"""The README's example commands run as written, from a fresh copy of the repository.

The commands are read from README.md at test time: every ```sh / ```bash block under the headings
"Main jobs", "Convert a model" and "Beyond mean pooling" (the converter's `--method=similar+fit_o`
example), in README order, since later commands use the workdirs earlier ones create. Within a
block, backslash-continued lines are joined and `#` comment lines skipped (as bash does: a comment
never continues onto the next line); a trailing `# ...` is a comment too (shlex). A leading
`.venv/bin/python` or `python` becomes this interpreter.

Excluded, by the program they run: `experiments/reproduce.py` and `python -m gqa_uptrain.bench`.
They are measurements that take minutes (covered by tests/test_reproduce.py and tests/test_bench.py);
everything else in those blocks is run.

The copy holds exactly the tracked files (`git ls-files`), is imported through PYTHONPATH (the
venv's editable install points at the original checkout) and runs offline with its caches inside
the temporary folder.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
SECTIONS = ("Main jobs", "Convert a model", "Beyond mean pooling")  # heading prefixes (## level)
EXCLUDED_PROGRAMS = ("experiments/reproduce.py", "gqa_uptrain.bench")  # measurements, minutes long
SHELL_LANGS = ("sh", "bash", "shell", "console")
PER_COMMAND_TIMEOUT_S = 300


def _section_blocks(text: str, prefix: str) -> list[str]:
    """The shell code blocks of the `## ` section whose title starts with `prefix`."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("## ")
              and line[3:].strip().startswith(prefix)]
    assert len(starts) == 1, f"README.md: expected one '## {prefix}...' heading, found {len(starts)}"
    blocks, block, lang, i = [], None, None, starts[0] + 1
    while i < len(lines) and not (block is None and re.match(r"#{1,2} ", lines[i])):
        line = lines[i]
        if block is None and line.startswith("```"):
            lang, block = line[3:].strip(), []
        elif block is not None and line.startswith("```"):
            if lang in SHELL_LANGS:
                blocks.append("\n".join(block))
            block = None
        elif block is not None:
            block.append(line)
        i += 1
    return blocks


def _commands(block: str) -> list[str]:
    """Commands of a shell block: continuations joined, comment lines and blank lines skipped."""
    commands, current = [], None
    for line in block.splitlines():
        stripped = line.strip()
        if current is None and (not stripped or stripped.startswith("#")):
            continue
        current = stripped if current is None else f"{current} {stripped}"
        if current.endswith("\\"):
            current = current[:-1].rstrip()
        else:
            commands.append(current)
            current = None
    assert current is None, f"README.md: a command ends in a backslash continuation: {current}"
    return commands


def _argv(command: str) -> list[str]:
    argv = shlex.split(command, comments=True)
    if argv and argv[0] in (".venv/bin/python", "python", "python3"):
        argv[0] = sys.executable
    return argv


def _is_excluded(argv: list[str]) -> bool:
    return any(program in argv[:3] for program in EXCLUDED_PROGRAMS)


def readme_commands() -> dict[str, tuple[list[list[str]], list[list[str]]]]:
    """{section: (commands to run, excluded commands)}, each command an argv."""
    text = README.read_text()
    out = {}
    for prefix in SECTIONS:
        run, excluded = [], []
        for block in _section_blocks(text, prefix):
            for command in _commands(block):
                argv = _argv(command)
                (excluded if _is_excluded(argv) else run).append(argv)
        out[prefix] = (run, excluded)
    return out


def _copy_tracked_files(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if not src.is_file():  # tracked but deleted in the working tree, or a submodule
            continue
        target = dst / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def test_readme_commands_are_found():
    commands = readme_commands()
    main_run, main_excluded = commands["Main jobs"]
    # pretrain, convert, uptrain, evaluate; reproduce + the four bench lines left out
    assert len(main_run) >= 4, main_run
    assert len(main_excluded) >= 5, main_excluded
    modules = [argv[2] for argv in main_run if argv[1] == "-m"]
    for module in ("gqa_uptrain.train", "gqa_uptrain.convert", "gqa_uptrain.evaluate"):
        assert module in modules, (module, main_run)
    convert_run = commands["Convert a model"][0] + commands["Beyond mean pooling"][0]
    assert len(convert_run) >= 5, convert_run
    for argv in main_run + convert_run:
        assert argv[0] == sys.executable, f"a README command that is not a python one: {argv}"


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    root = tmp_path / "repo"
    _copy_tracked_files(root)
    env = dict(os.environ)
    env.update(PYTHONPATH=str(root), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"),
               XDG_CACHE_HOME=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    # The copy's package is the one the commands import (not the editable install's checkout).
    where = subprocess.run([sys.executable, "-c", "import gqa_uptrain; print(gqa_uptrain.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).resolve().is_relative_to(root.resolve()), where.stdout
    commands = readme_commands()
    todo = [argv for prefix in SECTIONS for argv in commands[prefix][0]]
    assert len(todo) >= 9, todo
    times = []
    for argv in todo:
        start = time.perf_counter()
        proc = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True,
                              timeout=PER_COMMAND_TIMEOUT_S)
        times.append((time.perf_counter() - start, shlex.join(argv[1:])))
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-25:])
            pytest.fail(f"README command failed (exit {proc.returncode}), run in {root}:\n"
                        f"  {shlex.join(['python'] + argv[1:])}\nlast lines of stderr:\n{tail}")
    print("\n".join(f"{seconds:6.1f} s  {command}" for seconds, command in times))

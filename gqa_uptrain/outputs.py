"""Where outputs are written: refused destinations, atomic folders, stale temporaries of killed runs.

  * check_output_path: refuses an output that is the input, lies inside it, contains it, or exists
    (without overwrite), before anything is written.
  * atomic_folder: a temporary folder beside the output, renamed into place when complete and
    deleted on any error; the mode save_pretrained's would have (0o777 & ~umask). Its name carries
    the host and pid, so that the next run for the same output removes what a killed one left.
  * write_json: the JSON files of an output (indented, sorted keys, a final newline).
Imports neither jax nor torch (the streaming HF -> HF conversion uses it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from typing import Any, Iterator


def check_output_path(input_path: str, output_path: str, overwrite: bool) -> None:
    """Refuses output == input, output inside input, an existing output without `overwrite`, and
    (with overwrite) an output that contains the input, which replacing would delete."""
    src, dst = os.path.realpath(input_path), os.path.realpath(output_path)
    if src == dst:
        raise ValueError(f"output {output_path} is the input: write the converted model elsewhere")
    if dst.startswith(src + os.sep):
        raise ValueError(f"output {output_path} is inside the input {input_path}")
    if os.path.lexists(output_path):
        if not overwrite:
            raise ValueError(f"output {output_path} already exists (pass --overwrite to replace it)")
        if src.startswith(dst + os.sep):
            raise ValueError(f"output {output_path} contains the input {input_path}; "
                             "replacing it would delete the input")


def _umask() -> int:
    """The process's umask, read without changing it where /proc allows (os.umask only sets)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_prefix(name: str) -> str:
    """atomic_folder's temporary name for `name`: the owner's host and pid are in it, so that a
    later run can tell a dead conversion's leftover from a live one's (_remove_stale_temps)."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"
    return f".{name}.tmp-{host}-{os.getpid()}-"


def _remove_stale_temps(parent: str, name: str) -> list[str]:
    """Deletes the temporary folders that atomic_folder runs for `name` left in `parent` when they
    were killed (kill -9, power loss): only names of _temp_prefix's form, only of this host, only
    when that pid is no longer alive. Anything else (other names, other hosts, live pids, the
    mkdtemp names of older versions) is left alone. Returns the removed paths."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"
    pattern = re.compile(re.escape(f".{name}.tmp-{host}-") + r"(\d+)-[A-Za-z0-9_]+")
    removed = []
    for entry in os.listdir(parent):
        m = pattern.fullmatch(entry)
        path = os.path.join(parent, entry)
        if m is None or not os.path.isdir(path) or os.path.islink(path):
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            continue  # alive (a concurrent conversion to the same destination)
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):  # alive under another user / not a pid
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_folder(output: str, overwrite: bool = False) -> Iterator[str]:
    """Yields a fresh temporary folder beside `output`; on success it is renamed to `output`
    (replacing an existing one only with `overwrite`), on any error it is deleted, together with
    any parent folders this created. The folder gets the mode save_pretrained's would have
    (0o777 & ~umask), not mkdtemp's 0o700. Temporary folders for the same `output` left by killed
    runs are removed first (_remove_stale_temps)."""
    output = os.path.abspath(output)
    parent, name = os.path.split(output)
    created = parent
    while not os.path.exists(os.path.dirname(created)):
        created = os.path.dirname(created)
    created = None if os.path.exists(parent) else created
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temps(parent, name)
    tmp = tempfile.mkdtemp(prefix=_temp_prefix(name), dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if os.path.lexists(output):
            if not overwrite:
                raise ValueError(f"output {output} already exists (pass --overwrite to replace it)")
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rename(output, os.path.join(old, name))
            os.rename(tmp, output)
            shutil.rmtree(old)
        else:
            os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")

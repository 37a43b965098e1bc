"""Which kind of model a path holds: the one detection rule every entry point uses.

    formats.detect(path) -> 'checkpoint' | 'hf' | 'gguf'

  checkpoint  this project's checkpoint (meta.json + params/, checkpoints.py) or a training workdir
              (checkpoints/<step>/: its latest complete checkpoint is the model)
  hf          a Hugging Face folder: config.json + safetensors weights (hf.py)
  gguf        a GGUF file (llama.cpp's format), a file whose name ends in .gguf (gguf_io.py)

The rules are tried in FORMATS' order; a new format joins by adding one entry.
A project checkpoint or workdir never holds a config.json (the trainer writes train_config.json
for that reason), so the order matters only for a folder somebody built by hand with both.
This module reads file names only: no jax, so the streaming HF -> HF converter stays light.
"""

from __future__ import annotations

import os
from typing import Callable

HF_CONFIG_FILE = "config.json"
GGUF_SUFFIX = ".gguf"
META_FILE = "meta.json"  # a checkpoint's own description (checkpoints.Meta)
PARAMS_DIR = "params"
CHECKPOINTS_DIR = "checkpoints"  # a training workdir's checkpoints/<step>/


class FormatError(ValueError):
    """A path that holds no model of a known format."""


def is_checkpoint(path: str) -> bool:
    """A complete checkpoint directory: meta.json and params/."""
    return (os.path.isfile(os.path.join(path, META_FILE))
            and os.path.isdir(os.path.join(path, PARAMS_DIR)))


def _is_checkpoint_or_workdir(path: str) -> bool:
    # meta.json alone is enough to call it a checkpoint: a damaged one (no params/) then gets the
    # checkpoint reader's specific error rather than "unknown format".
    return (os.path.isdir(path) and (os.path.isfile(os.path.join(path, META_FILE))
                                     or os.path.isdir(os.path.join(path, CHECKPOINTS_DIR))))


def _is_hf_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, HF_CONFIG_FILE))


def _is_gguf_file(path: str) -> bool:
    return os.path.isfile(path) and path.endswith(GGUF_SUFFIX)


# name -> predicate, in the order they are tried.
FORMATS: dict[str, Callable[[str], bool]] = {
    "checkpoint": _is_checkpoint_or_workdir,
    "hf": _is_hf_folder,
    "gguf": _is_gguf_file,
}


def detect(path: str, what: str = "input") -> str:
    """The format of the model at `path` (a FORMATS key); FormatError naming `what` (the flag or
    key that gave the path) and what is missing."""
    if not os.path.exists(path):
        raise FormatError(f"{what} {path} does not exist")
    for name, matches in FORMATS.items():
        if matches(path):
            return name
    if not os.path.isdir(path):
        raise FormatError(f"{what} {path} is not a folder (a checkpoint, a training workdir or a "
                          f"Hugging Face folder) or a {GGUF_SUFFIX} file")
    raise FormatError(f"{what} {path} has no {HF_CONFIG_FILE} (not a Hugging Face folder) and is "
                      f"not a checkpoint ({META_FILE} + {PARAMS_DIR}/) or workdir "
                      f"({CHECKPOINTS_DIR}/) of this project")


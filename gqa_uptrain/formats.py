"""Which kind of model a path holds: the one detection rule every entry point uses.

    formats.detect(path) -> 'checkpoint' | 'hf' | 'gguf'

  checkpoint  this project's checkpoint (meta.json + params/, checkpoints.py; format version 2 also
              orbax's commit_success.txt) or a training workdir (checkpoints/<step>/: its
              latest complete checkpoint is the model)
  hf          a Hugging Face folder: config.json + safetensors weights (hf.py)
  gguf        a GGUF file (llama.cpp's format), a file whose name ends in .gguf (gguf_io.py)

The rules are tried in FORMATS' order; a new format joins by adding one entry.
A project checkpoint or workdir never holds a config.json (the trainer writes train_config.json
for that reason), so the order matters only for a folder somebody built by hand with both.
This module reads file names, and a checkpoint's meta.json for its format version: no jax, so the
streaming HF -> HF converter stays light.
"""

from __future__ import annotations

import json
import os
from typing import Callable

HF_CONFIG_FILE = "config.json"
GGUF_SUFFIX = ".gguf"
META_FILE = "meta.json"  # a checkpoint's own description (checkpoints.Meta)
PARAMS_DIR = "params"
OPT_STATE_DIR = "opt_state"
TOKENIZER_FILE = "tokenizer.json"  # a checkpoint's own tokenizer
CHECKPOINTS_DIR = "checkpoints"  # a training workdir's checkpoints/<step>/
# orbax's commit mark (atomicity.COMMIT_SUCCESS_FILE), written last into a version-2 checkpoint.
COMMIT_FILE = "commit_success.txt"
READ_VERSIONS = (1, 2)  # the checkpoint format versions this code reads (checkpoints.py)


class FormatError(ValueError):
    """A path that holds no model of a known format."""


def is_checkpoint(path: str) -> bool:
    """A complete checkpoint directory: meta.json and params/, and orbax's commit mark unless its
    meta.json says version 1 (renamed into place when complete, it has no mark). A version-2
    directory is written in place, so without the mark it is a save in progress or killed; its
    meta.json is only read when the mark is missing."""
    if not (os.path.isfile(os.path.join(path, META_FILE))
            and os.path.isdir(os.path.join(path, PARAMS_DIR))):
        return False
    if os.path.isfile(os.path.join(path, COMMIT_FILE)):
        return True
    try:
        with open(os.path.join(path, META_FILE)) as f:
            return json.load(f).get("format_version") == 1
    except (OSError, ValueError):  # half-written by a killed save
        return False


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


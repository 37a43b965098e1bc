"""The checkpoint format shared by the converter and the trainer.

A checkpoint is a directory:
  meta.json           format version, ModelConfig, step, source run's step, data position,
                      provenance
  params/             orbax arrays of the flat {dotted name: array} params dict
  opt_state/          optional, orbax arrays of the optimizer state flattened to {key path: array}
  tokenizer.json      optional, the model's own tokenizer (save(tokenizer_file=...); its sha256 is
                      in meta.json's provenance): see tokenizer_spec / default_tokenizer
  _CHECKPOINT_METADATA, commit_success.txt   orbax's step record and commit mark (version 2)

Format version 2 (this code writes it; it reads 1 and 2): the directory is written in place
through orbax's own commit protocol (AtomicityMode.COMMIT_FILE, the one orbax uses on object
stores, used here on every filesystem so that local tests exercise it): every file is written
first, commit_success.txt last, and a version-2 directory without it is incomplete, never a
checkpoint (formats.is_checkpoint). No step relies on os.rename. meta.json and tokenizer.json are
written by process 0 inside the same save, before the commit (_ParamsHandler). Version 1 had the
same names without orbax's two files at the top; it was written to a temporary sibling and
renamed into place, so a version-1 directory that has meta.json and params/ is complete.

Restores are strict: every stored name and shape is compared with what the model (or the optimizer
state) expects before any array is read, and a missing or unexpected name or a shape mismatch
raises naming it (orbax would otherwise happily do a partial restore, orbax#2972).

A training workdir keeps its checkpoints as WORKDIR/checkpoints/<step>/ in this same format,
through orbax's CheckpointManager (run_checkpoints.py: async saves, keep policy, cadence).

Multi-host (jax.distributed): every process calls save (orbax writes each process's shards and
holds the barriers); process 0 alone writes meta.json, tokenizer.json and the commit mark. The
filesystem must be shared between the processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import options as ocp_options

# The layout's file names, and the complete-checkpoint test, live with the one format rule.
from gqa_uptrain.formats import (CHECKPOINTS_DIR, COMMIT_FILE, META_FILE, OPT_STATE_DIR,
                                 PARAMS_DIR, READ_VERSIONS, TOKENIZER_FILE, is_checkpoint)
from gqa_uptrain.model import ModelConfig, abstract_params, check_params_match

FORMAT_VERSION = 2  # what save writes; READ_VERSIONS (1, 2) are read
# A model whose vocabulary is this size and has no Hugging Face ancestor was trained here on bytes
# (ids 0..255, the rest unused): the one rule for "byte-level without a record" (default_tokenizer).
BYTE_VOCAB_SIZES = range(256, 513)


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or does not match what it is restored into."""


@dataclasses.dataclass
class Meta:
    """What a checkpoint says about itself (stored as meta.json)."""

    model_config: ModelConfig
    step: int = 0
    # Steps of the run this one started from (the MHA pretraining run, for an uptrained model);
    # uptraining for alpha x source_step reads it.
    source_step: int | None = None
    data_position: dict[str, Any] | None = None
    # e.g. {'converted_from': path, 'method': 'mean', 'seed': 0, 'num_kv_heads_before': 8}.
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["model_config"] = self.model_config.to_dict()
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Meta":
        d = json.loads(text)
        version = d.get("format_version")
        if version not in READ_VERSIONS:
            raise CheckpointError(f"checkpoint format_version={version}; this code reads "
                                  f"{', '.join(map(str, READ_VERSIONS))}")
        d["model_config"] = ModelConfig.from_dict(d["model_config"])
        return cls(**d)


def read_meta(path: str) -> Meta:
    """The Meta of a complete checkpoint; CheckpointError naming what is wrong: no meta.json +
    params/, a format version this code does not read, or a version-2 save never committed."""
    meta_file = os.path.join(path, META_FILE)
    if not (os.path.isfile(meta_file) and os.path.isdir(os.path.join(path, PARAMS_DIR))):
        raise CheckpointError(f"{path} is not a checkpoint of this project (no {META_FILE} + "
                              f"{PARAMS_DIR}/)")
    try:
        with open(meta_file) as f:
            meta = Meta.from_json(f.read())
    except ValueError as e:  # CheckpointError (the version) included; json's errors say "line"
        if isinstance(e, CheckpointError):
            raise
        meta = None
    if meta is None or not is_checkpoint(path):
        raise CheckpointError(f"{path} is an incomplete checkpoint (no {COMMIT_FILE}: a save "
                              "killed or still being written)")
    return meta


def flatten_tree(tree: Any) -> dict[str, Any]:
    """{jax key path string: leaf} for any pytree (used for the optimizer state)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def _unflatten_like(target: Any, flat: dict[str, Any]) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    return jax.tree_util.tree_unflatten(treedef,
                                        [flat[jax.tree_util.keystr(p)] for p, _ in leaves])


# ----------------------------------------------------------------------------- writing (orbax)

# orbax's commit protocol for object stores (commit_success.txt written last), on every filesystem.
ATOMICITY = ocp_options.AtomicityOptions(mode=ocp_options.AtomicityMode.COMMIT_FILE)
# Directories are made before a save returns, so _ParamsHandler can write into the step directory
# while the arrays are still being written in the background.
ASYNC_OPTIONS = ocp.AsyncOptions(create_directories_asynchronously=False)


@dataclasses.dataclass
class ParamsSave(ocp.args.CheckpointArgs):
    """The params item of a save: the flat params dict, and the checkpoint's own files
    ({file name: bytes}, e.g. meta.json) that process 0 writes beside params/."""

    params: dict[str, Any]
    files: dict[str, bytes]


@dataclasses.dataclass
class ParamsRestore(ocp.args.CheckpointArgs):
    """Registered for symmetry only: restores read params/ through _restore_flat."""

    target: Any = None


class _ParamsHandler(ocp.StandardCheckpointHandler):
    """params/ as orbax's StandardCheckpointHandler writes it, plus the checkpoint's own files one
    level up (the step directory: the parent of the params item), written by process 0 before
    the save returns, hence before orbax's commit mark (meta.json must be inside the commit)."""

    async def async_save(self, directory, item=None, save_args=None, args=None):
        if jax.process_index() == 0:
            for name, data in args.files.items():
                (epath.Path(directory).parent / name).write_bytes(data)
        return await super().async_save(directory, args=ocp.args.StandardSave(args.params))


ocp.args.register_with_handler(_ParamsHandler, for_save=True)(ParamsSave)
ocp.args.register_with_handler(_ParamsHandler, for_restore=True)(ParamsRestore)


def item_handlers() -> dict[str, Any]:
    """The orbax handlers of a checkpoint's items (CheckpointManager(item_handlers=...))."""
    return {PARAMS_DIR: _ParamsHandler(), OPT_STATE_DIR: ocp.StandardCheckpointHandler()}


def save_args(params: dict[str, Any], meta: Meta, opt_state: Any = None, *,
              tokenizer_file: str | None = None) -> ocp.args.Composite:
    """The orbax Composite of a checkpoint (checked against meta's ModelConfig): params, meta.json
    (format FORMAT_VERSION), the optional optimizer state and tokenizer.json.

    tokenizer_file: a tokenizer.json to store in the checkpoint (as TOKENIZER_FILE); the saved
    provenance then records tokenizer='tokenizer.json' (the file inside this checkpoint), the
    sha256 of the bytes stored, and tokenizer_source (where it was read from, unless `meta`
    already names an earlier source).
    """
    check_params_match(abstract_params(meta.model_config), params, what="params to save")
    files = {}
    if tokenizer_file is not None:
        if not os.path.isfile(tokenizer_file):
            raise CheckpointError(f"tokenizer {tokenizer_file} is not a file")
        tokenizer_file = os.path.abspath(tokenizer_file)
        with open(tokenizer_file, "rb") as f:
            files[TOKENIZER_FILE] = f.read()  # the bytes hashed are the bytes stored
        provenance = dict(meta.provenance)
        provenance.setdefault("tokenizer_source", tokenizer_file)
        provenance.update(tokenizer=TOKENIZER_FILE,
                          tokenizer_sha256=hashlib.sha256(files[TOKENIZER_FILE]).hexdigest())
        meta = dataclasses.replace(meta, provenance=provenance)
    meta = dataclasses.replace(meta, format_version=FORMAT_VERSION)
    files[META_FILE] = meta.to_json().encode()
    items = {PARAMS_DIR: ParamsSave(params, files)}
    if opt_state is not None:
        items[OPT_STATE_DIR] = ocp.args.StandardSave(flatten_tree(opt_state))
    return ocp.args.Composite(**items)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(path: str, params: dict[str, Any], meta: Meta, opt_state: Any = None, *,
         overwrite: bool = False, tokenizer_file: str | None = None) -> None:
    """Writes a complete checkpoint at `path` through orbax's commit protocol (module docstring;
    blocking). tokenizer_file: see save_args. overwrite: an existing checkpoint is deleted first
    (the path is then absent or incomplete, never taken for a checkpoint, until the commit)."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise CheckpointError(f"{path} already exists")
    args = save_args(params, meta, opt_state, tokenizer_file=tokenizer_file)
    handler = ocp.CompositeCheckpointHandler(
        composite_options=ocp.CompositeOptions(atomicity_options=ATOMICITY,
                                               async_options=ASYNC_OPTIONS),
        **item_handlers())
    with ocp.Checkpointer(handler, atomicity_options=ATOMICITY) as ckptr:
        ckptr.save(path, args=args, force=overwrite)


# Items are read with orbax's handler itself, not a Checkpointer: a version-2 item directory has
# no step record of its own (the checkpoint's is one level up), which a Checkpointer warns about.
def _stored_shapes(directory: str) -> dict[str, tuple[tuple[int, ...], Any]]:
    handler = ocp.StandardCheckpointHandler()
    try:
        tree = handler.metadata(epath.Path(os.path.abspath(directory)))
    finally:
        handler.close()
    return {name: (tuple(m.shape), m.dtype) for name, m in tree.items()}


def _restore_flat(directory: str, expected: dict[str, Any], what: str,
                  shardings: dict[str, Any] | None) -> dict[str, Any]:
    # orbax reads no metadata from a relative path (item_metadata is None): always absolute.
    directory = os.path.abspath(directory)
    stored = _stored_shapes(directory)
    try:
        check_params_match(expected, {k: np.empty(s, dtype=bool) for k, (s, _) in stored.items()},
                           what=f"{what} in {directory}")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    target = {}
    for name, (shape, dtype) in stored.items():
        sharding = (shardings or {}).get(name) or jax.sharding.SingleDeviceSharding(
            jax.devices()[0])
        target[name] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    handler = ocp.StandardCheckpointHandler()
    try:
        return handler.restore(epath.Path(directory), args=ocp.args.StandardRestore(target))
    finally:
        handler.close()


def restore(path: str, *, expected_config: ModelConfig | None = None,
            opt_state_target: Any = None, param_shardings: dict[str, Any] | None = None):
    """Restores (params, meta, opt_state) from a checkpoint, strictly.

    expected_config: if given, must equal the stored ModelConfig (else CheckpointError naming the
      differing fields). opt_state_target: a pytree (arrays or ShapeDtypeStructs) giving the
      optimizer state's structure; when None the optimizer state is not read and None is returned.
    param_shardings: optional {name: jax.sharding.Sharding} to place params directly.
    """
    meta = read_meta(path)
    if expected_config is not None and expected_config != meta.model_config:
        a, b = expected_config.to_dict(), meta.model_config.to_dict()
        diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
        raise CheckpointError(f"{path}: model config differs from the expected one "
                              f"(field: (expected, stored)) {diff}")
    params = _restore_flat(os.path.join(path, PARAMS_DIR), abstract_params(meta.model_config),
                           "params", param_shardings)
    opt_state = None
    if opt_state_target is not None:
        opt_dir = os.path.join(path, OPT_STATE_DIR)
        if not os.path.isdir(opt_dir):
            raise CheckpointError(f"{path} holds no optimizer state")
        flat_target = flatten_tree(opt_state_target)
        shardings = {k: getattr(v, "sharding", None) for k, v in flat_target.items()}
        flat = _restore_flat(opt_dir, flat_target, "optimizer state", shardings)
        opt_state = _unflatten_like(opt_state_target, flat)
    return params, meta, opt_state


# ----------------------------------------------------------------------------- training workdirs


def step_dir(workdir: str, step: int) -> str:
    return os.path.join(workdir, CHECKPOINTS_DIR, str(step))


def list_steps(workdir: str) -> list[int]:
    """Steps with a complete checkpoint in workdir (formats.is_checkpoint: versions 1 and 2),
    ascending; a save still being written, or killed, is not listed."""
    root = os.path.join(workdir, CHECKPOINTS_DIR)
    if not os.path.isdir(root):
        return []
    return sorted(int(n) for n in os.listdir(root)
                  if n.isdigit() and is_checkpoint(os.path.join(root, n)))


def incomplete_steps(workdir: str) -> list[int]:
    """Steps whose directory exists without being a complete checkpoint: a version-2 save that
    is being written, or was killed before orbax's commit mark (never read, and cleared by the
    next run, run_checkpoints.clear_incomplete), ascending."""
    root = os.path.join(workdir, CHECKPOINTS_DIR)
    if not os.path.isdir(root):
        return []
    return sorted(int(n) for n in os.listdir(root)
                  if n.isdigit() and os.path.isdir(os.path.join(root, n))
                  and not is_checkpoint(os.path.join(root, n)))


def latest_checkpoint(workdir: str) -> str | None:
    steps = list_steps(workdir)
    return step_dir(workdir, steps[-1]) if steps else None


def resolve(path: str) -> str:
    """A checkpoint directory, or a workdir (-> its latest complete checkpoint); absolute."""
    path = os.path.abspath(path)
    if is_checkpoint(path):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path} is neither a checkpoint nor a workdir with checkpoints")
    return latest


def save_step(workdir: str, params, meta: Meta, opt_state=None, keep: int | None = None, *,
              tokenizer_file: str | None = None) -> str:
    """Saves WORKDIR/checkpoints/<meta.step> through the workdir's CheckpointManager (blocking;
    tokenizer_file: see save_args), keeping the newest `keep` (None: all)."""
    from gqa_uptrain import run_checkpoints  # noqa: PLC0415 (it builds on this module)

    with run_checkpoints.RunCheckpoints(workdir, keep=keep) as manager:
        manager.save(meta.step, params, meta, opt_state, tokenizer_file=tokenizer_file)
    return step_dir(workdir, meta.step)


# ----------------------------------------------------------------------------- tokenizers


def hf_base_config(provenance: dict[str, Any], depth: int = 5) -> dict[str, Any] | None:
    """The Hugging Face config.json a checkpoint descends from, if it can still be found: its own
    provenance['hf_config'], else the HF folder or checkpoint its training run started from
    (train.py's provenance['init']), followed up to `depth` checkpoints back."""
    from gqa_uptrain import hf  # noqa: PLC0415

    if provenance.get("hf_config"):
        return provenance["hf_config"]
    init = provenance.get("init") or {}
    try:
        if init.get("hf_folder") and os.path.isfile(os.path.join(init["hf_folder"], hf.CONFIG_FILE)):
            return hf.read_hf_config(init["hf_folder"])
        if init.get("checkpoint") and depth > 0 and is_checkpoint(init["checkpoint"]):
            return hf_base_config(read_meta(init["checkpoint"]).provenance, depth - 1)
    except ValueError:  # an ancestor that no longer reads: as if there were none
        return None
    return None


def tokenizer_spec(path: str, meta: Meta | None = None) -> str | None:
    """The tokenizer a checkpoint directory records: its own tokenizer.json (absolute path; its
    sha256 is checked against meta.json's), else its provenance['tokenizer'] as older checkpoints
    record it ('byte' or a tokenizer.json path, which may no longer exist), else None."""
    meta = meta or read_meta(path)
    own = os.path.join(os.path.abspath(path), TOKENIZER_FILE)
    recorded = meta.provenance.get("tokenizer")
    if os.path.isfile(own):
        want = meta.provenance.get("tokenizer_sha256")
        if want and file_sha256(own) != want:
            raise CheckpointError(f"{own} does not match the sha256 recorded in {META_FILE}: "
                                  "the checkpoint's tokenizer was modified")
        return own
    if recorded == TOKENIZER_FILE:  # recorded as its own file, which is gone
        raise CheckpointError(f"{path} records its own {TOKENIZER_FILE}, which is missing")
    return recorded or None


def default_tokenizer(path: str, meta: Meta | None = None) -> str | None:
    """The tokenizer a checkpoint is used with when none is given ('auto'): tokenizer_spec when it
    exists ('byte', or a tokenizer.json that is still there); byte-level for a checkpoint recording
    nothing whose vocabulary is byte-sized (BYTE_VOCAB_SIZES) and that has no Hugging Face
    ancestor (hf_base_config), i.e. a model trained here on bytes; else None. Never byte-level for
    any other model: its ids would be read as bytes, silently."""
    meta = meta or read_meta(path)
    spec = tokenizer_spec(path, meta)
    if spec is not None:
        return spec if spec == "byte" or os.path.isfile(spec) else None
    if (meta.model_config.vocab_size in BYTE_VOCAB_SIZES
            and hf_base_config(meta.provenance) is None):
        return "byte"
    return None


def no_tokenizer_message(path: str, meta: Meta, key: str) -> str:
    """Why default_tokenizer found none, ending with the flag or config key to set."""
    spec = tokenizer_spec(path, meta)
    why = (f"its recorded tokenizer {spec} is gone" if spec else
           f"it has no {TOKENIZER_FILE} and records none, and its vocabulary of "
           f"{meta.model_config.vocab_size} ids is not a byte-level model trained here")
    return f"cannot tell which tokenizer checkpoint {path} uses ({why}); set {key}"

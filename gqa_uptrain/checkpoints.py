"""The checkpoint format shared by the converter and the trainer.

A checkpoint is a directory:
  meta.json      format version, ModelConfig, step, source run's step, data position, provenance
  params/        orbax (StandardCheckpointer) of the flat {dotted name: array} params dict
  opt_state/     optional, orbax of the optimizer state flattened to {key path: array}
  tokenizer.json optional, the model's own tokenizer (copied in by save(tokenizer_file=...); its
                 sha256 is in meta.json's provenance): see tokenizer_spec / default_tokenizer

It is written into a temporary sibling directory and renamed into place only when complete, so an
interrupted save never leaves something that looks like a checkpoint. Restores are strict: every
stored name and shape is compared with what the model (or the optimizer state) expects before any
array is read, and a missing or unexpected name or a shape mismatch raises naming it (orbax would
otherwise happily do a partial restore, orbax#2972).

A training workdir keeps its checkpoints as WORKDIR/checkpoints/<step>/ in this same format.

Multi-host (jax.distributed): every process calls save/save_step (orbax writes each process's
shards); only process 0 touches the directory structure (clearing the temporary dir, meta.json,
the renames, deleting old steps), with barriers between the phases so no process sees a half-made
state. The filesystem must be shared between the processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

# The layout's file names, and the complete-checkpoint test, live with the one format rule.
from gqa_uptrain.formats import CHECKPOINTS_DIR, META_FILE, PARAMS_DIR, is_checkpoint
from gqa_uptrain.model import ModelConfig, abstract_params, check_params_match

FORMAT_VERSION = 1
TOKENIZER_FILE = "tokenizer.json"
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
        if version != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint format_version={version}; this code reads "
                                  f"{FORMAT_VERSION}")
        d["model_config"] = ModelConfig.from_dict(d["model_config"])
        return cls(**d)


def read_meta(path: str) -> Meta:
    if not is_checkpoint(path):
        raise CheckpointError(f"{path} is not a checkpoint of this project (no {META_FILE} + "
                              f"{PARAMS_DIR}/)")
    with open(os.path.join(path, META_FILE)) as f:
        return Meta.from_json(f.read())


def _is_primary() -> bool:
    return jax.process_index() == 0


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(f"gqa_uptrain.checkpoints.{name}")


def flatten_tree(tree: Any) -> dict[str, Any]:
    """{jax key path string: leaf} for any pytree (used for the optimizer state)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def _unflatten_like(target: Any, flat: dict[str, Any]) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    return jax.tree_util.tree_unflatten(treedef,
                                        [flat[jax.tree_util.keystr(p)] for p, _ in leaves])


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(path: str, params: dict[str, Any], meta: Meta, opt_state: Any = None, *,
         overwrite: bool = False, tokenizer_file: str | None = None) -> None:
    """Writes a complete checkpoint at `path` (atomically: temp sibling, then rename).

    tokenizer_file: a tokenizer.json to copy into the checkpoint (as TOKENIZER_FILE, inside the
    temporary directory, so it arrives with the rest); the saved provenance then records
    tokenizer='tokenizer.json' (the file inside this checkpoint), its tokenizer_sha256, and
    tokenizer_source (where it was copied from, unless `meta` already names an earlier source).
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise CheckpointError(f"{path} already exists")
    check_params_match(abstract_params(meta.model_config), params, what="params to save")
    if tokenizer_file is not None:
        if not os.path.isfile(tokenizer_file):
            raise CheckpointError(f"tokenizer {tokenizer_file} is not a file")
        tokenizer_file = os.path.abspath(tokenizer_file)
        provenance = dict(meta.provenance)
        provenance.setdefault("tokenizer_source", tokenizer_file)
        provenance.update(tokenizer=TOKENIZER_FILE, tokenizer_sha256=file_sha256(tokenizer_file))
        meta = dataclasses.replace(meta, provenance=provenance)
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    # A fixed temporary name (not mkdtemp): a save killed mid-write leaves this behind, and the
    # next save to the same path clears it. It never looks like a checkpoint (see list_steps).
    tmp = os.path.join(parent, f".{name}.tmp")
    if _is_primary():
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier(f"clear:{path}")
    try:
        ckptr = ocp.StandardCheckpointer()
        # orbax refuses to write into an existing directory: give it fresh subpaths.
        ckptr.save(os.path.join(tmp, PARAMS_DIR), params)
        if opt_state is not None:
            ckptr.save(os.path.join(tmp, "opt_state"), flatten_tree(opt_state))
        ckptr.wait_until_finished()
        _barrier(f"written:{path}")
        if _is_primary():
            if tokenizer_file is not None:
                shutil.copyfile(tokenizer_file, os.path.join(tmp, TOKENIZER_FILE))
                if file_sha256(os.path.join(tmp, TOKENIZER_FILE)) != meta.provenance[
                        "tokenizer_sha256"]:
                    raise CheckpointError(f"tokenizer {tokenizer_file} changed while it was "
                                          "being copied")
            with open(os.path.join(tmp, META_FILE), "w") as f:
                f.write(meta.to_json())
            if os.path.exists(path):
                # Move the old one aside first so that `path` is, at every moment, absent or
                # complete.
                old = os.path.join(parent, f".{name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.rename(path, old)
                os.rename(tmp, path)
                shutil.rmtree(old)
            else:
                os.rename(tmp, path)
        _barrier(f"renamed:{path}")
    except BaseException:
        if _is_primary():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _stored_shapes(directory: str) -> dict[str, tuple[tuple[int, ...], Any]]:
    tree = ocp.StandardCheckpointer().metadata(directory).item_metadata.tree
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
    return ocp.StandardCheckpointer().restore(directory, target)


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
        opt_dir = os.path.join(path, "opt_state")
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
    """Steps with a complete checkpoint in workdir, ascending (temporary dirs are not listed)."""
    root = os.path.join(workdir, CHECKPOINTS_DIR)
    if not os.path.isdir(root):
        return []
    return sorted(int(n) for n in os.listdir(root)
                  if n.isdigit() and is_checkpoint(os.path.join(root, n)))


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
    """Saves WORKDIR/checkpoints/<meta.step> (with a copy of tokenizer_file, see save), then
    deletes all but the newest `keep`."""
    path = step_dir(workdir, meta.step)
    save(path, params, meta, opt_state, overwrite=True, tokenizer_file=tokenizer_file)
    if keep is not None and _is_primary():
        for old in list_steps(workdir)[:-keep]:
            shutil.rmtree(step_dir(workdir, old), ignore_errors=True)
    _barrier(f"pruned:{path}")
    return path


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

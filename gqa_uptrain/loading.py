"""One way in: `load` a model from any format, `convert` it in memory to G KV heads.

    source = loading.inspect(path)              # what it is, without reading an array
    params, config, source = loading.load(path)  # ... and its params
    params, config, provenance = loading.convert(params, config, G, "mean")

Used by train (init_checkpoint), evaluate, convert (every path but the streaming HF -> HF one,
which never holds more than one tensor: hf_stream.convert_hf_folder) and experiments/suite.py.
`path` is anything formats.detect knows: this project's checkpoint or training workdir (its
latest checkpoint), a Hugging Face folder, or a llama GGUF file (gguf_io.py: dequantized to float32).

Keyword arguments are where later needs plug in without touching the callers: `shardings` places
the params (a checkpoint restores straight into them); `param_dtype` casts them to a run's master
weight dtype (precision.py: the trainer's policy, for every format alike); new formats are one entry
in formats.FORMATS plus one reader below.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from gqa_uptrain import formats, hf, merging, pooling
from gqa_uptrain.hf_config import model_config_from_hf


@dataclasses.dataclass(frozen=True)
class CalibrationOptions:
    """Where the calibration rows of 'similar' / 'fit' / 'fit_o' come from (calibration_rows).

    data: 'stdlib' or comma-separated globs of local text/jsonl/parquet files (their train split);
    tokenizer: 'auto' (the model's own: Source.tokenizer), 'byte', or a tokenizer.json path.
    """

    data: str = "stdlib"
    num_tokens: int = 16384
    seq_len: int = 256
    tokenizer: str = "auto"

    def __post_init__(self):
        if self.seq_len < 1 or self.num_tokens < self.seq_len:
            raise ValueError(f"calibration needs seq_len >= 1 and num_tokens >= seq_len; got "
                             f"--calib_tokens={self.num_tokens} --calib_seq_len={self.seq_len}")


@dataclasses.dataclass(frozen=True)
class Source:
    """Facts about a model on disk, all read without its arrays.

    format: a formats.FORMATS key. path: absolute; a workdir is resolved to its latest checkpoint.
    config: its ModelConfig. tokenizer: its own tokenizer spec ('byte' or a tokenizer.json path;
    checkpoints.default_tokenizer for a checkpoint, the folder's tokenizer.json for HF), None when
    it has none. step: a checkpoint's step (None for HF). source_step: the training steps behind it
    (a converted or uptrained checkpoint's recorded source step, else its step; None for HF).
    meta: a checkpoint's checkpoints.Meta. hf_config: an HF folder's config.json (for a GGUF file,
    the config.json its metadata describes; its tokenizer is None: its vocabulary becomes a
    tokenizer.json only when the converter writes one, gguf_io.build_tokenizer).
    """

    format: str
    path: str
    config: Any
    tokenizer: str | None
    step: int | None = None
    source_step: int | None = None
    meta: Any = None
    hf_config: dict[str, Any] | None = None

    @property
    def provenance(self) -> dict[str, Any]:
        return self.meta.provenance if self.meta is not None else {}

    def require_tokenizer(self, key: str) -> str:
        """The model's own tokenizer, or ValueError ending with `key`, the flag or config key to
        set: a model is never given the byte tokenizer silently."""
        if self.tokenizer is not None:
            return self.tokenizer
        if self.format == "hf":
            raise ValueError(f"{self.path} has no tokenizer.json; set {key}")
        if self.format == "gguf":
            raise ValueError(f"{self.path} is a GGUF file, whose vocabulary is no tokenizer.json: "
                             "convert it first (python -m gqa_uptrain.convert --input=FILE.gguf "
                             f"--output=FOLDER writes one) or set {key}")
        from gqa_uptrain import checkpoints  # noqa: PLC0415 (jax)

        raise ValueError(checkpoints.no_tokenizer_message(self.path, self.meta, key))


def inspect(path: str, what: str = "input") -> Source:
    """The facts of the model at `path` (Source) without reading an array. `what` names the flag or
    key `path` came from, in errors."""
    kind = formats.detect(path, what)
    if kind == "hf":
        hf_config = hf.read_hf_config(path)
        return Source(format="hf", path=os.path.abspath(path),
                      config=model_config_from_hf(hf_config),
                      tokenizer=hf.tokenizer_path(os.path.abspath(path)), hf_config=hf_config)
    if kind == "gguf":
        from gqa_uptrain import gguf_io  # noqa: PLC0415

        hf_config = gguf_io.read_config(path)
        return Source(format="gguf", path=os.path.abspath(path),
                      config=model_config_from_hf(hf_config), tokenizer=None, hf_config=hf_config)
    from gqa_uptrain import checkpoints  # noqa: PLC0415 (jax: only on this path)

    resolved = checkpoints.resolve(path)
    meta = checkpoints.read_meta(resolved)
    return Source(format="checkpoint", path=resolved, config=meta.model_config,
                  tokenizer=checkpoints.default_tokenizer(resolved, meta), step=meta.step,
                  source_step=meta.source_step if meta.source_step is not None else meta.step,
                  meta=meta)


def load(path: str | Source, *, what: str = "input", shardings: dict[str, Any] | None = None,
         param_dtype: str | None = None) -> tuple[dict[str, Any], Any, Source]:
    """(params, ModelConfig, Source) of the model at `path` (or of an inspect() result, which a
    caller that checked the facts first passes so that they are not read twice).

    params: the flat {name: array} dict of model.py; numpy arrays for a Hugging Face folder or a
    GGUF file (float32, dequantized), jax arrays for a checkpoint (on the default device unless
    `shardings`, {name: Sharding}, says where: a checkpoint is restored straight into them, HF
    arrays are put there). param_dtype: cast every array to it (and say so in the returned
    ModelConfig's param_dtype); None keeps the stored dtypes.
    """
    source = path if isinstance(path, Source) else inspect(path, what)
    params, config, source = _load(source, shardings)
    if param_dtype is not None:
        import jax.numpy as jnp  # noqa: PLC0415 (jax; its dtype names cover bfloat16 for numpy)

        dtype = jnp.dtype(param_dtype)
        params = {k: v.astype(dtype) for k, v in params.items()}
        config = config.replace(param_dtype=param_dtype)
    return params, config, source


def _load(source: Source, shardings) -> tuple[dict[str, Any], Any, Source]:
    if source.format == "hf":
        params, _ = hf.load_hf_model(source.path)
    elif source.format == "gguf":
        from gqa_uptrain import gguf_io  # noqa: PLC0415

        params, _ = gguf_io.load_gguf_model(source.path)
    if source.format in ("hf", "gguf"):  # host arrays
        if shardings is not None:
            from gqa_uptrain import sharding  # noqa: PLC0415 (jax)

            params = sharding.put_params(params, shardings)
        return params, source.config, source
    from gqa_uptrain import checkpoints  # noqa: PLC0415 (jax)

    try:
        params, _, _ = checkpoints.restore(source.path, param_shardings=shardings)
    except checkpoints.CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 (orbax's errors on a damaged checkpoint are varied)
        raise ValueError(f"cannot read checkpoint {source.path}: {type(e).__name__}: {e}") from None
    return params, source.config, source


def convert(params: dict[str, Any], config: Any, num_kv_heads: int, method: str = "mean", *,
            seed: int = 0, calibration: CalibrationOptions | None = None,
            tokenizer: str | None = None) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """Converts a model in memory to num_kv_heads KV heads with any method of merging.METHODS.

    Returns (params as numpy arrays, the new ModelConfig, provenance): pooling.conversion_record
    plus, for the methods that need more than pooling, what they did (calibration rows used,
    grouping cost, K objective; merging.py). `calibration` (default CalibrationOptions()) and
    `tokenizer` (the spec its rows are tokenized with, when calibration.tokenizer is 'auto') are
    read only by the methods that run the model on calibration data.
    """
    spec = merging.parse_method(method)
    record = pooling.conversion_record(method, seed, config.num_kv_heads, num_kv_heads)
    if spec.is_pooling:
        new_params, new_config = pooling.convert_params(params, config, num_kv_heads, method, seed)
        return new_params, new_config, record
    from gqa_uptrain import calibration as calibration_lib  # noqa: PLC0415 (jax)

    record["in_memory"] = True
    rows: dict[str, Any] = {}
    if spec.needs_calibration:
        calibration = calibration or CalibrationOptions()
        if calibration.tokenizer != "auto":
            tokenizer = calibration.tokenizer
        if tokenizer is None:
            raise ValueError(f"--method={method} needs a tokenizer for its calibration data "
                             "(pass --calib_tokenizer=byte or a tokenizer.json path)")
        rows = calibration_lib.calibration_rows(tokenizer, calibration.data,
                                                calibration.num_tokens, calibration.seq_len, seed)
        record["calibration"] = {"data": calibration.data,
                                 "num_tokens": int(rows["inputs"].size),
                                 "seq_len": calibration.seq_len, "tokenizer": tokenizer,
                                 "seed": seed, "split": "train"}
    report: dict[str, Any] = {}
    new_params, new_config = calibration_lib.convert_params_calibrated(
        params, config, num_kv_heads, method, seed=seed, report=report,
        calib_tokens=rows.get("inputs"), segment_ids=rows.get("segment_ids"),
        positions=rows.get("positions"))
    layers = report.get("layers", [])
    costs = [layer["group_cost"] for layer in layers if layer.get("group_cost")]
    if costs:
        record["group_cost"] = [sum(c["contiguous"] for c in costs),
                                sum(c["chosen"] for c in costs)]
        record["kv_perms"] = [layer["kv_perm"] for layer in layers]
    fits = [layer for layer in layers if "objective_fit" in layer]
    if fits:
        record["k_objective"] = [sum(layer["objective_mean"] for layer in fits),
                                 sum(layer["objective_fit"] for layer in fits)]
    if report.get("calibration_fallback"):
        record["calibration_fallback"] = report["calibration_fallback"]
    return new_params, new_config, record

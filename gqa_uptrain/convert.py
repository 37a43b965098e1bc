"""The converter's command line: MHA (or GQA) -> GQA with fewer KV heads, by pooling K/V heads.

  python -m gqa_uptrain.convert --input=PATH --output=PATH [--num_kv_heads=G] [--method=mean]
      [--seed=0] [--output_format=auto|hf|checkpoint] [--tokenizer=PATH] [--overwrite]
      [--calib_data=stdlib] [--calib_tokens=16384] [--calib_seq_len=256] [--calib_tokenizer=auto]

The input's format is detected: a Hugging Face folder (config.json + safetensors), this project's
checkpoint (meta.json + params/) or training workdir (its latest checkpoint), or a llama GGUF file
(FILE.gguf, gguf_io.py). The output has the input's format (a GGUF input: an HF folder) unless
--output_format says otherwise:
  hf -> hf                  streaming, one tensor in memory at a time, no jax/torch
                            (hf_stream.convert_hf_folder)
  checkpoint -> checkpoint  convert_checkpoint below
  hf -> checkpoint          import (hf.load_hf_model), pool, save: ready for uptraining
  checkpoint -> hf          restore, pool, export (hf.export_hf): ready for transformers
  gguf -> hf | checkpoint   import (gguf_io.load_gguf_model: dequantized to float32), pool, export
                            or save, with the tokenizer.json built from the file's vocabulary
--num_kv_heads defaults to the input's current count (read from its config.json / meta.json before
any array): nothing is pooled, so e.g. a checkpoint -> hf export with --method=mean is an exact copy.
It prints layers converted, KV heads, KV projection parameters and KV-cache bytes per token, each
before -> after. Bad input prints one line `error: ...` on stderr, exits 1 (2 for bad flags), and
leaves nothing behind: every output is written beside its destination and renamed when complete.

Methods (--method, merging.METHODS): mean, first, random, mean_normed (pooling.py) pool
contiguous groups one tensor at a time. `[GROUPING+]MERGE` methods start closer to MHA (merging.py): GROUPING 'similar'
(by K/V activations) or 'similar_weights' (by K/V weights) picks which heads share a KV head and
permutes the heads so that groups are contiguous; MERGE 'fit' merges each group so that attention
logits and outputs change least on calibration data, 'fit_o' also re-fits the output projections.
'similar', 'fit' and 'fit_o' read activations on calibration rows (--calib_*: the train split of
the stdlib source by default, deterministic under --seed) and, like 'similar_weights', load the
whole model into memory: no streaming.

This module is I/O only; the arithmetic lives in pooling.py / merging.py / calibration.py and the
name table in hf.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from gqa_uptrain import formats, heads, hf, hf_stream, loading, merging, outputs, pooling

FORMATS = ("hf", "checkpoint")
# Provenance entries a converted checkpoint keeps at the top level (see convert_checkpoint).
_CARRIED = ("tokenizer", "tokenizer_source", "data", "hf_config")
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


# The CLI's calibration flags (--calib_*), as loading.convert takes them.
CalibrationOptions = loading.CalibrationOptions


def _summary_from_config(config, num_kv_heads_after: int) -> dict[str, Any]:
    return {"num_layers": config.num_layers, "num_heads": config.num_heads,
            "num_kv_heads_before": config.num_kv_heads, "num_kv_heads_after": num_kv_heads_after,
            "head_dim": config.head_dim, "d_model": config.d_model, "kv_bias": config.qkv_bias,
            "cache_dtype": config.dtype}


def _load_and_convert(input_path: str, num_kv_heads: int | None, method: str, seed: int,
                      calibration: CalibrationOptions | None):
    """loading.load + loading.convert, every in-memory path's prelude: (source, new params, new
    config, conversion record). G (None: the input's current count) and the calibration tokenizer
    are checked from the input's config.json / meta.json before any array is read."""
    source = loading.inspect(input_path)
    if num_kv_heads is None:
        num_kv_heads = source.config.num_kv_heads
    heads.pool_ratio(source.config.num_kv_heads, num_kv_heads)
    tokenizer = None
    calibration = calibration or CalibrationOptions()
    if merging.parse_method(method).needs_calibration and calibration.tokenizer == "auto":
        tokenizer = source.require_tokenizer(
            f"--calib_tokenizer=byte or a tokenizer.json path (for --method={method}'s "
            "calibration data)")
    params, config, source = loading.load(source)
    new_params, new_config, record = loading.convert(
        params, config, num_kv_heads, method, seed=seed, calibration=calibration,
        tokenizer=tokenizer)
    return source, new_params, new_config, record


def _summary(source, num_kv_heads: int, record: dict[str, Any], **facts) -> dict[str, Any]:
    """The facts main() formats: the conversion record and the model's KV numbers."""
    extra = {k: v for k, v in record.items() if k not in ("converter", "num_kv_heads_before",
                                                          "num_kv_heads_after")}
    return {"input": source.path, "input_format": source.format, **extra, **facts,
            **_summary_from_config(source.config, num_kv_heads)}


def convert_checkpoint(input_path: str, output_path: str, num_kv_heads: int | None,
                       method: str = "mean", seed: int = 0, *, overwrite: bool = False,
                       calibration: CalibrationOptions | None = None) -> dict[str, Any]:
    """Converts this project's checkpoint (or a workdir's latest) to num_kv_heads KV heads.

    The output holds params and meta only (uptraining starts a fresh optimizer). Its meta has
    step=0 and source_step = all training steps behind the input, i.e. input.step +
    (input.source_step or 0): a pretrained MHA checkpoint at step P gives P; a converted one
    (step 0, source_step P) keeps P; an uptrained one (step S, source_step P) gives P + S.
    data_position is None (a new run); the input's step, source_step, data_position and
    provenance are kept under provenance['source'], and its 'tokenizer', 'data' and 'hf_config'
    entries are also carried to the top level (where evaluate, train and export read them). The
    input's own tokenizer.json, when it has one, is copied into the output (checkpoints.save).
    calibration: for the methods that read activations (merging.METHODS), default
    CalibrationOptions().
    """
    from gqa_uptrain import checkpoints  # noqa: PLC0415 (jax: only on this path)

    merging.parse_method(method)
    if formats.detect(input_path) != "checkpoint":
        raise ValueError(f"{input_path} is not a checkpoint or workdir of this project")
    outputs.check_output_path(input_path, output_path, overwrite)
    source, new_params, new_config, record = _load_and_convert(input_path, num_kv_heads, method,
                                                               seed, calibration)
    num_kv_heads = new_config.num_kv_heads  # resolved when None
    meta_in = source.meta
    own = os.path.join(source.path, checkpoints.TOKENIZER_FILE)
    own = own if os.path.isfile(own) else None
    provenance = {"converted_from": source.path, **record}
    # What evaluate/train/export look up at the top level stays there: the tokenizer spec, the data
    # spec, the Hugging Face config the model came from.
    for key in _CARRIED:
        if key in meta_in.provenance:
            provenance[key] = meta_in.provenance[key]
    if "hf_config" in provenance:
        provenance["hf_config"] = dict(provenance["hf_config"], num_key_value_heads=num_kv_heads)
    provenance["source"] = {"step": meta_in.step, "source_step": meta_in.source_step,
                            "data_position": meta_in.data_position,
                            "provenance": meta_in.provenance}
    meta = checkpoints.Meta(model_config=new_config, step=0,
                            source_step=meta_in.step + (meta_in.source_step or 0),
                            provenance=provenance)
    checkpoints.save(output_path, new_params, meta, overwrite=overwrite, tokenizer_file=own)
    return _summary(source, num_kv_heads, record, output_format="checkpoint",
                    source_step=meta.source_step)


def _gguf_input(input_path, output_path, out_format, num_kv_heads, method, seed, overwrite,
                tokenizer, calibration):
    """GGUF -> HF folder (config.json + safetensors + the built tokenizer.json) or checkpoint.
    The tokenizer is built before any tensor is read, so an unsupported vocabulary leaves nothing."""
    import tempfile  # noqa: PLC0415

    from gqa_uptrain import checkpoints, gguf_io  # noqa: PLC0415

    outputs.check_output_path(input_path, output_path, overwrite)
    if tokenizer is not None and not os.path.exists(tokenizer):
        raise ValueError(f"tokenizer {tokenizer} does not exist")
    with tempfile.TemporaryDirectory(prefix="gguf_tokenizer_") as tmp:
        built = None
        if tokenizer is None:
            built = gguf_io.write_tokenizer(input_path, os.path.join(tmp, "tokenizer.json"))
        source, new_params, new_config, record = _load_and_convert(input_path, num_kv_heads,
                                                                   method, seed, calibration)
        num_kv_heads = new_config.num_kv_heads  # resolved when None
        provenance = {"converted_from": source.path, **record}
        note = f"copied from {tokenizer}" if tokenizer else f"built from {source.path}'s vocabulary"
        if out_format == "hf":
            hf.export_hf(new_params, new_config, output_path,
                         tokenizer_folder=tokenizer or built,
                         base_hf_config=dict(source.hf_config, num_key_value_heads=num_kv_heads),
                         byte_tokenizer=False, provenance=provenance, overwrite=overwrite)
        else:
            provenance["hf_config"] = dict(source.hf_config, num_key_value_heads=num_kv_heads)
            if built is not None:  # not the temporary file, which is gone after this
                provenance["tokenizer_source"] = source.path
            meta = checkpoints.Meta(model_config=new_config, step=0, source_step=None,
                                    provenance=provenance)
            checkpoints.save(output_path, new_params, meta, overwrite=overwrite,
                             tokenizer_file=built)
    return _summary(source, num_kv_heads, record, output_format=out_format, tokenizer=note)


def _hf_to_checkpoint(input_path, output_path, num_kv_heads, method, seed, overwrite, calibration):
    from gqa_uptrain import checkpoints  # noqa: PLC0415

    outputs.check_output_path(input_path, output_path, overwrite)
    source, new_params, new_config, record = _load_and_convert(input_path, num_kv_heads, method,
                                                               seed, calibration)
    num_kv_heads = new_config.num_kv_heads  # resolved when None
    provenance = {"converted_from": source.path, **record}
    # Kept so that exporting after uptraining restores the original config's other fields
    # (token ids, rope layout, max_position_embeddings).
    provenance["hf_config"] = dict(source.hf_config, num_key_value_heads=num_kv_heads)
    # The folder's tokenizer.json is copied into the checkpoint (with its sha256 in meta.json), so
    # that train / evaluate / export use it after the folder is gone. Without one the checkpoint
    # records none: using it then needs an explicit tokenizer, never a silent byte-level one.
    meta = checkpoints.Meta(model_config=new_config, step=0, source_step=None,
                            provenance=provenance)
    checkpoints.save(output_path, new_params, meta, overwrite=overwrite,
                     tokenizer_file=source.tokenizer)
    return _summary(source, num_kv_heads, record, output_format="checkpoint",
                    architecture=source.hf_config["architectures"][0])


def _export_tokenizer(tokenizer: str | None, path: str, meta) -> tuple[str | None, bool, str]:
    """(tokenizer folder or tokenizer.json to copy, write byte-level?, what the summary says).

    In order: --tokenizer; the checkpoint's own (checkpoints.default_tokenizer: its tokenizer.json,
    or the recorded 'byte' / tokenizer.json path, or byte-level for a model trained here on bytes);
    else none, said plainly. The checkpoint's own tokenizer.json ships together with the companion
    files (tokenizer_config.json, generation_config.json, ...) of the Hugging Face folder it was
    copied from when that folder still holds the same tokenizer.json (_tokenizer_folder).
    """
    from gqa_uptrain import checkpoints  # noqa: PLC0415

    if tokenizer is not None:
        return tokenizer, False, f"copied from {tokenizer}"
    spec = checkpoints.default_tokenizer(path, meta)
    if spec == "byte":
        return None, True, "byte-level"
    if spec is None:
        recorded = checkpoints.tokenizer_spec(path, meta)
        if recorded:
            return None, False, (f"none: the recorded tokenizer {recorded} is gone "
                                 "(pass --tokenizer=FOLDER)")
        return None, False, "none (pass --tokenizer=FOLDER)"
    if spec == os.path.join(path, checkpoints.TOKENIZER_FILE):
        src = _tokenizer_folder(spec, meta.provenance)
    else:  # an older checkpoint's recorded path: that folder's tokenizer files
        src = os.path.dirname(spec) if os.path.basename(spec) == "tokenizer.json" else spec
    return src, False, f"copied from {src}"


def _tokenizer_folder(own: str, provenance: dict[str, Any], depth: int = 5) -> str:
    """The Hugging Face folder whose tokenizer.json the checkpoint's own copy `own` is, followed
    through provenance['tokenizer_source'] (checkpoints.save), when it still holds the same bytes;
    else `own` itself (the tokenizer.json alone)."""
    from gqa_uptrain import checkpoints  # noqa: PLC0415

    want, source = provenance.get("tokenizer_sha256"), provenance.get("tokenizer_source")
    for _ in range(depth):
        if not (want and source and os.path.isfile(source)
                and checkpoints.file_sha256(source) == want):
            break
        folder = os.path.dirname(source)
        if not checkpoints.is_checkpoint(folder):
            return folder
        source = checkpoints.read_meta(folder).provenance.get("tokenizer_source")
    return own


def _checkpoint_to_hf(input_path, output_path, num_kv_heads, method, seed, overwrite, tokenizer,
                      calibration):
    from gqa_uptrain import checkpoints  # noqa: PLC0415

    outputs.check_output_path(input_path, output_path, overwrite)
    if tokenizer is not None and not os.path.exists(tokenizer):
        raise ValueError(f"tokenizer {tokenizer} does not exist")
    source, new_params, new_config, record = _load_and_convert(input_path, num_kv_heads, method,
                                                               seed, calibration)
    num_kv_heads = new_config.num_kv_heads  # resolved when None
    meta_in = source.meta
    base = checkpoints.hf_base_config(meta_in.provenance)
    tokenizer, byte_tokenizer, tokenizer_note = _export_tokenizer(tokenizer, source.path, meta_in)
    provenance = {"converted_from": source.path, **record,
                  "source": {"step": meta_in.step, "source_step": meta_in.source_step}}
    hf.export_hf(new_params, new_config, output_path, tokenizer_folder=tokenizer,
                 base_hf_config=base, byte_tokenizer=byte_tokenizer, provenance=provenance,
                 overwrite=overwrite)
    return _summary(source, num_kv_heads, record, output_format="hf", tokenizer=tokenizer_note)


def _hf_to_hf_in_memory(input_path, output_path, num_kv_heads, method, seed, overwrite,
                        calibration):
    """HF -> HF for the methods that need the whole model: import, convert, export (config.json
    rebuilt from the input's, which keeps every field it does not set; tokenizer files copied)."""
    outputs.check_output_path(input_path, output_path, overwrite)
    source, new_params, new_config, record = _load_and_convert(input_path, num_kv_heads, method,
                                                               seed, calibration)
    num_kv_heads = new_config.num_kv_heads  # resolved when None
    has_tokenizer = any(os.path.isfile(os.path.join(source.path, f))
                        for f in hf.TOKENIZER_FILES if f != "generation_config.json")
    hf.export_hf(new_params, new_config, output_path,
                 tokenizer_folder=source.path if has_tokenizer else None,
                 base_hf_config=source.hf_config, byte_tokenizer=False,
                 provenance={"converted_from": source.path, **record}, overwrite=overwrite)
    return _summary(source, num_kv_heads, record, output_format="hf",
                    architecture=hf.hf_layout(source.hf_config).architecture)


def convert(input_path: str, output_path: str, num_kv_heads: int | None = None,
            method: str = "mean",
            seed: int = 0, *, output_format: str = "auto", overwrite: bool = False,
            tokenizer: str | None = None,
            calibration: CalibrationOptions | None = None) -> dict[str, Any]:
    """Detects the input's format and converts; returns the summary dict that main() prints.

    num_kv_heads: None keeps the input's current count (nothing pooled: with 'mean' an exact copy).
    method: any of merging.METHODS. The plain pooling methods stream HF -> HF one tensor at a time;
    the others load the whole model (and read `calibration` rows when they need activations).
    """
    spec = merging.parse_method(method)
    if output_format not in ("auto",) + FORMATS:
        raise ValueError(f"output_format={output_format!r} is not one of auto, {', '.join(FORMATS)}")
    input_format = formats.detect(input_path)
    streaming = input_format == "hf" and output_format in ("auto", "hf") and spec.is_pooling
    if num_kv_heads is None and streaming:  # the current count, read from config.json
        num_kv_heads = hf.hf_layout(hf.read_hf_config(input_path)).num_kv_heads
    # (The in-memory paths resolve None from the input's facts: _load_and_convert.)
    out_format = ({"gguf": "hf"}.get(input_format, input_format) if output_format == "auto"
                  else output_format)
    if tokenizer is not None and out_format != "hf":
        raise ValueError("--tokenizer applies only to a Hugging Face output")
    if input_format == "gguf":
        summary = _gguf_input(input_path, output_path, out_format, num_kv_heads, method, seed,
                              overwrite, tokenizer, calibration)
    elif input_format == "hf" and out_format == "hf":
        if tokenizer is not None:
            raise ValueError("--tokenizer does not apply to hf -> hf (the input's tokenizer is copied)")
        if streaming:  # one tensor at a time, no jax (hf_stream.py)
            summary = hf_stream.convert_hf_folder(input_path, output_path, num_kv_heads, method,
                                                  seed, overwrite=overwrite)
        else:
            summary = _hf_to_hf_in_memory(input_path, output_path, num_kv_heads, method, seed,
                                          overwrite, calibration)
    elif input_format == "hf":
        summary = _hf_to_checkpoint(input_path, output_path, num_kv_heads, method, seed, overwrite,
                                    calibration)
    elif out_format == "hf":
        summary = _checkpoint_to_hf(input_path, output_path, num_kv_heads, method, seed, overwrite,
                                    tokenizer, calibration)
    else:
        summary = convert_checkpoint(input_path, output_path, num_kv_heads, method, seed,
                                     overwrite=overwrite, calibration=calibration)
    summary.setdefault("input", os.path.abspath(input_path))
    summary["output"] = os.path.abspath(output_path)
    return summary


def kv_numbers(summary: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(before, after) of KV projection parameters and KV-cache bytes per token, from a summary."""
    s = summary
    heads = (s["num_kv_heads_before"], s["num_kv_heads_after"])
    return {
        "kv_projection_params": tuple(pooling.kv_projection_params(
            s["num_layers"], s["d_model"], k, s["head_dim"], s["kv_bias"]) for k in heads),
        # 2 (K and V) · layers · kv_heads · head_dim · bytes, as model.kv_cache_bytes_per_token.
        "kv_cache_bytes_per_token": tuple(
            2 * s["num_layers"] * k * s["head_dim"] * _ITEMSIZE[s["cache_dtype"]] for k in heads),
    }


def format_summary(summary: dict[str, Any]) -> str:
    s = summary
    numbers = kv_numbers(s)
    params, cache = numbers["kv_projection_params"], numbers["kv_cache_bytes_per_token"]
    seed = f", seed={s['seed']}" if s["method"] == "random" or "calibration" in s else ""
    lines = [
        f"converted {s['input']} ({s['input_format']}) -> {s['output']} ({s['output_format']}), "
        f"method={s['method']}{seed}",
        f"layers converted: {s['num_layers']}",
        f"KV heads: {s['num_kv_heads_before']} -> {s['num_kv_heads_after']} "
        f"(query heads: {s['num_heads']})",
        f"KV projection parameters: {params[0]:,} -> {params[1]:,}",
        f"KV-cache bytes per token ({s['cache_dtype']}): {cache[0]:,} -> {cache[1]:,}",
    ]
    if s.get("dropped_tensors"):
        lines.append(f"dropped buffers: {len(s['dropped_tensors'])} "
                     f"({s['dropped_tensors'][0]}, ...)")
    if s.get("not_copied"):
        lines.append(f"not copied (weights in other formats, subfolders, hidden files): "
                     f"{', '.join(s['not_copied'])}")
    if s.get("in_memory"):
        lines.append("whole model loaded in memory (method reads all heads of a layer at once; "
                     "no streaming)")
    if "calibration" in s:
        c = s["calibration"]
        lines.append(f"calibration: {c['num_tokens']:,} tokens ({c['num_tokens'] // c['seq_len']} "
                     f"rows of {c['seq_len']}) from {c['data']} ({c['split']} split), tokenizer "
                     f"{c['tokenizer']}, seed {c['seed']}")
    if s.get("calibration_fallback"):
        lines.append(f"calibration fallback: {s['calibration_fallback']}")
    if "group_cost" in s:
        before, after = s["group_cost"]
        lines.append(f"grouping cost (K/V distance to group means, all layers): contiguous "
                     f"{before:.4g} -> chosen {after:.4g}")
    if "k_objective" in s:
        before, after = s["k_objective"]
        lines.append(f"K logit error on calibration data (all layers): mean {before:.4g} -> "
                     f"fit {after:.4g}")
    if "source_step" in s:
        lines.append(f"source_step (training steps behind the input): {s['source_step']}")
    if "tokenizer" in s:
        lines.append(f"tokenizer: {s['tokenizer']}")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, not argparse's usage block
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="python -m gqa_uptrain.convert",
                description="Convert an MHA/GQA model to fewer KV heads by pooling K/V heads.",
                epilog="Methods are [GROUPING+]MERGE. MERGE: mean (the paper's), first, random, "
                       "mean_normed (the mean at its members' average norm) (pool contiguous "
                       "groups, streaming one tensor at a time), fit (merge "
                       "each group's K/V so that every member head's attention logits and outputs "
                       "change least on calibration data), or fit_o (fit, then re-fit each query "
                       "head's output projection to the merged values by least squares on "
                       "calibration data). GROUPING: similar (group the heads "
                       "whose K/V activations on calibration data are most alike) or "
                       "similar_weights (alike by K/V weights), then permute the heads so that "
                       "groups are contiguous. 'similar', 'fit' and 'fit_o' read activations on "
                       "calibration rows (--calib_*, the train split, deterministic under "
                       "--seed), so these methods (and similar_weights) need the whole model in "
                       "memory: no streaming. See gqa_uptrain/merging.py for the exact "
                       "objectives.")
    p.add_argument("--input", required=True,
                   help="Hugging Face folder, checkpoint / workdir, or llama FILE.gguf")
    p.add_argument("--output", required=True, help="where to write (must not exist)")
    p.add_argument("--num_kv_heads", type=int, default=None,
                   help="G: KV heads after conversion; must divide the current number. Default: "
                        "the input's current count (nothing pooled; an exact copy with mean), "
                        "e.g. to export a checkpoint to hf as it is")
    p.add_argument("--method", default="mean", choices=merging.METHODS,
                   help="how K/V heads are grouped and merged (see below); default mean")
    p.add_argument("--seed", type=int, default=0,
                   help="for --method=random, and the choice of calibration documents")
    p.add_argument("--calib_data", default="stdlib",
                   help="calibration source for similar/fit/fit_o: 'stdlib' (the Python standard "
                        "library's source, this project's default corpus) or comma-separated "
                        "globs of local .txt/.jsonl/.parquet files ('text' field); its train split")
    p.add_argument("--calib_tokens", type=int, default=16384,
                   help="calibration size in tokens (rounded down to whole rows)")
    p.add_argument("--calib_seq_len", type=int, default=256, help="calibration row length")
    p.add_argument("--calib_tokenizer", default="auto",
                   help="'auto' (the input's own tokenizer; byte-level for a model trained here), "
                        "'byte', or a tokenizer.json path")
    p.add_argument("--output_format", default="auto", choices=("auto",) + FORMATS,
                   help="'hf' (a Hugging Face folder) or 'checkpoint' (this project's format); "
                        "default auto: the input's format (hf for a GGUF input)")
    p.add_argument("--tokenizer", default=None,
                   help="checkpoint / gguf -> hf: folder (or tokenizer.json) whose tokenizer to "
                        "ship; default: the checkpoint's own tokenizer.json (byte-level only for a "
                        "model trained here on bytes), or the one built from the GGUF vocabulary")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        calibration = CalibrationOptions(args.calib_data, args.calib_tokens, args.calib_seq_len,
                                         args.calib_tokenizer)
        summary = convert(args.input, args.output, args.num_kv_heads, args.method, args.seed,
                          output_format=args.output_format, overwrite=args.overwrite,
                          tokenizer=args.tokenizer, calibration=calibration)
    except (ValueError, OSError) as e:
        message = " ".join(str(e).split())  # one line, whatever the exception held
        print(f"error: {message}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

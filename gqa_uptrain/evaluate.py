"""Scoring a model: mean negative log-likelihood per predicted token (the loss: losses.py) over a
token stream, and the evaluation CLI.

    python -m gqa_uptrain.evaluate --checkpoint=PATH [--text_file=FILE] [--seq_len=N]

PATH is a checkpoint or a training workdir of this project (-> its latest checkpoint) or a Hugging
Face folder (config.json + safetensors; scored with its own tokenizer.json and that tokenizer's BOS
rule). Without --text_file the text is the validation split of the run's data (recorded in the
checkpoint; the stdlib corpus for a Hugging Face folder).

Windowing (data.py): the text is one document (the validation split: its documents, packed, with no
attention across documents); the token stream is cut into windows of seq_len predicted tokens, with
consecutive windows overlapping by one token. Each window is scored on its own, so context resets at
every window start: a token at offset i of its window is predicted from at most i previous tokens.
Every token but the first of each document is predicted exactly once. The last line printed is one
JSON object: loss (nats per predicted token), perplexity = exp(loss), tokens (predicted tokens).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from gqa_uptrain import data, loading, losses

# Without a recorded training length (a Hugging Face folder), windows are this long.
DEFAULT_SEQ_LEN = 1024


def evaluate_stream(eval_step, params, stream: data.TokenStream, *, seq_len: int,
                    batch_size: int, max_batches: int = -1,
                    put_batch: Callable[[Callable[[np.ndarray], dict]], dict] | None = None
                    ) -> dict[str, float]:
    """Scores a token stream window by window (module docstring); returns loss, perplexity, tokens.

    put_batch(rows_fn) builds the device batch from rows_fn(global row ids) -> host rows; the
    default puts the whole batch on the default device.
    """
    total, count = 0.0, 0.0
    for ids in data.eval_window_batches(stream, seq_len, batch_size, max_batches):
        def rows_fn(rows, ids=ids):
            return data.window_rows(stream, ids[rows], seq_len)

        if put_batch is None:
            batch = {k: jnp.asarray(v) for k, v in rows_fn(np.arange(batch_size)).items()}
        else:
            batch = put_batch(rows_fn)
        s, c = eval_step(params, batch)
        total += float(s)  # accumulated in float64 on the host
        count += float(c)
    if count == 0:
        raise data.DataError("nothing to score: the text has fewer than 2 tokens")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(count)}


def scored_tokens(stream: data.TokenStream, seq_len: int, max_windows: int = -1) -> np.ndarray:
    """The target tokens evaluate_stream scores (for the unigram-entropy baseline)."""
    num = stream.num_windows(seq_len, full_only=False)
    if max_windows >= 0:
        num = min(num, max_windows)
    end = min(len(stream.tokens), num * seq_len + 1)
    keep = np.ones(end, bool)
    keep[stream.doc_starts[stream.doc_starts < end]] = False  # first token of each document
    return stream.tokens[:end][keep]


def default_data_spec(tokenizer: str, seq_len: int) -> data.DataSpec:
    """The stdlib corpus with the trainer's default split (used when a model records none)."""
    return data.DataSpec(source="stdlib", path="", val_path="", hf_name="", hf_config="",
                         train_split="train", val_split="", text_field="text", val_fraction=0.02,
                         tokenizer=tokenizer, seq_len=seq_len, cache_dir="")


def evaluate_model(path: str, *, text_file: str = "", seq_len: int = 0, batch_size: int = 8,
                   max_batches: int = -1, implementation: str = "auto",
                   cache_dir: str = "", tokenizer: str = "") -> dict[str, Any]:
    """Loss / perplexity / tokens of the model at `path` (anything loading.load reads) on
    text_file or its validation split. tokenizer: 'byte' or a tokenizer.json path; default the
    model's own (loading.Source.tokenizer), checked before any array is read."""
    if tokenizer and tokenizer != "byte":
        tokenizer = os.path.abspath(tokenizer)
    source = loading.inspect(path)
    tokenizer = tokenizer or source.require_tokenizer("--tokenizer=PATH/tokenizer.json")
    params, config, source = loading.load(source)
    info = {"path": source.path, "step": source.step, "tokenizer": tokenizer,
            "data": source.provenance.get("data")}
    tokenizer = data.load_tokenizer(info["tokenizer"])
    if tokenizer.vocab_size > config.vocab_size:
        raise data.DataError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids; the "
                             f"model's vocab_size is {config.vocab_size}")
    spec = data.DataSpec.from_dict(info["data"]) if info["data"] else None
    seq_len = seq_len or (spec.seq_len if spec else DEFAULT_SEQ_LEN)
    if text_file:
        with open(text_file, "rb") as f:
            stream = data.tokenize([f.read()], tokenizer)
        text = os.path.abspath(text_file)
    else:
        spec = spec or default_data_spec(info["tokenizer"], seq_len)
        cache = cache_dir or spec.cache_dir or os.path.join(os.path.expanduser("~"), ".cache",
                                                            "gqa_uptrain")
        stream, manifest = data.load_split(spec, tokenizer, "validation", cache)
        text = f"validation split ({spec.source}, sha256 {manifest['sha256'][:12]})"
    params = {k: jnp.asarray(v) for k, v in params.items()}
    result = evaluate_stream(losses.make_eval_step(config, implementation), params, stream,
                             seq_len=seq_len, batch_size=batch_size, max_batches=max_batches)
    return {**result, "checkpoint": info["path"], "step": info["step"], "seq_len": seq_len,
            "text": text}


def main(argv):
    from absl import flags, logging  # noqa: PLC0415

    from gqa_uptrain import cli  # noqa: PLC0415

    del argv
    f = flags.FLAGS
    logging.set_verbosity(logging.WARNING)
    try:
        result = evaluate_model(f.checkpoint, text_file=f.text_file, seq_len=f.seq_len,
                                batch_size=f.batch_size, max_batches=f.max_batches,
                                implementation=f.implementation, tokenizer=f.tokenizer)
    except (ValueError, OSError) as e:  # CheckpointError and DataError are ValueErrors
        cli.fail(e)
    print(f"{result['text']}: {result['tokens']} tokens, windows of {result['seq_len']}")
    print(json.dumps(result))


if __name__ == "__main__":
    from absl import flags

    from gqa_uptrain import cli, cpu

    cpu.enable()  # the CPU tuning the command lines run with (gqa_uptrain/cpu/)

    flags.DEFINE_string("checkpoint", None, "checkpoint, workdir, or Hugging Face folder",
                        required=True)
    flags.DEFINE_string("text_file", "", "score this file (one document) instead of the "
                        "validation split")
    flags.DEFINE_integer("seq_len", 0, "predicted tokens per window (0: the run's training "
                         f"seq_len, or {DEFAULT_SEQ_LEN} for a Hugging Face folder)")
    flags.DEFINE_integer("batch_size", 8, "windows per forward pass")
    flags.DEFINE_string("tokenizer", "", "'byte' or a tokenizer.json path (default: the model's own)")
    flags.DEFINE_integer("max_batches", -1, "score only the first N batches (-1: all)")
    from gqa_uptrain import attention

    flags.DEFINE_enum("implementation", "auto", list(attention.IMPLEMENTATIONS),
                      "attention implementation (attention.select; 'auto': the platform's "
                      "first supported candidate)")
    cli.run(main, description=__doc__.split("\n\n")[0])

"""Data preparation and loading against what they must keep up with: tokenizing, loading, memory.

    python -m gqa_uptrain.bench data [--quick] [--cache_dir DIR] [--corpus_mb 24] [--repeats 2]
        [--workers N] [--memory_tokens 1e7,1e8]

Inputs, generated once into the cache folder (default $XDG_CACHE_HOME/gqa_uptrain/bench_data, else
~/.cache/gqa_uptrain/bench_data; never in the repository) and reused by later runs: a corpus of
parquet files (column 'text') of the Python standard library's own source files (real code, one
document per file), repeated to --corpus_mb MB of text; a byte-level BPE tokenizer of 32,000 ids
(Llama-2's vocabulary size) trained on the stdlib with the `tokenizers` library, with a BOS before
every document.

1. Preparation throughput, the two sides ALTERNATED over `repeats` rounds, medians, on the same
   cores:
     encode_batch   the tokenizer's own `Tokenizer.encode_batch` over the corpus's texts already
                    in memory (1,024 documents a call; the Rust encoder's own thread pool on every
                    core), ids read out of the encodings (`[e.ids for e in ...]`, what any use of
                    them needs); also timed without reading them, as a second reference
     prepare        data.prepare_split of the same parquet files, from scratch into a new cache
                    folder: streaming read, sharding, `--workers` tokenizing processes (default:
                    every core), shard files, the store's concatenation and fsync
   Target: prepare >= 0.8x encode_batch's tokens/s (ids read out).
2. Loader tokens/s: data.train_window_ids + data.window_rows (what the trainer's prefetch thread
   runs for each step) building 64 rows of 4,096 tokens from the corpus's store (uint16, memory-
   mapped, in the page cache), one thread, against host_tokens_per_s(): what one 8 x H100 host
   consumes training the Llama-2-7B GQA-8 uptraining at seq 4096. Target: >= 2x.
3. Memory: RssAnon (anonymous resident memory; the store's memory-mapped pages are file cache and
   do not count) of `python -m gqa_uptrain.train --config=configs/pretrain.py:smoke` on local jsonl
   corpora of --memory_tokens byte-level tokens (experiments/data_memory.py's method: the same
   fixed validation file, prepared first, --memory_steps steps, /proc/PID/status sampled every
   10 ms). Target: the largest corpus's peak under 1.1x the smallest's. Linux only (else n/a).

`--quick` (a smoke test; figures meaningless): a 2 MB corpus, 1 round, corpora of 1e6 and 3e6
tokens, 3 training steps.

Headline JSON keys: bench ("data"), quick, machine {date_utc, cpu, cpu_count, platform, device,
jax, python}, corpus {path, text_bytes, documents, generated}, tokenizer {path, vocab_size},
workers, repeats, tokens, encode_batch_s, encode_batch_no_ids_s, prepare_s (medians),
encode_batch_runs_s, encode_batch_no_ids_runs_s, prepare_runs_s, encode_batch_tokens_per_s,
prepare_tokens_per_s, prepare_ratio (prepare / encode_batch with ids), prepare_ratio_no_ids,
loader_tokens_per_s, host_tokens_per_s, host_formula, loader_ratio, memory [{train_tokens,
store_mb, prepare_s, train_s, train_rss_anon_mib}] (null off Linux), rss_growth (largest / smallest
peak - 1), targets {prepare_ge_0_8x_encode_batch, loader_ge_2x_host, rss_growth_lt_10pct}.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from gqa_uptrain import data, outputs, plan, token_store
from gqa_uptrain.benchmarks.common import (BenchError, fmt, machine_info, machine_line,
                                           markdown_table)
from gqa_uptrain.model import ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORPUS_MB, QUICK_CORPUS_MB = 24, 2
REPEATS, QUICK_REPEATS = 2, 1
MEMORY_TOKENS, QUICK_MEMORY_TOKENS = (10_000_000, 100_000_000), (1_000_000, 3_000_000)
MEMORY_STEPS, QUICK_MEMORY_STEPS = 20, 3
VOCAB_SIZE = 32000
ENCODE_BATCH_DOCUMENTS = 1024
LOADER_ROWS, LOADER_SEQ_LEN, LOADER_STEPS = 64, 4096, 200
MIB = 2 ** 20

# The consumer: Llama-2-7B uptrained to 8 KV heads (configs/uptrain.py's 7B preset), seq 4096,
# on one host of 8 H100 SXM at the planner's default MFU of 40%.
LLAMA2_7B_GQA8 = ModelConfig(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32,
                             num_kv_heads=8, mlp_dim=11008, head_dim=128)
HOST_HARDWARE, HOST_MFU, HOST_SEQ_LEN = "h100", 0.40, 4096
HOST_FORMULA = ("8 GPUs x 989e12 bf16 dense FLOP/s x MFU 0.40 / (6 x params + 12 x layers x "
                "d_model x seq) FLOPs per token (the planner's plan.HARDWARE['h100'] and "
                "plan.flops_per_token; params = the 5.80B matmul weights, all but the input "
                "embedding); Llama-2-7B GQA-8, seq 4096")


def host_tokens_per_s(config: ModelConfig = LLAMA2_7B_GQA8, seq_len: int = HOST_SEQ_LEN,
                      hardware: str = HOST_HARDWARE, mfu: float = HOST_MFU) -> float:
    """Training tokens per second one host consumes, by the planner's figures (HOST_FORMULA):

        chips_per_host x bf16_flops x mfu / (6 x params + 12 x layers x d_model x seq_len)

    with plan.HARDWARE[hardware] (H100: 8 chips of 989e12 dense bf16 FLOP/s) and
    plan.flops_per_token (params: the non-embedding matmul weights plus the output head, 5.80B for
    Llama-2-7B GQA-8; the second term is attention's q.k and p.v, PaLM appendix B; d_model =
    heads x head_dim here). Llama-2-7B GQA-8 at seq 4096: ~76.7k tokens/s."""
    chip = plan.HARDWARE[hardware]
    return chip.chips_per_host * chip.bf16_flops * mfu / plan.flops_per_token(config, seq_len)


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gqa_uptrain", "bench_data")


# ----------------------------------------------------------------------------- inputs


def make_corpus(folder: str, text_mb: int) -> tuple[int, int]:
    """Parquet files of stdlib source documents repeated to text_mb MB of text, ~8 MB a file,
    written atomically to `folder`; (text bytes, documents)."""
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    root = data.stdlib_root()
    docs = []
    for rel in data.stdlib_files(root):
        with open(os.path.join(root, rel), "rb") as f:
            docs.append(f.read().decode("utf-8", errors="replace"))
    target, total, count = text_mb * 10**6, 0, 0
    with outputs.atomic_folder(folder) as tmp:
        part: list[str] = []
        part_bytes, index = 0, 0
        while total < target:
            doc = docs[count % len(docs)]
            part.append(doc)
            size = len(doc.encode("utf-8"))
            total, part_bytes, count = total + size, part_bytes + size, count + 1
            if part_bytes >= 8 * 10**6 or total >= target:
                pq.write_table(pa.table({"text": part}), os.path.join(tmp, f"part-{index:05d}.parquet"),
                               row_group_size=1024)
                part, part_bytes, index = [], 0, index + 1
    return total, count


def make_tokenizer(path: str) -> None:
    """A byte-level BPE of VOCAB_SIZE ids trained on the stdlib's source, '<s>' before every text."""
    from tokenizers import (Tokenizer, decoders, models, pre_tokenizers,  # noqa: PLC0415
                            processors, trainers)

    root = data.stdlib_root()
    texts = []
    for rel in data.stdlib_files(root):
        with open(os.path.join(root, rel), "rb") as f:
            texts.append(f.read().decode("utf-8", errors="replace"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, path)


def _texts(pattern: str) -> list[str]:
    import pyarrow.parquet as pq  # noqa: PLC0415

    out = []
    for path in sorted(glob.glob(pattern)):
        out += pq.read_table(path, columns=["text"]).column("text").to_pylist()
    return [t for t in out if t]  # an empty row is no document (data._texts), e.g. an __init__.py


def corpus_spec(pattern: str, tokenizer: str, seq_len: int = LOADER_SEQ_LEN) -> data.DataSpec:
    """The corpus's files, all of them training documents (val_fraction 0), read streaming."""
    return data.DataSpec(source="files", path=pattern, val_path="", hf_name="", hf_config="",
                         train_split="train", val_split="", text_field="text", val_fraction=0.0,
                         tokenizer=tokenizer, seq_len=seq_len, cache_dir="", streaming=True)


# ----------------------------------------------------------------------------- memory
# (experiments/data_memory.py runs the same measurement on its own, with a table per step.)

DOC_CHARS = 4095  # + BOS = 4,096 byte-level tokens a document
# Printable ASCII without '"' and '\\', so a document is its own JSON string.
_ALPHABET = np.frombuffer(bytes(c for c in range(32, 127) if c not in b'"\\'), np.uint8)


def write_jsonl_corpus(path: str, num_tokens: int, seed: int) -> int:
    """A jsonl file of num_tokens // 4096 random documents; returns its number of tokens."""
    rng = np.random.default_rng(seed)
    num_docs = max(1, num_tokens // (DOC_CHARS + 1))
    with open(path, "wb") as f:
        for start in range(0, num_docs, 1024):  # 4 MB of text at a time
            rows = _ALPHABET[rng.integers(0, len(_ALPHABET), (min(1024, num_docs - start),
                                                               DOC_CHARS))]
            f.write(b"".join(b'{"text": "' + row.tobytes() + b'"}\n' for row in rows))
    return num_docs * (DOC_CHARS + 1)


def rss_anon_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return None  # exited


def run_sampled(cmd: list[str], env: dict[str, str]) -> tuple[int, float, str]:
    """(peak RssAnon in bytes, wall seconds, stdout) of a command; BenchError if it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:  # the training command re-executes itself: the pid is the same
        peak = max(peak, rss_anon_bytes(proc.pid) or 0)
        time.sleep(0.01)
    out, err = proc.communicate()
    if proc.returncode:
        last = err.strip().splitlines()[-1] if err.strip() else ""
        raise BenchError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}: {last}")
    return peak, time.perf_counter() - start, out


def memory_env(folder: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                HF_HOME=os.path.join(folder, "hf_home"))


def measure_memory(folder: str, sizes: tuple[int, ...], steps: int) -> list[dict[str, Any]]:
    """Per training corpus size: prepare, then train `steps` steps; their RssAnon peaks."""
    env = memory_env(folder)
    val_path = os.path.join(folder, "validation.jsonl")
    write_jsonl_corpus(val_path, 200_000, seed=1)
    rows = []
    for size in sizes:
        sub = os.path.join(folder, f"tokens_{size}")
        os.makedirs(sub)
        train_path = os.path.join(sub, "train.jsonl")
        num_tokens = write_jsonl_corpus(train_path, size, seed=0)
        config = [f"--config={os.path.join(REPO, 'configs', 'pretrain.py')}:smoke",
                  "--config.data.source=files", f"--config.data.path={train_path}",
                  f"--config.data.val_path={val_path}",
                  f"--config.data.cache_dir={os.path.join(sub, 'cache')}"]
        prep_peak, prep_s, _ = run_sampled(
            [sys.executable, "-m", "gqa_uptrain.data", "prepare", *config], env)
        train_peak, train_s, _ = run_sampled(
            [sys.executable, "-m", "gqa_uptrain.train", *config,
             f"--workdir={os.path.join(sub, 'workdir')}", f"--config.num_steps={steps}",
             "--config.checkpoint_every=0", "--config.progress_bar=False"], env)
        store_mb = sum(os.path.getsize(os.path.join(d, f))
                       for d, _, files in os.walk(os.path.join(sub, "cache"))
                       for f in files if f.endswith(".bin")) / MIB
        rows.append(dict(train_tokens=num_tokens, store_mb=store_mb, prepare_s=prep_s,
                         prepare_rss_anon_mib=prep_peak / MIB, train_s=train_s,
                         train_rss_anon_mib=train_peak / MIB))
        shutil.rmtree(sub)  # the next corpus's disk
    return rows


# ----------------------------------------------------------------------------- the benchmark


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--quick", action="store_true",
                        help="a 2 MB corpus, small memory runs (smoke test; figures meaningless)")
    parser.add_argument("--cache_dir", default=None,
                        help=f"where the corpus and tokenizer are kept (default "
                             f"{default_cache_dir()})")
    parser.add_argument("--corpus_mb", type=int, default=None,
                        help=f"MB of text in the corpus (default {CORPUS_MB})")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"alternated timed rounds (default {REPEATS})")
    parser.add_argument("--workers", type=int, default=None,
                        help="prepare's tokenizing processes (default: every core this process "
                             "may use)")
    parser.add_argument("--memory_tokens", default=None,
                        help="comma-separated training corpus sizes of the memory runs "
                             f"(default {','.join(f'{t:.0e}' for t in MEMORY_TOKENS)})")


def _encode_batch(tokenizer, texts: list[str], read_ids: bool) -> int:
    tokens = 0
    for start in range(0, len(texts), ENCODE_BATCH_DOCUMENTS):
        encodings = tokenizer.encode_batch(texts[start:start + ENCODE_BATCH_DOCUMENTS])
        tokens += sum(len(e.ids) for e in encodings) if read_ids else len(encodings)
    return tokens


def run(args) -> dict[str, Any]:
    quick = args.quick
    corpus_mb = args.corpus_mb or (QUICK_CORPUS_MB if quick else CORPUS_MB)
    repeats = (QUICK_REPEATS if quick else REPEATS) if args.repeats is None else args.repeats
    workers = data.default_workers() if args.workers is None else args.workers
    sizes = (tuple(int(float(s)) for s in args.memory_tokens.split(","))
             if args.memory_tokens else QUICK_MEMORY_TOKENS if quick else MEMORY_TOKENS)
    steps = QUICK_MEMORY_STEPS if quick else MEMORY_STEPS
    if repeats < 1 or workers < 1 or corpus_mb < 1:
        raise BenchError(f"--repeats {repeats}, --workers {workers} and --corpus_mb {corpus_mb} "
                         "must be >= 1")
    if len(sizes) < 2 or min(sizes) < 4096:
        raise BenchError(f"--memory_tokens {args.memory_tokens} needs two sizes of >= 4096 tokens")
    cache_dir = os.path.abspath(args.cache_dir or default_cache_dir())
    os.makedirs(cache_dir, exist_ok=True)
    info = machine_info()
    from tokenizers import Tokenizer  # noqa: PLC0415

    corpus = os.path.join(cache_dir, f"corpus_{corpus_mb}mb")
    generated = not os.path.isdir(corpus)
    if generated:
        make_corpus(corpus, corpus_mb)
    pattern = os.path.join(corpus, "*.parquet")
    tok_path = os.path.join(cache_dir, f"bpe{VOCAB_SIZE}", "tokenizer.json")
    if not os.path.isfile(tok_path):
        make_tokenizer(tok_path)
    tokenizer = data.load_tokenizer(tok_path)
    texts = _texts(pattern)
    text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    rust = Tokenizer.from_file(tok_path)
    spec = corpus_spec(pattern, tok_path)

    # 1. Preparation vs encode_batch, alternated.
    runs: dict[str, list[float]] = {"encode_batch": [], "encode_batch_no_ids": [], "prepare": []}
    tokens = None
    work = tempfile.mkdtemp(prefix=".bench-prepare-", dir=cache_dir)
    try:
        for _ in range(repeats):
            for name in runs:
                start = time.perf_counter()
                if name == "prepare":
                    out = os.path.join(work, "cache")
                    path = data.prepare_split(spec, tokenizer, "train", out, workers=workers,
                                              progress=False)
                    runs[name].append(time.perf_counter() - start)
                    tokens_stored = token_store.read_manifest(path)["num_tokens"]
                    shutil.rmtree(out)
                else:
                    counted = _encode_batch(rust, texts, read_ids=name == "encode_batch")
                    runs[name].append(time.perf_counter() - start)
                    if name == "encode_batch":
                        tokens = counted
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if tokens != tokens_stored:
        raise BenchError(f"prepare stored {tokens_stored} tokens, encode_batch made {tokens}")
    med = {name: float(np.median(r)) for name, r in runs.items()}
    rate = {name: tokens / s for name, s in med.items()}
    prepare_ratio = rate["prepare"] / rate["encode_batch"]
    prepare_ratio_no_ids = rate["prepare"] / rate["encode_batch_no_ids"]

    # 2. The loader, on a store of the corpus kept in the cache (prepared once, untimed).
    stream, _ = data.load_split(spec, tokenizer, "train", os.path.join(cache_dir, "stores"),
                                process_index=0, workers=workers)
    num_windows = stream.num_windows(LOADER_SEQ_LEN, full_only=True)
    rows = np.arange(LOADER_ROWS)
    loader_steps = LOADER_STEPS // (10 if quick else 1)
    data.window_rows(stream, data.train_window_ids(0, 0, LOADER_ROWS, num_windows, rows),
                     LOADER_SEQ_LEN)  # the pages and the permutation once, untimed
    start = time.perf_counter()
    for step in range(loader_steps):
        data.window_rows(stream, data.train_window_ids(0, step, LOADER_ROWS, num_windows, rows),
                         LOADER_SEQ_LEN)
    loader_s = time.perf_counter() - start
    loader_rate = loader_steps * LOADER_ROWS * LOADER_SEQ_LEN / loader_s
    host_rate = host_tokens_per_s()

    # 3. Training memory at two corpus sizes.
    memory = None
    if os.path.exists("/proc/self/status"):
        folder = tempfile.mkdtemp(prefix=".bench-memory-", dir=cache_dir)
        try:
            memory = measure_memory(folder, sizes, steps)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    growth = (None if memory is None else
              memory[-1]["train_rss_anon_mib"] / memory[0]["train_rss_anon_mib"] - 1)

    print(f"## Data: preparation, loading, memory{' (--quick: figures meaningless)' * quick}")
    print(f"{machine_line(info)} Corpus: {len(texts):,} stdlib source documents, "
          f"{text_bytes / 1e6:.1f} MB of text in parquet ({corpus}"
          f"{', generated' if generated else ', cached'}); tokenizer: byte-level BPE, "
          f"{tokenizer.vocab_size:,} ids; {tokens:,} tokens. Median of {repeats} alternated "
          f"rounds; prepare with {workers} workers.")
    print()
    table = []
    for name, label in (("encode_batch", "encode_batch, text in memory, ids read out"),
                        ("encode_batch_no_ids", "encode_batch, text in memory, ids not read"),
                        ("prepare", f"prepare_split from parquet ({workers} workers)")):
        table.append((label, fmt(med[name], "{:.2f}"), ", ".join(f"{s:.2f}" for s in runs[name]),
                      fmt(rate[name] / 1e6, "{:.3f}"),
                      fmt(rate["prepare"] / rate[name], "{:.2f}×")))
    print(markdown_table(("tokenizing", "median s", "runs s", "M tokens/s", "prepare vs this"),
                         table))
    print()
    print(markdown_table(
        ("loader", "tokens/s", "vs one 8 × H100 host"),
        [(f"window_rows, {LOADER_ROWS} × {LOADER_SEQ_LEN} rows, one thread, page cache",
          fmt(loader_rate, "{:,.0f}"), fmt(loader_rate / host_rate, "{:.1f}×")),
         ("one 8 × H100 host, Llama-2-7B GQA-8, seq 4096 (formula below)",
          fmt(host_rate, "{:,.0f}"), "1×")]))
    print(f"\nHost consumption = {HOST_FORMULA}.")
    if memory is not None:
        print()
        print(markdown_table(
            ("train tokens", "store (.bin) MB", "prepare s", "train s", "train RssAnon MiB"),
            [(f"{m['train_tokens']:,}", fmt(m["store_mb"], "{:,.1f}"),
              fmt(m["prepare_s"], "{:.1f}"), fmt(m["train_s"], "{:.1f}"),
              fmt(m["train_rss_anon_mib"], "{:,.1f}")) for m in memory]))
        print(f"\nTraining RssAnon peak ({steps} steps of configs/pretrain.py:smoke), "
              f"{memory[-1]['train_tokens']:,} over {memory[0]['train_tokens']:,} tokens: "
              f"{growth:+.1%}.")
    print()
    return dict(
        bench="data", quick=quick, machine=info,
        corpus=dict(path=corpus, text_bytes=text_bytes, documents=len(texts),
                    generated=generated),
        tokenizer=dict(path=tok_path, vocab_size=tokenizer.vocab_size), workers=workers,
        repeats=repeats, tokens=tokens, encode_batch_s=med["encode_batch"],
        encode_batch_no_ids_s=med["encode_batch_no_ids"], prepare_s=med["prepare"],
        encode_batch_runs_s=runs["encode_batch"],
        encode_batch_no_ids_runs_s=runs["encode_batch_no_ids"], prepare_runs_s=runs["prepare"],
        encode_batch_tokens_per_s=rate["encode_batch"], prepare_tokens_per_s=rate["prepare"],
        prepare_ratio=prepare_ratio, prepare_ratio_no_ids=prepare_ratio_no_ids,
        loader_tokens_per_s=loader_rate, host_tokens_per_s=host_rate, host_formula=HOST_FORMULA,
        loader_ratio=loader_rate / host_rate, memory=memory, rss_growth=growth,
        targets={"prepare_ge_0_8x_encode_batch": prepare_ratio >= 0.8,
                 "loader_ge_2x_host": loader_rate / host_rate >= 2.0,
                 "rss_growth_lt_10pct": None if growth is None else growth < 0.10})

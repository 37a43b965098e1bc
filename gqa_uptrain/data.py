"""Training and evaluation data: sources, tokenizers, token stores on disk, packing, and a batch
order that is a pure function of (seed, step).

    python -m gqa_uptrain.data prepare --config=configs/pretrain.py:smoke [--config.KEY=...] \\
        [--workdir=DIR] [--workers=N]  # both splits' stores, in data.cache_dir or DIR/data_cache

Sources (DataSpec.source):
  'stdlib'  the running interpreter's own standard-library source (`sysconfig.get_paths()['stdlib']`),
            every .py file outside test/tests/idle_test/site-packages, read as bytes (a few files are not
            UTF-8). No download, real code nobody here wrote. Split into train / validation by file:
            a file is validation when the first 8 hex digits of sha256(relative path) / 16**8 <
            val_fraction, so the split does not depend on listing order or on the other files.
  'files'   local text / jsonl / parquet files through `datasets.load_dataset(builder,
            data_files=...)`: a text file is one document, a jsonl/parquet row is one document
            (its `text_field`). `val_path` names validation files; without it rows are split by the
            same hash rule applied to the document's text.
  'hf'      a Hugging Face dataset name through `datasets.load_dataset(name, config, split=...)`.

Every split gets a manifest (files and their sha256, or the dataset's fingerprint) that the trainer
stores in the workdir, so a result names its exact corpus.

Tokenizers: 'byte' (ids 0..255 are the bytes, BYTE_BOS_ID = 256 starts every document; vocabulary
BYTE_VOCAB_SIZE = 257) or a Hugging Face `tokenizer.json` through the `tokenizers` library, whose own
post-processor decides whether a BOS is added (its "BOS rule").

Token stores (token_store.py): each split is tokenized once, document by document, into its own store
folder under the cache dir: the token ids in one flat file (uint16 for a vocabulary of up to 65,536
ids, else uint32), the documents' start offsets in another, and a manifest (the sources and their
hashes, the tokenizer's fingerprint, token count, dtype, format version). The folder's name is a hash
of what selects the documents (source, globs or dataset, split rule) and of the tokenizer's
fingerprint; opening it checks that its manifest still agrees with the config (the same files, by
path and size+mtime, re-hashed when those changed; the same dataset fingerprint; the same tokenizer)
and refuses, naming what differs, when not. `load_split` prepares a missing store (process 0 of a
multi-process run; the others wait for its manifest) and returns the store's arrays as memory maps,
so a process reads only the windows of its own rows.

Packing: a split's documents, concatenated, are one token stream (TokenStream). Window w covers
stream[w*seq_len : w*seq_len + seq_len + 1]: inputs are its first seq_len tokens, targets the
last seq_len, so consecutive windows overlap by one token and every stream token after the first is a
target exactly once. Inside a window, segment ids (1, 2, ...) keep documents apart in attention,
positions restart at 0 at the window start and at every document start, and a target that belongs to
a different document than its input is masked out of the loss (loss_mask 0). Training uses the full
windows only, in an order that is a pure function of (seed, step) (`train_window_ids`); evaluation
uses every window in stream order, the last one padded with loss_mask 0.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from functools import lru_cache
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from gqa_uptrain import token_store
from gqa_uptrain.token_store import DataError

SOURCES = ("stdlib", "files", "hf")
# config.data keys of the batch loader, not of the text (DataSpec): data.prefetch (prefetch.py).
LOADER_KEYS = ("prefetch",)
BYTE_VOCAB_SIZE = 257
BYTE_BOS_ID = 256
# Directories of the stdlib left out of the corpus: the test suites (31 MB that would dominate the
# 12 MB of library code), third-party packages, and the build's machine-specific config dir.
_STDLIB_SKIP_DIRS = ("test", "tests", "idle_test", "site-packages", "__pycache__")
_TEXT_EXTENSIONS = (".txt", ".text", ".md", ".py", ".rst")
# Documents tokenized together while preparing a store: a batch is what the Rust BPE encoder runs
# in parallel, and the bound on the text held in memory at once.
_PREPARE_BATCH_DOCUMENTS = 256
_PREPARE_BATCH_CHARS = 32 * 2**20
# A shard (token_store.write_shard) ends at whichever bound a document crosses first: 4 MiB of text
# is ~1M BPE tokens, about a second of one core's tokenizing, so a worker's round trip and file
# are a small share of it; a 50B-token corpus makes ~50k shards. The bounds cut the documents,
# never the store's bytes (its concatenation), so changing them changes no store.
_SHARD_DOCUMENTS = 16384
_SHARD_CHARS = 4 * 2**20
# Shards queued per worker beyond the one it tokenizes: keeps every worker busy while the reader
# runs ahead, and bounds the text held in memory at (workers * (1 + this) + 1) * _SHARD_CHARS.
_SHARDS_AHEAD_PER_WORKER = 2
# How long the other processes of a run wait for process 0 to prepare a store: tokenizing is
# ~220k tokens/s on 2 cores, so a day covers ~19B tokens there; beyond, run `prepare` first.
PREPARE_WAIT_S = 24 * 3600.0


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where the text comes from and how it is cut. Built from `config.data` (all keys required)."""

    source: str  # one of SOURCES
    path: str  # 'files': comma-separated globs of training files
    val_path: str  # 'files': comma-separated globs of validation files ('' = hash split of path)
    hf_name: str  # 'hf': dataset name
    hf_config: str  # 'hf': dataset config name ('' = none)
    train_split: str  # 'hf': split names
    val_split: str  # 'hf': '' = hash split of train_split
    text_field: str  # column holding the document text (jsonl / parquet / hf)
    val_fraction: float  # share of documents in validation when splitting by hash
    tokenizer: str  # 'byte', 'auto' (the model's own tokenizer.json if it has one, else byte), a path
    seq_len: int
    cache_dir: str  # where the splits' token stores are prepared ('' = the trainer's choice)
    # 'files' / 'hf': read through `datasets` streaming (no Arrow copy of the raw data, whatever
    # its size) or, False, through its Arrow cache; the same documents either way. A default, so
    # that the specs saved in earlier checkpoints and the stdlib specs built in code still load.
    streaming: bool = True

    def __post_init__(self):
        if self.source not in SOURCES:
            raise DataError(f"data.source={self.source!r} is not one of {SOURCES}")
        if self.seq_len < 1:
            raise DataError(f"data.seq_len={self.seq_len} must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d) -> "DataSpec":
        """From config.data (its LOADER_KEYS, which say how batches are read, not what they
        hold, are left out) or a saved to_dict()."""
        return cls(**{k: v for k, v in dict(d).items() if k not in LOADER_KEYS})


# ----------------------------------------------------------------------------- tokenizers


class ByteTokenizer:
    """Bytes 0..255 as ids, plus BYTE_BOS_ID at the start of every document."""

    name = "byte"
    vocab_size = BYTE_VOCAB_SIZE
    fingerprint = "byte-v1"

    def encode_document(self, text: bytes | str) -> np.ndarray:
        if isinstance(text, str):
            text = text.encode("utf-8")
        out = np.empty(len(text) + 1, np.int32)
        out[0] = BYTE_BOS_ID
        out[1:] = np.frombuffer(text, np.uint8)
        return out


class HFTokenizer:
    """A Hugging Face tokenizer.json; its post-processor adds BOS/EOS as the model expects."""

    def __init__(self, path: str):
        import tokenizers  # only needed for this tokenizer

        self.path = os.path.abspath(path)
        self.name = self.path
        try:
            self._tok = tokenizers.Tokenizer.from_file(self.path)
        except Exception as e:  # the library raises a bare Exception for bad files
            raise DataError(f"cannot read tokenizer {path}: {e}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        with open(self.path, "rb") as f:
            self.fingerprint = hashlib.sha256(f.read()).hexdigest()

    def encode_document(self, text: bytes | str) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self._tok.encode(text, add_special_tokens=True).ids, np.int32)

    def encode_batch(self, texts: Sequence[bytes | str]) -> list[np.ndarray]:
        texts = [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t for t in texts]
        # encode_batch_fast (tokenizers >= 0.20): the same ids, without the character offsets
        # that nothing here reads.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [np.asarray(e.ids, np.int32) for e in encode(texts, add_special_tokens=True)]


Tokenizer = ByteTokenizer | HFTokenizer


def load_tokenizer(spec: str) -> Tokenizer:
    """'byte', a tokenizer.json path, or a folder holding tokenizer.json."""
    if spec == "byte":
        return ByteTokenizer()
    path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise DataError(f"tokenizer {spec!r} is neither 'byte' nor a tokenizer.json (or a folder "
                        "holding one)")
    return HFTokenizer(path)


# ----------------------------------------------------------------------------- documents


def _hash_unit(key: bytes) -> float:
    """A number in [0, 1) from sha256(key): the deterministic split rule."""
    return int(hashlib.sha256(key).hexdigest()[:8], 16) / 16**8


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str | None = None) -> list[str]:
    """Relative paths of the stdlib's .py files outside the skipped dirs, sorted."""
    root = root or stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-"))
        rel = os.path.relpath(dirpath, root)
        out += [os.path.normpath(os.path.join(rel, f)) for f in filenames if f.endswith(".py")]
    return sorted(out)


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # in chunks: files may be large


def _file_stat(path: str) -> list[int]:
    """[size, mtime_ns]: what says a file is unchanged without re-hashing it."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


@dataclasses.dataclass
class _Reading:
    """A split's documents, read one at a time (`documents`), and what they were read from.

    manifest: the split's manifest, complete (num_documents, sha256) after finish();
    file_stats: {name in the manifest: [size, mtime_ns]} of the files read (only in the store's
    manifest: it is machine-specific, so it is not part of the split's sha256).
    """

    documents: Iterator[bytes | str]
    manifest: dict[str, Any]
    file_stats: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    count: int = 0
    # Progress: source rows (files, records) read so far, kept or not, and how many the source
    # holds (None: unknown); what prepare's progress bar and its ETA count.
    scanned: int = 0
    total_rows: int | None = None

    def __iter__(self) -> Iterator[bytes | str]:
        for doc in self.documents:
            self.count += 1
            yield doc

    def finish(self, spec: DataSpec, split: str) -> dict[str, Any]:
        """The manifest, once every document was read; an empty split is a DataError."""
        if "sha256" in self.manifest:
            return self.manifest
        if not self.count:
            raise DataError(f"the {split} split of data.source={spec.source!r} is empty "
                            f"(val_fraction={spec.val_fraction})")
        self.manifest["num_documents"] = self.count
        self.manifest["sha256"] = hashlib.sha256(
            json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()
        return self.manifest


def _stdlib_split_files(spec: DataSpec, split: str) -> list[tuple[str, str]]:
    root = stdlib_root()
    return [(rel, os.path.join(root, rel)) for rel in stdlib_files(root)
            if (_hash_unit(rel.encode()) < spec.val_fraction) == (split == "validation")]


def _stdlib_documents(spec: DataSpec, split: str) -> _Reading:
    files = []
    manifest = {"source": "stdlib", "root": stdlib_root(), "python": sys.version.split()[0],
                "split": split, "rule": f"sha256(relpath)[:8]/16**8 < {spec.val_fraction} -> "
                "validation", "files": files}
    reading = _Reading(iter(()), manifest)
    listed = _stdlib_split_files(spec, split)
    reading.total_rows = len(listed)

    def read() -> Iterator[bytes]:
        for rel, path in listed:
            reading.file_stats[rel] = _file_stat(path)  # before reading: a later edit re-hashes
            with open(path, "rb") as f:
                data = f.read()
            files.append([rel, hashlib.sha256(data).hexdigest()])
            reading.scanned += 1
            yield data

    reading.documents = read()
    return reading


def _expand(globs: str) -> list[str]:
    paths = []
    for pattern in [g.strip() for g in globs.split(",") if g.strip()]:
        found = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not found:
            raise DataError(f"data.path: no file matches {pattern!r}")
        paths += found
    return paths


def _absolute_globs(globs: str) -> list[str]:
    return [os.path.abspath(os.path.expanduser(g.strip())) for g in globs.split(",") if g.strip()]


def _builder_for(paths: list[str]) -> str:
    kinds = set()
    for p in paths:
        ext = os.path.splitext(p)[1].lower()
        if ext in (".json", ".jsonl"):
            kinds.add("json")
        elif ext == ".parquet":
            kinds.add("parquet")
        elif ext in _TEXT_EXTENSIONS:
            kinds.add("text")
        else:
            raise DataError(f"{p}: unknown file type {ext!r} (text {_TEXT_EXTENSIONS}, .json/.jsonl, "
                            ".parquet)")
    if len(kinds) > 1:
        raise DataError(f"data files mix formats {sorted(kinds)}; use one format per split")
    return kinds.pop()


def _texts(dataset, text_field: str, where: str, keep: Callable[[str], bool] | None,
           reading: _Reading) -> Iterator[str]:
    """The non-empty texts of a datasets.Dataset or IterableDataset (streaming) column, a batch of
    rows at a time (a memory-mapped Arrow table or a stream: only the batch is in memory), those
    `keep` accepts; reading.scanned counts the rows."""
    columns = dataset.column_names  # None for a stream whose features are not known up front
    if columns is not None and text_field not in columns:
        raise DataError(f"{where}: no column {text_field!r} (columns: {columns}); set "
                        "data.text_field")

    def read() -> Iterator[str]:
        rows = dataset if columns is None else dataset.select_columns([text_field])
        for batch in rows.iter(batch_size=1024):
            if text_field not in batch:
                raise DataError(f"{where}: no column {text_field!r} (columns: {sorted(batch)}); "
                                "set data.text_field")
            for text in batch[text_field]:
                reading.scanned += 1
                if text and (keep is None or keep(text)):
                    yield text

    return read()


def _count_rows(paths: list[str], builder: str) -> int:
    """Rows in local data files, for the progress bar's ETA: parquet from its metadata, a jsonl
    file's lines (counted in 16 MiB reads: a small share of the time tokenizing takes), a text
    file is one row."""
    if builder == "text":
        return len(paths)
    if builder == "parquet":
        import pyarrow.parquet as pq  # noqa: PLC0415 (a dependency of datasets)

        return sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
    total = 0
    for p in paths:
        with open(p, "rb") as f:
            last = b"\n"
            while chunk := f.read(16 * 2**20):
                total += chunk.count(b"\n")
                last = chunk[-1:]
            total += last != b"\n"  # a last line without its newline
    return total


def _hash_rule(spec: DataSpec, split: str) -> Callable[[str], bool]:
    """Keeps the texts of `split` under the hash rule on the document's text."""
    return lambda t: (_hash_unit(t.encode("utf-8")) < spec.val_fraction) == (split == "validation")


def _local_split_files(spec: DataSpec, split: str) -> list[tuple[str, str]]:
    use_val_files = split == "validation" and spec.val_path
    return [(os.path.abspath(p), p) for p in _expand(spec.val_path if use_val_files else spec.path)]


def _local_documents(spec: DataSpec, split: str, cache_dir: str) -> _Reading:
    import datasets  # noqa: PLC0415  (slow import; only this source needs it)

    listed = _local_split_files(spec, split)
    paths = [p for _, p in listed]
    builder = _builder_for(paths)
    reading = _Reading(iter(()), {})
    files = []
    for name, path in listed:
        reading.file_stats[name] = _file_stat(path)
        files.append([name, _file_sha256(path)])
    reading.manifest = {"source": "files", "split": split, "files": files,
                        "rule": "val_path files" if spec.val_path else
                        f"sha256(text)[:8]/16**8 < {spec.val_fraction} -> validation"}
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    ds = datasets.load_dataset(builder, data_files=paths, split="train", cache_dir=cache_dir,
                               streaming=spec.streaming, **kwargs)
    reading.total_rows = _count_rows(paths, builder)
    reading.documents = _texts(ds, "text" if builder == "text" else spec.text_field,
                               ",".join(paths), None if spec.val_path else _hash_rule(spec, split),
                               reading)
    return reading


def _hf_dataset(spec: DataSpec, split: str, cache_dir: str):
    """(the datasets.Dataset, or IterableDataset when spec.streaming, of `split`, its split name
    in the dataset)."""
    import datasets  # noqa: PLC0415

    name = spec.val_split if (split == "validation" and spec.val_split) else spec.train_split
    return datasets.load_dataset(spec.hf_name, spec.hf_config or None, split=name,
                                 cache_dir=cache_dir, streaming=spec.streaming), name


def _hf_fingerprint(spec: DataSpec, cache_dir: str) -> str:
    """What names a Hugging Face dataset's version without reading its rows: its builder's hash
    (on the hub, derived from the dataset repository's revision), the same whether the rows are
    then streamed or not."""
    import datasets  # noqa: PLC0415

    return datasets.load_dataset_builder(spec.hf_name, spec.hf_config or None,
                                         cache_dir=cache_dir).hash


def _hf_documents(spec: DataSpec, split: str, cache_dir: str) -> _Reading:
    ds, name = _hf_dataset(spec, split, cache_dir)
    manifest = {"source": "hf", "split": split, "name": spec.hf_name, "config": spec.hf_config,
                "hf_split": name, "fingerprint": _hf_fingerprint(spec, cache_dir),
                "rule": f"hf split {name!r}" if spec.val_split or split == "train" else
                f"sha256(text)[:8]/16**8 < {spec.val_fraction} -> validation"}
    reading = _Reading(iter(()), manifest)
    splits = ds.info.splits or {}
    reading.total_rows = (splits[name].num_examples or None) if name in splits else None
    reading.documents = _texts(ds, spec.text_field, f"{spec.hf_name}[{name}]",
                               None if spec.val_split else _hash_rule(spec, split), reading)
    return reading


def _read_documents(spec: DataSpec, split: str, cache_dir: str) -> _Reading:
    if split not in ("train", "validation"):
        raise DataError(f"split={split!r} is not 'train' or 'validation'")
    if spec.source == "stdlib":
        return _stdlib_documents(spec, split)
    if spec.source == "files":
        return _local_documents(spec, split, cache_dir)
    return _hf_documents(spec, split, cache_dir)


def load_documents(spec: DataSpec, split: str, cache_dir: str) -> tuple[list, dict[str, Any]]:
    """(documents as bytes or str, manifest) of split 'train' or 'validation', all in memory (for
    small uses: calibration; training reads a token store, load_split)."""
    reading = _read_documents(spec, split, cache_dir)
    documents = list(reading)
    return documents, reading.finish(spec, split)


# ----------------------------------------------------------------------------- token streams


@dataclasses.dataclass
class TokenStream:
    """A split's documents tokenized and concatenated.

    tokens: [num_tokens] integer ids (a token store's read-only uint16/uint32 memory map, or
    tokenize's in-memory int32); doc_starts: [num_documents] int64 offsets into tokens, ascending,
    doc_starts[0] == 0.
    """

    tokens: np.ndarray
    doc_starts: np.ndarray

    def __post_init__(self):
        if len(self.tokens) < 2:
            raise DataError(f"a token stream needs at least 2 tokens, got {len(self.tokens)}")

    def num_windows(self, seq_len: int, full_only: bool) -> int:
        """Windows of seq_len targets: full ones only (training), or all with the last padded."""
        n_targets = len(self.tokens) - 1
        return n_targets // seq_len if full_only else math.ceil(n_targets / seq_len)


def tokenize(documents: Sequence[bytes | str], tokenizer: Tokenizer) -> TokenStream:
    """The documents tokenized in memory (int32): for one text file (evaluate --text_file), a
    calibration set, and as the plain reference the token stores are tested against."""
    if isinstance(tokenizer, HFTokenizer):
        pieces = []
        for i in range(0, len(documents), 256):  # batches: the Rust encoder runs them in parallel
            pieces += tokenizer.encode_batch(documents[i:i + 256])
    else:
        pieces = [tokenizer.encode_document(d) for d in documents]
    pieces = [p for p in pieces if len(p)]
    lengths = np.array([len(p) for p in pieces], np.int64)
    doc_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return TokenStream(np.concatenate(pieces).astype(np.int32), doc_starts)


def _encoded_batches(documents: Iterable[bytes | str], tokenizer: Tokenizer
                     ) -> Iterator[list[np.ndarray]]:
    """The documents' token ids, a batch of documents at a time (bounded in count and text)."""
    batch, chars = [], 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc)
        if len(batch) == _PREPARE_BATCH_DOCUMENTS or chars >= _PREPARE_BATCH_CHARS:
            yield _encode(batch, tokenizer)
            batch, chars = [], 0
    if batch:
        yield _encode(batch, tokenizer)


def _encode(documents: list[bytes | str], tokenizer: Tokenizer) -> list[np.ndarray]:
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.encode_batch(documents)
    return [tokenizer.encode_document(d) for d in documents]


def _selection(spec: DataSpec, split: str) -> dict[str, Any]:
    """What chooses a split's documents: with the tokenizer's fingerprint, a store's identity."""
    if spec.source == "stdlib":
        return {"source": "stdlib", "split": split, "root": stdlib_root(),
                "val_fraction": spec.val_fraction}
    common = {"source": spec.source, "split": split, "text_field": spec.text_field,
              "val_fraction": spec.val_fraction}
    if spec.source == "files":
        return {**common, "path": _absolute_globs(spec.path),
                "val_path": _absolute_globs(spec.val_path)}
    return {**common, "hf_name": spec.hf_name, "hf_config": spec.hf_config,
            "train_split": spec.train_split, "val_split": spec.val_split}


def store_path(spec: DataSpec, tokenizer: Tokenizer, split: str, cache_dir: str) -> str:
    """The folder of a split's token store: cache_dir/tokens-<split>-<hash of _selection and the
    tokenizer's fingerprint>."""
    key = json.dumps({"format_version": token_store.FORMAT_VERSION,
                      "selection": _selection(spec, split),
                      "tokenizer": tokenizer.fingerprint}, sort_keys=True)
    return os.path.join(os.path.abspath(cache_dir),
                        f"tokens-{split}-{hashlib.sha256(key.encode()).hexdigest()[:20]}")


def default_workers() -> int:
    """The cores this process may run on (its CPU affinity, which a container or a job scheduler
    sets), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def prepare_split(spec: DataSpec, tokenizer: Tokenizer, split: str, cache_dir: str, *,
                  workers: int | None = None, progress: bool | None = None,
                  shard_documents: int = _SHARD_DOCUMENTS, shard_chars: int = _SHARD_CHARS) -> str:
    """Tokenizes a split once into its token store (store_path) and returns the store's path; a
    complete store is left as it is.

    The documents are read in order and cut into shards (at shard_documents documents or
    shard_chars characters, whichever comes first); `workers` processes (None: default_workers())
    tokenize them, each shard into its own file under STORE.shards/, named by its index and the
    sha256 of its documents; the store is their concatenation. A prepare killed mid-way leaves its
    finished shards, which the next one (same documents, same tokenizer) uses instead of
    tokenizing them again; the store's bytes are the same whatever the number of workers, the
    shard bounds or the kills. A progress bar (rows read of the source's total, documents,
    tokens, tokens/s, ETA) goes to stderr (progress None: when it is a terminal).

    All or nothing (token_store.write_store_from_shards): bad input (a DataError) leaves neither
    the store nor its shards; any other failure (a kill) leaves only the shards folder.
    """
    path = store_path(spec, tokenizer, split, cache_dir)
    if token_store.is_complete(path):
        return path
    if shard_documents < 1 or shard_chars < 1:
        raise DataError(f"shard bounds must be >= 1, got {shard_documents} documents, "
                        f"{shard_chars} characters")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise DataError(f"workers={workers} must be >= 1")
    token_store.token_dtype(tokenizer.vocab_size)  # a vocabulary too large: before reading
    reading = _read_documents(spec, split, cache_dir)

    def describe() -> dict[str, Any]:
        return {"selection": _selection(spec, split), "source": reading.finish(spec, split),
                "file_stats": reading.file_stats,
                "tokenizer": {"name": tokenizer.name, "fingerprint": tokenizer.fingerprint,
                              "vocab_size": tokenizer.vocab_size}}

    shards_dir = path + SHARDS_SUFFIX
    os.makedirs(shards_dir, exist_ok=True)
    try:
        files = _tokenize_shards(reading, tokenizer, shards_dir, workers, shard_documents,
                                 shard_chars, f"prepare {split}", progress)
        token_store.write_store_from_shards(path, files, tokenizer.vocab_size, describe)
    except DataError:
        shutil.rmtree(shards_dir, ignore_errors=True)  # bad input: nothing to resume
        raise
    shutil.rmtree(shards_dir, ignore_errors=True)
    return path


SHARDS_SUFFIX = ".shards"


def _cut_shards(reading: _Reading, max_documents: int, max_chars: int
                ) -> Iterator[tuple[list[bytes | str], int]]:
    """(documents, source rows read up to the shard's last one) of consecutive shards."""
    shard, chars = [], 0
    for doc in reading:
        shard.append(doc)
        chars += len(doc)
        if len(shard) == max_documents or chars >= max_chars:
            yield shard, reading.scanned
            shard, chars = [], 0
    if shard:
        yield shard, reading.scanned


def _shard_name(index: int, documents: list[bytes | str]) -> str:
    """shard-<index>-<sha256 of the documents, each length-prefixed>: a shard file of other text
    (an input edited between a kill and the rerun) is never taken for this one."""
    digest = hashlib.sha256()
    for doc in documents:
        raw = doc.encode("utf-8") if isinstance(doc, str) else doc
        digest.update(len(raw).to_bytes(8, "little"))
        digest.update(raw)
    return f"shard-{index:07d}-{digest.hexdigest()[:16]}"


def _worker_tokenizer(tokenizer: Tokenizer) -> str | None:
    """What a worker process loads the tokenizer from (load_tokenizer's spec), None when it
    cannot (another Tokenizer class, such as a test's): then the shards are tokenized here."""
    if type(tokenizer) is ByteTokenizer:
        return "byte"
    if type(tokenizer) is HFTokenizer:
        return tokenizer.path
    return None


_worker_state: dict[str, Any] = {}


def _die_with_parent(parent_pid: int) -> None:
    """A worker exits when the prepare that started it is killed (Linux: PR_SET_PDEATHSIG);
    otherwise a SIGKILLed prepare leaves its workers waiting for work that never comes."""
    if sys.platform.startswith("linux"):
        import ctypes  # noqa: PLC0415
        import signal  # noqa: PLC0415

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(1)


def _init_worker(tokenizer_spec: str, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    # One thread per worker: the workers are the parallelism; the Rust encoder's own thread pool
    # in each of them would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_state["tokenizer"] = load_tokenizer(tokenizer_spec)


def _tokenize_shard(documents: list[bytes | str], file: str,
                    tokenizer: Tokenizer | None = None) -> tuple[int, int]:
    """Writes one shard file (in a worker: with its tokenizer); (documents, tokens)."""
    tokenizer = tokenizer or _worker_state["tokenizer"]
    pieces = [p for batch in _encoded_batches(documents, tokenizer) for p in batch]
    return token_store.write_shard(file, pieces, tokenizer.vocab_size)


def _tokenize_shards(reading: _Reading, tokenizer: Tokenizer, shards_dir: str, workers: int,
                     shard_documents: int, shard_chars: int, desc: str,
                     progress: bool | None) -> list[str]:
    """Every shard's file under shards_dir, in document order: finished ones kept, the others
    tokenized by `workers` processes (spawned once a second shard exists, so a small split costs
    no process start; here when workers == 1 or the tokenizer cannot be sent)."""
    import concurrent.futures  # noqa: PLC0415
    import multiprocessing  # noqa: PLC0415

    from tqdm import tqdm  # noqa: PLC0415

    worker_spec = _worker_tokenizer(tokenizer) if workers > 1 else None
    files: list[str] = []
    pending: list[tuple[Any, int]] = []  # (future or (docs, tokens), rows read), oldest first
    pool = None
    held = None  # the first shard, until a second one says whether to start the workers
    bar = tqdm(total=reading.total_rows, desc=desc, unit=" rows", dynamic_ncols=True,
               disable=None if progress is None else not progress, smoothing=0.05)
    done = {"documents": 0, "tokens": 0, "start": time.perf_counter(), "rows": 0}

    def finish(result: tuple[int, int], rows: int) -> None:
        done["documents"] += result[0]
        done["tokens"] += result[1]
        if rows > done["rows"]:  # shards finish out of order only by the held first one
            bar.update(rows - done["rows"])
            done["rows"] = rows
        rate = done["tokens"] / max(time.perf_counter() - done["start"], 1e-9)
        bar.set_postfix_str(f"{done['documents']:,} docs, {done['tokens']:,} tokens, "
                            f"{rate:,.0f} tokens/s", refresh=False)

    def drain(keep: int) -> None:
        while len(pending) > keep:
            job, rows = pending.pop(0)
            finish(job.result() if hasattr(job, "result") else job, rows)

    try:
        for index, (documents, rows) in enumerate(_cut_shards(reading, shard_documents,
                                                              shard_chars)):
            file = os.path.join(shards_dir, _shard_name(index, documents))
            files.append(file)
            if os.path.isfile(file):  # finished by a killed run
                job = token_store.shard_counts(file)
            elif worker_spec is None:
                job = _tokenize_shard(documents, file, tokenizer)
            elif held is None and pool is None:
                held = (documents, file, rows)
                continue
            else:
                if pool is None:
                    pool = concurrent.futures.ProcessPoolExecutor(
                        workers, mp_context=multiprocessing.get_context("spawn"),
                        initializer=_init_worker, initargs=(worker_spec, os.getpid()))
                if held is not None:
                    pending.append((pool.submit(_tokenize_shard, *held[:2]), held[2]))
                    held = None
                job = pool.submit(_tokenize_shard, documents, file)
            pending.append((job, rows))
            drain(workers * (1 + _SHARDS_AHEAD_PER_WORKER))
        if held is not None:  # the only shard to tokenize: here, no process started
            pending.append((_tokenize_shard(held[0], held[1], tokenizer), held[2]))
        drain(0)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return files


def _file_changes(stored: dict[str, Any], files: list[tuple[str, str]]) -> list[str]:
    """What differs between the files a store was prepared from and `files` ([(name, path)]):
    names new or gone, and files whose size or mtime changed and whose sha256 then differs."""
    recorded = dict(stored["source"]["files"])
    stats = stored["file_stats"]
    changes = [f"{name} is not in the store" for name, _ in files if name not in recorded]
    changes += [f"{name} is in the store but no longer in the config's files"
                for name in recorded if name not in dict(files)]
    for name, path in files:
        if name in recorded and _file_stat(path) != stats.get(name):
            if _file_sha256(path) != recorded[name]:
                changes.append(f"{name} changed since the store was prepared")
    return changes


def _disagreements(spec: DataSpec, tokenizer: Tokenizer, split: str, cache_dir: str,
                   stored: dict[str, Any]) -> list[str]:
    """How a store's manifest disagrees with what the config names now ([] = it agrees)."""
    out = []
    selection = _selection(spec, split)
    if stored["selection"] != selection:
        keys = sorted(k for k in selection.keys() | stored["selection"].keys()
                      if selection.get(k) != stored["selection"].get(k))
        out += [f"{k}: store {stored['selection'].get(k)!r}, config {selection.get(k)!r}"
                for k in keys]
    if stored["tokenizer"]["fingerprint"] != tokenizer.fingerprint:
        out.append(f"tokenizer: the store's is {stored['tokenizer']['name']} (fingerprint "
                   f"{stored['tokenizer']['fingerprint'][:16]}), the config's {tokenizer.name} "
                   f"(fingerprint {tokenizer.fingerprint[:16]})")
    if spec.source == "stdlib":
        changes = _file_changes(stored, _stdlib_split_files(spec, split))
    elif spec.source == "files":
        changes = _file_changes(stored, _local_split_files(spec, split))
    else:
        now = _hf_fingerprint(spec, cache_dir)
        changes = ([] if now == stored["source"]["fingerprint"] else
                   [f"dataset {spec.hf_name}: fingerprint {stored['source']['fingerprint']} in "
                    f"the store, {now} now"])
    if len(changes) > 5:
        changes = changes[:5] + [f"and {len(changes) - 5} more files"]
    return out + changes


def open_split(spec: DataSpec, tokenizer: Tokenizer, split: str, cache_dir: str
               ) -> tuple[TokenStream, dict[str, Any]]:
    """(TokenStream of memory maps, manifest) of a prepared split; DataError naming what differs
    when the store's manifest disagrees with the config (_disagreements)."""
    path = store_path(spec, tokenizer, split, cache_dir)
    tokens, doc_starts, stored = token_store.open_store(path)
    differences = _disagreements(spec, tokenizer, split, cache_dir, stored)
    if differences:
        raise DataError(f"token store {path} disagrees with the config: "
                        f"{'; '.join(differences)}; remove the folder to prepare it again")
    manifest = {**stored["source"],
                "tokenizer": {"name": tokenizer.name, "fingerprint": tokenizer.fingerprint},
                "num_tokens": stored["num_tokens"],
                "store": {"path": path, "format_version": stored["format_version"],
                          "dtype": stored["dtype"], "tokens_sha256": stored["tokens_sha256"]}}
    return TokenStream(tokens, doc_starts), manifest


def _process_index() -> int:
    """This process's index among a jax run's processes; 0 where jax is not in use (the prepare
    command does not import it)."""
    jax = sys.modules.get("jax")
    return 0 if jax is None else jax.process_index()


def load_split(spec: DataSpec, tokenizer: Tokenizer, split: str, cache_dir: str, *,
               process_index: int | None = None, wait_s: float = PREPARE_WAIT_S,
               workers: int | None = None) -> tuple[TokenStream, dict[str, Any]]:
    """The split's TokenStream (memory maps of its token store under cache_dir) and manifest
    (the split's sources and sha256, tokenizer, num_tokens, store).

    A missing store is prepared first (prepare_split, with `workers` processes) by process 0
    (process_index; None = jax's); the other processes wait up to wait_s seconds for it to
    appear, then open it.
    """
    path = store_path(spec, tokenizer, split, cache_dir)
    if not token_store.is_complete(path):
        index = _process_index() if process_index is None else process_index
        if index == 0:
            prepare_split(spec, tokenizer, split, cache_dir, workers=workers)
        else:
            token_store.wait_for_store(path, wait_s, f"process {index}")
    return open_split(spec, tokenizer, split, cache_dir)


# ----------------------------------------------------------------------------- windows and batches


BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def window_rows(stream: TokenStream, window_ids: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """Packed rows for the given windows; each value [len(window_ids), seq_len] int32.

    Window w holds targets stream[w*seq_len + 1 : w*seq_len + seq_len + 1]; positions past the end
    of the stream (the last evaluation window) and window ids < 0 (padding rows) get loss_mask 0.
    """
    window_ids = np.asarray(window_ids, np.int64)
    n = len(stream.tokens)
    idx = window_ids[:, None] * seq_len + np.arange(seq_len + 1)[None, :]  # [rows, seq_len + 1]
    valid = (idx < n) & (window_ids[:, None] >= 0)
    safe = np.where(valid, idx, 0)
    tokens = np.where(valid, stream.tokens[safe], 0)
    doc = np.searchsorted(stream.doc_starts, safe, side="right") - 1  # document of each token
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    doc_in, doc_tgt = doc[:, :-1], doc[:, 1:]
    segment_ids = doc_in - doc_in[:, :1] + 1
    # A document that began before the window restarts its positions at the window start.
    start = np.maximum(stream.doc_starts[doc_in], idx[:, :1])
    positions = idx[:, :-1] - start
    loss_mask = valid[:, 1:] & (doc_tgt == doc_in)
    return {
        "inputs": inputs.astype(np.int32),
        "targets": targets.astype(np.int32),
        "segment_ids": np.where(valid[:, :-1], segment_ids, 0).astype(np.int32),
        "positions": np.where(valid[:, :-1], positions, 0).astype(np.int32),
        "loss_mask": loss_mask.astype(np.int32),
    }


@lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_windows: int) -> np.ndarray:
    # numpy's Generator stream is fixed for a given numpy version, which is what resume needs.
    return np.random.default_rng([seed, epoch]).permutation(num_windows)


def train_window_ids(seed: int, step: int, batch_size: int, num_windows: int,
                     rows: np.ndarray | None = None) -> np.ndarray:
    """Window ids of the global batch `step` (or of its `rows`): a pure function of the arguments.

    Sample i = step * batch_size + row walks through a fresh permutation of the windows every epoch,
    so every window is seen once per epoch and a resumed run sees exactly the same batches.
    """
    rows = np.arange(batch_size) if rows is None else np.asarray(rows)
    sample = step * batch_size + rows
    epochs, within = np.divmod(sample, num_windows)
    out = np.empty(len(rows), np.int64)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        out[sel] = _epoch_permutation(seed, int(epoch), num_windows)[within[sel]]
    return out


def eval_window_batches(stream: TokenStream, seq_len: int, batch_size: int,
                        max_batches: int) -> Iterator[np.ndarray]:
    """Window ids of the evaluation batches: every window in order (max_batches < 0) or the first
    max_batches * batch_size; the last batch is padded with -1 (rows that score nothing)."""
    num = stream.num_windows(seq_len, full_only=False)
    if max_batches >= 0:
        num = min(num, max_batches * batch_size)
    for start in range(0, num, batch_size):
        ids = np.full(batch_size, -1, np.int64)
        chunk = np.arange(start, min(start + batch_size, num))
        ids[:len(chunk)] = chunk
        yield ids


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats per token) of the tokens' empirical frequency distribution. tokens: any
    shape of non-negative ids, in memory or a memory map: counted 2**20 at a time, so the int64
    copies np.bincount makes stay 8 MB whatever the length."""
    flat = np.asarray(tokens).reshape(-1)
    counts = np.zeros(0, np.int64)
    for start in range(0, len(flat), 2**20):
        chunk = np.bincount(flat[start:start + 2**20])
        if len(chunk) > len(counts):
            counts = np.pad(counts, (0, len(chunk) - len(counts)))
        counts[:len(chunk)] += chunk
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# ----------------------------------------------------------------------------- the prepare command


def _tokenizer_of(config) -> str:
    """The tokenizer a new training run of `config` uses (train._new_run's rule): data.tokenizer,
    or for 'auto' the init checkpoint's own, or bytes when training from scratch."""
    if config.data.tokenizer != "auto":
        return config.data.tokenizer
    if not config.init_checkpoint:
        return "byte"
    from gqa_uptrain import loading  # noqa: PLC0415 (jax; only for 'auto')

    return loading.inspect(config.init_checkpoint, "config.init_checkpoint").require_tokenizer(
        "--config.data.tokenizer=PATH/tokenizer.json")


def prepare(config, workdir: str = "", workers: int | None = None) -> Iterator[str]:
    """Prepares the train and validation stores of a training config (the stores its training
    run would open: in config.data.cache_dir, or WORKDIR/data_cache when that is'') with
    `workers` processes (None: default_workers()); yields one line per split."""
    d = config.data.to_dict()
    if not (d["cache_dir"] or workdir):
        raise DataError("data.cache_dir is '' (= the run's WORKDIR/data_cache): pass --workdir=DIR "
                        "(the run's) or --config.data.cache_dir=DIR")
    d["cache_dir"] = os.path.abspath(d["cache_dir"] or os.path.join(workdir, "data_cache"))
    spec = DataSpec.from_dict(d)
    tokenizer = load_tokenizer(_tokenizer_of(config))
    for split in ("train", "validation"):
        start = time.perf_counter()
        existed = token_store.is_complete(store_path(spec, tokenizer, split, spec.cache_dir))
        _, manifest = load_split(spec, tokenizer, split, spec.cache_dir, process_index=0,
                                 workers=workers)
        how = ("already prepared" if existed else
               f"prepared in {time.perf_counter() - start:.1f} s")
        yield (f"{split}: {manifest['num_tokens']:,} tokens ({manifest['store']['dtype']}), "
               f"{manifest['num_documents']:,} documents: {manifest['store']['path']} ({how})")


def main(argv):
    from absl import flags  # noqa: PLC0415

    from gqa_uptrain import cli  # noqa: PLC0415

    if argv[1:] != ["prepare"]:
        cli.fail(f"expected the command `prepare`, got {' '.join(argv[1:]) or 'none'!r} "
                 "(python -m gqa_uptrain.data prepare --config=...)", cli.USAGE_EXIT)
    try:
        for line in prepare(flags.FLAGS.config, flags.FLAGS.workdir or "",
                            flags.FLAGS.workers or None):
            print(line, flush=True)
    except (ValueError, OSError) as e:  # DataError is a ValueError
        cli.fail(e)


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    from gqa_uptrain import cli

    config_flags.DEFINE_config_file(
        "config", None, "the training config whose data to prepare, e.g. "
        "configs/pretrain.py:smoke; override any key with --config.KEY=VALUE", lock_config=True)
    flags.DEFINE_string("workdir", None, "the training run's directory: with data.cache_dir '' "
                        "the stores go to WORKDIR/data_cache, where that run looks for them")
    flags.DEFINE_integer("workers", 0, "processes that tokenize (0 = the cores this process may "
                         "use); the store is the same bytes whatever the number", lower_bound=0)
    flags.mark_flags_as_required(["config"])
    cli.run(main, description=__doc__.split("\n\n")[0], config_flag="config")

"""Training and evaluation data: sources, tokenizers, packing, and a batch order that is a pure
function of (seed, step).

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

Packing: a split's documents are tokenized and concatenated into one stream (TokenStream). Window w
covers stream[w*seq_len : w*seq_len + seq_len + 1]: inputs are its first seq_len tokens, targets the
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
import sys
import sysconfig
from functools import lru_cache
from typing import Any, Iterator, Sequence

import numpy as np

SOURCES = ("stdlib", "files", "hf")
BYTE_VOCAB_SIZE = 257
BYTE_BOS_ID = 256
# Directories of the stdlib left out of the corpus: the test suites (31 MB that would dominate the
# 12 MB of library code), third-party packages, and the build's machine-specific config dir.
_STDLIB_SKIP_DIRS = ("test", "tests", "idle_test", "site-packages", "__pycache__")
_TEXT_EXTENSIONS = (".txt", ".text", ".md", ".py", ".rst")
_CACHE_VERSION = 1


class DataError(ValueError):
    """A data source, split or tokenizer that cannot be used."""


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
    cache_dir: str  # where tokenized splits are cached ('' = the trainer's choice)

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
        return cls(**dict(d))


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
        return [np.asarray(e.ids, np.int32)
                for e in self._tok.encode_batch(texts, add_special_tokens=True)]


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


def _stdlib_documents(spec: DataSpec, split: str) -> tuple[list[bytes], dict[str, Any]]:
    root = stdlib_root()
    docs, files = [], []
    for rel in stdlib_files(root):
        in_val = _hash_unit(rel.encode()) < spec.val_fraction
        if in_val != (split == "validation"):
            continue
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read()
        docs.append(data)
        files.append([rel, hashlib.sha256(data).hexdigest()])
    manifest = {"source": "stdlib", "root": root, "python": sys.version.split()[0],
                "split": split, "rule": f"sha256(relpath)[:8]/16**8 < {spec.val_fraction} -> "
                "validation", "files": files}
    return docs, manifest


def _expand(globs: str) -> list[str]:
    paths = []
    for pattern in [g.strip() for g in globs.split(",") if g.strip()]:
        found = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not found:
            raise DataError(f"data.path: no file matches {pattern!r}")
        paths += found
    return paths


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


def _texts(dataset, text_field: str, where: str) -> list[str]:
    if text_field not in dataset.column_names:
        raise DataError(f"{where}: no column {text_field!r} (columns: {dataset.column_names}); set "
                        "data.text_field")
    return [t for t in dataset[text_field] if t]


def _hash_filter(texts: list[str], spec: DataSpec, split: str) -> list[str]:
    return [t for t in texts
            if (_hash_unit(t.encode("utf-8")) < spec.val_fraction) == (split == "validation")]


def _local_documents(spec: DataSpec, split: str, cache_dir: str) -> tuple[list[str], dict]:
    import datasets  # noqa: PLC0415  (slow import; only this source needs it)

    use_val_files = split == "validation" and spec.val_path
    paths = _expand(spec.val_path if use_val_files else spec.path)
    builder = _builder_for(paths)
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    ds = datasets.load_dataset(builder, data_files=paths, split="train", cache_dir=cache_dir,
                               **kwargs)
    texts = _texts(ds, "text" if builder == "text" else spec.text_field, ",".join(paths))
    if not spec.val_path:
        texts = _hash_filter(texts, spec, split)
    files = []
    for p in paths:
        with open(p, "rb") as f:
            files.append([os.path.abspath(p), hashlib.sha256(f.read()).hexdigest()])
    manifest = {"source": "files", "split": split, "files": files,
                "rule": "val_path files" if spec.val_path else
                f"sha256(text)[:8]/16**8 < {spec.val_fraction} -> validation"}
    return texts, manifest


def _hf_documents(spec: DataSpec, split: str, cache_dir: str) -> tuple[list[str], dict]:
    import datasets  # noqa: PLC0415

    name = spec.val_split if (split == "validation" and spec.val_split) else spec.train_split
    ds = datasets.load_dataset(spec.hf_name, spec.hf_config or None, split=name,
                               cache_dir=cache_dir)
    texts = _texts(ds, spec.text_field, f"{spec.hf_name}[{name}]")
    if not spec.val_split:
        texts = _hash_filter(texts, spec, split)
    manifest = {"source": "hf", "split": split, "name": spec.hf_name, "config": spec.hf_config,
                "hf_split": name, "fingerprint": getattr(ds, "_fingerprint", None),
                "rule": f"hf split {name!r}" if spec.val_split or split == "train" else
                f"sha256(text)[:8]/16**8 < {spec.val_fraction} -> validation"}
    return texts, manifest


def load_documents(spec: DataSpec, split: str, cache_dir: str) -> tuple[list, dict[str, Any]]:
    """(documents as bytes or str, manifest) of split 'train' or 'validation'."""
    if split not in ("train", "validation"):
        raise DataError(f"split={split!r} is not 'train' or 'validation'")
    if spec.source == "stdlib":
        docs, manifest = _stdlib_documents(spec, split)
    elif spec.source == "files":
        docs, manifest = _local_documents(spec, split, cache_dir)
    else:
        docs, manifest = _hf_documents(spec, split, cache_dir)
    if not docs:
        raise DataError(f"the {split} split of data.source={spec.source!r} is empty "
                        f"(val_fraction={spec.val_fraction})")
    manifest["num_documents"] = len(docs)
    manifest["sha256"] = hashlib.sha256(
        json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return docs, manifest


# ----------------------------------------------------------------------------- token streams


@dataclasses.dataclass
class TokenStream:
    """A split's documents tokenized and concatenated.

    tokens: [num_tokens] int32; doc_starts: [num_documents] int64 offsets into tokens, ascending,
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


def load_split(spec: DataSpec, tokenizer: Tokenizer, split: str, cache_dir: str
               ) -> tuple[TokenStream, dict[str, Any]]:
    """Tokenized split and its manifest; the tokens are cached under cache_dir as an .npz keyed
    by the manifest's and the tokenizer's hashes (reading the files again is cheap; tokenizing with
    a BPE tokenizer is not)."""
    documents, manifest = load_documents(spec, split, cache_dir)
    manifest["tokenizer"] = {"name": tokenizer.name, "fingerprint": tokenizer.fingerprint}
    key = hashlib.sha256(f"{_CACHE_VERSION}/{manifest['sha256']}/{tokenizer.fingerprint}".encode()
                         ).hexdigest()[:24]
    path = os.path.join(cache_dir, f"tokens-{split}-{key}.npz")
    if os.path.isfile(path):
        with np.load(path) as z:
            stream = TokenStream(z["tokens"], z["doc_starts"])
    else:
        stream = tokenize(documents, tokenizer)
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.npz"  # unique per process: hosts may share the cache
        np.savez(tmp, tokens=stream.tokens, doc_starts=stream.doc_starts)
        os.replace(tmp, path)
    manifest["num_tokens"] = int(len(stream.tokens))
    if int(stream.tokens.max()) >= tokenizer.vocab_size:
        raise DataError(f"token id {int(stream.tokens.max())} >= tokenizer vocab "
                        f"{tokenizer.vocab_size}")
    return stream, manifest


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
    """Entropy (nats per token) of the tokens' empirical frequency distribution."""
    counts = np.bincount(np.asarray(tokens).ravel())
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())

"""A split's tokens on disk: written once, read lazily by offset.

A store is one folder (FORMAT_VERSION 1):
  tokens.bin      [num_tokens] the documents' token ids back to back, little-endian, in the smallest
                  unsigned dtype that holds the vocabulary (token_dtype: uint16 for up to 65,536
                  ids, else uint32)
  doc_starts.bin  [num_doc_starts] int64, little-endian: offset of each document's first token in
                  tokens.bin, ascending, the first 0 (documents that tokenize to nothing have none)
  manifest.json   written last: format_version, dtype, num_tokens, num_doc_starts, tokens_sha256,
                  and whatever the writer describes (data.py: the sources and their hashes, the
                  tokenizer's fingerprint)
The folder is written under a temporary name beside its final one and renamed into place when
complete (outputs.atomic_folder), so a store that exists is whole; the temporary folders of killed
writers are removed by the next writer on the same host.

A large split is tokenized in shards (write_shard: runs of consecutive documents, one file each,
written by worker processes) and the store is their concatenation in document order
(write_store_from_shards), so the store's bytes do not depend on how the documents were cut or on
how many processes tokenized them; data.prepare_split keeps finished shards across a kill.

Reading is np.memmap of the two files (open_store): a process touches only the pages of the windows
it packs, the pages count as the OS's file cache (shared between the processes of a host, dropped
under memory pressure), not as the process's anonymous memory, and any path every host can read
(NFS, a bucket mounted as files) works. That is nanoGPT's layout; ArrayRecord + grain (MaxText's)
stores records one per example, where a window here is a slice across documents of one flat array.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from gqa_uptrain import outputs

FORMAT_VERSION = 1
TOKENS_FILE = "tokens.bin"
DOC_STARTS_FILE = "doc_starts.bin"
MANIFEST_FILE = "manifest.json"
_DOC_STARTS_DTYPE = np.dtype("<i8")
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


class DataError(ValueError):
    """A data source, split, tokenizer or token store that cannot be used (data.DataError)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding ids 0 .. vocab_size - 1: uint16 up to 65,536 ids,
    uint32 up to 2**32; a larger vocabulary is a DataError."""
    if vocab_size < 1:
        raise DataError(f"a vocabulary of {vocab_size} ids cannot be stored")
    for name, dtype in _DTYPES.items():
        if vocab_size <= 2 ** (8 * dtype.itemsize):
            return dtype
    raise DataError(f"a vocabulary of {vocab_size:,} ids does not fit the store's largest token "
                    f"dtype (uint32: {2**32:,} ids)")


def is_complete(path: str) -> bool:
    """True when `path` is a finished store (its manifest, written last, is there)."""
    return os.path.isfile(os.path.join(path, MANIFEST_FILE))


def write_store(path: str, batches: Iterable[Sequence[np.ndarray]], vocab_size: int,
                describe: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Writes the store `path` from batches of documents' token ids ([len_i] integer arrays, one
    per document) and returns its manifest: describe() (called after the last batch, so it may
    count what the batches read) merged with the store's own fields.

    All or nothing: a DataError (an id >= vocab_size, fewer than 2 tokens) or any other error
    leaves no folder at `path`. When another writer completed `path` first, its store is kept and
    its manifest returned.
    """
    dtype = token_dtype(vocab_size)  # before anything exists on disk
    return _write(path, (_flatten(pieces, vocab_size, dtype) for pieces in batches), dtype,
                  describe)


def write_store_from_shards(path: str, shard_files: Iterable[str], vocab_size: int,
                            describe: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """write_store from shard files (write_shard) concatenated in the given order: the same bytes
    as write_store of the shards' documents in that order, however they were cut."""
    dtype = token_dtype(vocab_size)
    return _write(path, (read_shard(f, dtype) for f in shard_files), dtype, describe)


def _flatten(pieces: Sequence[np.ndarray], vocab_size: int, dtype: np.dtype
             ) -> tuple[np.ndarray, np.ndarray]:
    """(lengths [num_nonempty] int64, tokens [sum of lengths] in `dtype`) of documents' ids;
    DataError naming the first id outside 0 .. vocab_size - 1 (checked before the cast wraps)."""
    pieces = [p for p in pieces if len(p)]
    if not pieces:
        return np.zeros(0, _DOC_STARTS_DTYPE), np.zeros(0, dtype)
    lengths = np.array([len(p) for p in pieces], _DOC_STARTS_DTYPE)
    flat = np.concatenate(pieces)
    if flat.min() < 0 or flat.max() >= vocab_size:
        bad = int(flat.max()) if flat.max() >= vocab_size else int(flat.min())
        raise DataError(f"token id {bad} is outside the tokenizer's vocabulary of {vocab_size} "
                        "ids")
    return lengths, flat.astype(dtype)


def _write(path: str, chunks: Iterable[tuple[np.ndarray, np.ndarray]], dtype: np.dtype,
           describe: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The store from chunks of (lengths [docs] int64 > 0, tokens [sum of lengths] `dtype`), whose
    ids were checked against vocab_size when they were cast (_flatten; a shard when written)."""
    try:
        with outputs.atomic_folder(path) as tmp:
            num_tokens, num_doc_starts = 0, 0
            digest = hashlib.sha256()
            with open(os.path.join(tmp, TOKENS_FILE), "wb") as tokens_file, \
                    open(os.path.join(tmp, DOC_STARTS_FILE), "wb") as starts_file:
                for lengths, flat in chunks:
                    if not len(lengths):
                        continue
                    starts = num_tokens + np.concatenate([[0], np.cumsum(lengths)[:-1]])
                    data = np.ascontiguousarray(flat, dtype).tobytes()
                    tokens_file.write(data)
                    digest.update(data)
                    starts_file.write(starts.astype(_DOC_STARTS_DTYPE).tobytes())
                    num_tokens += int(lengths.sum())
                    num_doc_starts += len(lengths)
                for f in (tokens_file, starts_file):
                    f.flush()
                    os.fsync(f.fileno())  # the data reach the disk before the manifest names them
            described = describe()  # first: its errors (an empty split) say more than a count
            if num_tokens < 2:
                raise DataError(f"the documents hold {num_tokens} tokens; a store needs at "
                                "least 2 (one input and its target)")
            manifest = {**described, "format_version": FORMAT_VERSION, "dtype": dtype.name,
                        "num_tokens": num_tokens, "num_doc_starts": num_doc_starts,
                        "tokens_sha256": digest.hexdigest()}
            outputs.write_json(os.path.join(tmp, MANIFEST_FILE), manifest)
    except (OSError, ValueError) as e:
        if isinstance(e, DataError) or not is_complete(path):
            raise
        # Another writer (a second run sharing the cache) renamed its store into place first.
    return read_manifest(path)


# ----------------------------------------------------------------------------- shards
# A shard is a run of consecutive documents tokenized on its own (by a worker process), one file:
#   [num_docs] int64, then lengths [num_docs] int64 (non-empty documents only), then the tokens
#   [sum of lengths] in the store's dtype, all little-endian.
# It is written under a temporary name and renamed, so a shard file that exists is whole: a
# prepare killed mid-way keeps its finished shards and the next one skips them.


def write_shard(path: str, pieces: Sequence[np.ndarray], vocab_size: int) -> tuple[int, int]:
    """Writes documents' ids ([len_i] arrays) as the shard file `path`, atomically; returns
    (non-empty documents, tokens). DataError for an id outside the vocabulary, before writing."""
    dtype = token_dtype(vocab_size)
    lengths, flat = _flatten(pieces, vocab_size, dtype)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(np.array([len(lengths)], _DOC_STARTS_DTYPE).tobytes())
        f.write(lengths.tobytes())
        f.write(flat.tobytes())
    os.replace(tmp, path)
    return len(lengths), len(flat)


def read_shard(path: str, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(lengths [num_docs] int64, tokens [sum of lengths] `dtype`, a read-only memory map) of a
    shard file; DataError when its size does not match its header."""
    with open(path, "rb") as f:
        num_docs = int(np.frombuffer(f.read(8), _DOC_STARTS_DTYPE)[0])
        lengths = np.frombuffer(f.read(8 * num_docs), _DOC_STARTS_DTYPE)
    num_tokens = int(lengths.sum())
    size = os.path.getsize(path)
    if size != 8 * (1 + num_docs) + num_tokens * dtype.itemsize or len(lengths) != num_docs:
        raise DataError(f"shard {path} has {size} bytes, its header says {num_docs} documents "
                        f"of {num_tokens} tokens: remove it to tokenize it again")
    if not num_tokens:
        return lengths, np.zeros(0, dtype)
    return lengths, np.memmap(path, dtype=dtype, mode="r", offset=8 * (1 + num_docs),
                              shape=(num_tokens,))


def shard_counts(path: str) -> tuple[int, int]:
    """(non-empty documents, tokens) of a finished shard file, from its header."""
    with open(path, "rb") as f:
        num_docs = int(np.frombuffer(f.read(8), _DOC_STARTS_DTYPE)[0])
        return num_docs, int(np.frombuffer(f.read(8 * num_docs), _DOC_STARTS_DTYPE).sum())


def read_manifest(path: str) -> dict[str, Any]:
    with open(os.path.join(path, MANIFEST_FILE)) as f:
        manifest = json.load(f)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(f"token store {path} has format version {version}; this code reads "
                        f"version {FORMAT_VERSION}: remove the folder to prepare it again")
    return manifest


def open_store(path: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(tokens [num_tokens] uint16|uint32, doc_starts [num_doc_starts] int64, manifest) of a
    complete store; the arrays are read-only memory maps. The files' sizes are checked against the
    manifest (a truncated or replaced file is a DataError); their contents are not re-hashed."""
    manifest = read_manifest(path)
    dtype = _DTYPES.get(manifest["dtype"])
    if dtype is None:
        raise DataError(f"token store {path}: unknown dtype {manifest['dtype']!r}")
    arrays = []
    for name, item_dtype, count in ((TOKENS_FILE, dtype, manifest["num_tokens"]),
                                    (DOC_STARTS_FILE, _DOC_STARTS_DTYPE,
                                     manifest["num_doc_starts"])):
        file = os.path.join(path, name)
        size = os.path.getsize(file)
        if size != count * item_dtype.itemsize:
            raise DataError(f"token store {path}: {name} has {size} bytes, its manifest says "
                            f"{count} x {item_dtype.itemsize}: remove the folder to prepare it "
                            "again")
        arrays.append(np.memmap(file, dtype=item_dtype, mode="r", shape=(count,)))
    return arrays[0], arrays[1], manifest


def wait_for_store(path: str, timeout_s: float, who: str, poll_s: float = 1.0) -> None:
    """Blocks until another process has completed the store at `path`; DataError after
    timeout_s. `who` names the waiting process in the error."""
    deadline = time.monotonic() + timeout_s
    while not is_complete(path):
        if time.monotonic() >= deadline:
            raise DataError(f"{who} waited {timeout_s:g} s for process 0 to prepare the token "
                            f"store {path}, which is not there yet (did process 0 fail?); prepare "
                            "it first with `python -m gqa_uptrain.data prepare --config=...` "
                            "and the run's config")
        time.sleep(poll_s)

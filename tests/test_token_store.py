"""Token stores: batches from a store equal the in-memory path, each process reads only its rows,
refusals leave nothing behind, multi-process waiting, and memory that does not grow with the corpus."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import _helpers_train as h
from gqa_uptrain import data, evaluate, token_store


_spec = h.data_spec  # a stdlib DataSpec of 32-token windows, overridable


def _reference(spec: data.DataSpec, tokenizer, split: str, cache_dir: str) -> data.TokenStream:
    """Today's in-memory path: every document in a list, tokenized into one int32 array."""
    documents, _ = data.load_documents(spec, split, cache_dir)
    return data.tokenize(documents, tokenizer)


def _assert_same_batches(store: data.TokenStream, want: data.TokenStream, seq_len: int,
                         batch_size: int = 8, steps=(0, 1, 7, 1000)):
    assert np.array_equal(store.tokens, want.tokens)
    assert np.array_equal(store.doc_starts, want.doc_starts)
    num_windows = want.num_windows(seq_len, full_only=True)
    assert store.num_windows(seq_len, full_only=True) == num_windows
    batches = [data.train_window_ids(0, s, batch_size, num_windows) for s in steps]
    batches += list(data.eval_window_batches(want, seq_len, batch_size, 3))
    for ids in batches:
        got, ref = data.window_rows(store, ids, seq_len), data.window_rows(want, ids, seq_len)
        for key in data.BATCH_KEYS:
            assert got[key].dtype == np.int32 and np.array_equal(got[key], ref[key]), key


def _jsonl_corpus(folder, n: int = 12) -> str:
    """n documents of stdlib text (one empty, which no source keeps), a 'text' field each."""
    names = ["abc.py", "bisect.py", "this.py", "keyword.py", "textwrap.py", "argparse.py"]
    path = os.path.join(folder, "docs.jsonl")
    with open(path, "w") as f:
        for i in range(n):
            text = "" if i == 3 else h.stdlib_text(names[i % len(names)], 300 + 40 * i)[i:]
            f.write(json.dumps({"text": text, "id": i}) + "\n")
    return path


def _leftovers(cache_dir) -> list[str]:
    """Store folders and temporary folders under cache_dir (datasets' own cache aside)."""
    if not os.path.isdir(cache_dir):
        return []
    return sorted(e for e in os.listdir(cache_dir) if "tokens-" in e)


def test_store_batches_equal_the_in_memory_path_on_the_stdlib_corpus(tmp_path):
    cache = str(tmp_path)
    spec, tok = _spec(seq_len=64), data.ByteTokenizer()
    for split in ("train", "validation"):
        stream, manifest = data.load_split(spec, tok, split, cache)
        assert isinstance(stream.tokens, np.memmap) and stream.tokens.dtype == np.uint16
        assert manifest["store"]["dtype"] == "uint16"
        _, want_manifest = data.load_documents(spec, split, cache)
        # The split's manifest (and its sha256, which resume compares) is what it was before.
        assert manifest["sha256"] == want_manifest["sha256"]
        assert manifest["num_tokens"] == len(stream.tokens)
        _assert_same_batches(stream, _reference(spec, tok, split, cache), 64)
    # Scored tokens and their unigram entropy read the memory map and agree with memory.
    val, _ = data.load_split(spec, tok, "validation", cache)
    want = _reference(spec, tok, "validation", cache)
    scored = evaluate.scored_tokens(val, 64)
    assert np.array_equal(scored, evaluate.scored_tokens(want, 64))
    assert data.unigram_entropy(scored) == pytest.approx(
        data.unigram_entropy(evaluate.scored_tokens(want, 64)), rel=1e-12)


def test_store_batches_equal_the_in_memory_path_on_local_jsonl_with_bpe_and_uint32(tmp_path):
    path = _jsonl_corpus(tmp_path)
    bpe = data.load_tokenizer(h.make_bpe_tokenizer(str(tmp_path / "tokenizer.json")))

    class WideVocabulary(data.ByteTokenizer):  # byte ids, declared vocabulary past uint16
        vocab_size, fingerprint = 70_000, "byte-wide-test"

    cache = str(tmp_path / "cache")
    spec = _spec(source="files", path=path, val_fraction=0.3, seq_len=16)
    for tok, dtype in ((bpe, np.uint16), (data.ByteTokenizer(), np.uint16),
                       (WideVocabulary(), np.uint32)):
        for split in ("train", "validation"):
            stream, manifest = data.load_split(spec, tok, split, cache)
            assert stream.tokens.dtype == dtype, (tok.name, split)
            _assert_same_batches(stream, _reference(spec, tok, split, cache), 16, batch_size=4)
    assert token_store.token_dtype(65_536) == np.uint16
    assert token_store.token_dtype(65_537) == np.uint32


def test_two_process_indices_each_read_only_their_rows_and_make_the_global_batch(tmp_path):
    seq_len, batch_size, step = 32, 8, 3
    spec, tok = _spec(seq_len=seq_len), data.ByteTokenizer()
    stream, _ = data.load_split(spec, tok, "validation", str(tmp_path))
    want = _reference(spec, tok, "validation", str(tmp_path))
    num_windows = stream.num_windows(seq_len, full_only=True)
    full = data.window_rows(want, data.train_window_ids(0, step, batch_size, num_windows), seq_len)
    halves = []
    for index in range(2):  # the rows sharding.make_global_batch asks process `index` for
        rows = np.arange(batch_size)[index * batch_size // 2:(index + 1) * batch_size // 2]
        ids = data.train_window_ids(0, step, batch_size, num_windows, rows)
        # Every token outside this process's windows poisoned: its rows must not change.
        keep = np.zeros(len(stream.tokens), bool)
        for w in ids:
            keep[w * seq_len:w * seq_len + seq_len + 1] = True
        poisoned = data.TokenStream(np.where(keep, stream.tokens, 255).astype(np.uint16),
                                    stream.doc_starts)
        assert (~keep).sum() > 0.9 * len(keep)
        halves.append(data.window_rows(poisoned, ids, seq_len))
    for key in data.BATCH_KEYS:
        assert np.array_equal(np.concatenate([halves[0][key], halves[1][key]]), full[key]), key


def test_a_store_disagreeing_with_the_config_is_refused_naming_what_differs(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    path = _jsonl_corpus(corpus)
    cache = str(tmp_path / "cache")
    spec, tok = _spec(source="files", path=str(corpus / "*.jsonl"), val_fraction=0.0), \
        data.ByteTokenizer()
    data.load_split(spec, tok, "train", cache)
    # The same size and mtime: trusted without re-hashing; a new mtime with the same bytes: fine.
    os.utime(path, ns=(time.time_ns(), time.time_ns()))
    data.load_split(spec, tok, "train", cache)
    with open(path, "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    with pytest.raises(data.DataError, match=r"docs.jsonl changed since the store was prepared"
                       ) as err:
        data.load_split(spec, tok, "train", cache)
    assert "\n" not in str(err.value) and "remove the folder" in str(err.value)
    (corpus / "more.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(data.DataError, match=r"more.jsonl is not in the store"):
        data.load_split(spec, tok, "train", cache)
    # A store copied to where another tokenizer's would be: refused, naming both tokenizers.
    os.remove(corpus / "more.jsonl")
    bpe = data.load_tokenizer(h.make_bpe_tokenizer(str(tmp_path / "tokenizer.json")))
    shutil.rmtree(data.store_path(spec, tok, "train", cache))
    data.load_split(spec, tok, "train", cache)  # prepared again from the current files
    shutil.copytree(data.store_path(spec, tok, "train", cache),
                    data.store_path(spec, bpe, "train", cache))
    with pytest.raises(data.DataError, match=r"tokenizer: the store's is byte .*the config's "
                       f".*{bpe.fingerprint[:16]}"):
        data.load_split(spec, bpe, "train", cache)
    # A truncated token file.
    store = data.store_path(spec, tok, "train", cache)
    with open(os.path.join(store, token_store.TOKENS_FILE), "r+b") as f:
        f.truncate(10)
    with pytest.raises(data.DataError, match="tokens.bin has 10 bytes"):
        data.load_split(spec, tok, "train", cache)


def test_bad_input_is_one_line_and_leaves_nothing(tmp_path):
    cache = str(tmp_path / "cache")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n".join(json.dumps({"text": ""}) for _ in range(3)) + "\n")
    path = _jsonl_corpus(tmp_path)

    class HugeVocabulary(data.ByteTokenizer):
        vocab_size, fingerprint = 2**32 + 1, "huge-test"

    class SmallVocabulary(data.ByteTokenizer):  # declares fewer ids than it emits (BOS = 256)
        vocab_size, fingerprint = 200, "small-test"

    cases = [
        (_spec(source="files", path=str(empty)), data.ByteTokenizer(), "train split .* is empty"),
        (_spec(source="files", path=path, text_field="body"), data.ByteTokenizer(),
         "no column 'body'"),
        (_spec(source="files", path=path), HugeVocabulary(),
         "vocabulary of 4,294,967,297 ids does not fit"),
        (_spec(source="files", path=path), SmallVocabulary(),
         "token id 256 is outside the tokenizer's vocabulary of 200 ids"),
    ]
    for spec, tok, message in cases:
        with pytest.raises(data.DataError, match=message) as err:
            data.load_split(spec, tok, "train", cache)
        assert "\n" not in str(err.value)
        assert _leftovers(cache) == [], message


def test_writers_are_atomic_and_a_finished_store_wins(tmp_path):
    path = str(tmp_path / "store")
    # A stale temporary folder of a killed writer on this host is removed by the next writer.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = tmp_path / f"{token_store.outputs._temp_prefix('store').rsplit('-', 2)[0]}-" \
                       f"{dead.stdout.strip()}-abc"
    stale.mkdir()

    def batches():
        yield [np.array([1, 2, 3])]
        # Another writer completes the same store meanwhile: its store is kept.
        token_store.write_store(path, [[np.array([4, 5])]], 10, lambda: {"who": "other"})
        yield [np.array([6])]

    manifest = token_store.write_store(path, batches(), 10, lambda: {"who": "me"})
    assert manifest["who"] == "other" and manifest["num_tokens"] == 2
    assert sorted(os.listdir(tmp_path)) == ["store"]
    tokens, doc_starts, _ = token_store.open_store(path)
    assert tokens.tolist() == [4, 5] and doc_starts.tolist() == [0]


def test_other_processes_wait_for_process_0(tmp_path):
    spec, tok, cache = _spec(), data.ByteTokenizer(), str(tmp_path)
    with pytest.raises(data.DataError, match=r"process 1 waited 0.2 s for process 0 to prepare"):
        data.load_split(spec, tok, "validation", cache, process_index=1, wait_s=0.2)
    assert _leftovers(cache) == []  # a waiting process writes nothing
    writer = threading.Timer(0.3, data.prepare_split, (spec, tok, "validation", cache))
    writer.start()
    try:
        stream, manifest = data.load_split(spec, tok, "validation", cache, process_index=1,
                                           wait_s=60)
    finally:
        writer.join()
    assert manifest["num_tokens"] == len(_reference(spec, tok, "validation", cache).tokens)
    assert len(stream.tokens) == manifest["num_tokens"]


_MEMORY_CHILD = """
import sys, numpy as np
from gqa_uptrain import data
def rss_anon():
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) for l in f if l.startswith('RssAnon:')) * 1024
spec = data.DataSpec(source='stdlib', path='', val_path='', hf_name='', hf_config='',
                     train_split='train', val_split='', text_field='text', val_fraction=0.02,
                     tokenizer='byte', seq_len=256, cache_dir='')
before = rss_anon()
stream, _ = data.load_split(spec, data.ByteTokenizer(), 'train', sys.argv[1])
if sys.argv[2] == 'copy':
    stream = data.TokenStream(np.array(stream.tokens), stream.doc_starts)  # what a loader in RAM does
num_windows = stream.num_windows(256, full_only=True)
for step in range(100):
    rows = data.window_rows(stream, data.train_window_ids(0, step, 16, num_windows), 256)
print(rss_anon() - before, len(stream.tokens) * stream.tokens.dtype.itemsize)
"""


def test_reading_a_store_does_not_grow_anonymous_memory_with_the_corpus(tmp_path):
    """RssAnon (memory-mapped pages do not count) of opening the stdlib train store (~12M
    tokens, 24 MB) and packing 100 batches grows by far less than the store's size; the same
    measurement sees an in-memory copy of the tokens. (experiments/data_memory.py measures whole
    training runs at 10M and 100M tokens.)"""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux /proc")
    data.prepare_split(_spec(seq_len=256), data.ByteTokenizer(), "train", str(tmp_path))
    grown = {}
    for mode in ("store", "copy"):
        out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(tmp_path), mode],
                             capture_output=True, text=True, env=h.env(), timeout=60, check=True)
        grown[mode], store_bytes = map(int, out.stdout.split())
    assert store_bytes > 20e6
    assert grown["store"] < store_bytes / 4, grown  # measured: ~2 MB, whatever the corpus
    assert grown["copy"] > store_bytes * 0.9, grown


def test_prepare_command_prepares_both_splits_where_training_looks(tmp_path):
    from gqa_uptrain import train

    workdir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "gqa_uptrain.data", "prepare", f"--config={h.PRETRAIN}:smoke",
           "--config.data.val_fraction=0.05"]
    runs = [subprocess.run(cmd + extra, cwd=h.REPO, env=h.env(), capture_output=True, text=True,
                           timeout=120) for extra in ([f"--workdir={workdir}"],
                                                      [f"--workdir={workdir}"], [])]
    first, again, no_workdir = runs
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    assert [line.split(":")[0] for line in first.stdout.splitlines()] == ["train", "validation"]
    assert all("prepared in" in line for line in first.stdout.splitlines())
    assert all("already prepared" in line for line in again.stdout.splitlines())
    # The stores the training run of this config and workdir opens.
    spec = train._data_spec(h.config(**{"data.val_fraction": 0.05}), workdir)
    for split in ("train", "validation"):
        path = data.store_path(spec, data.ByteTokenizer(), split, spec.cache_dir)
        assert token_store.is_complete(path) and path in first.stdout
    assert no_workdir.returncode == 1
    assert no_workdir.stderr.strip().splitlines() == [
        "error: data.cache_dir is '' (= the run's WORKDIR/data_cache): pass --workdir=DIR (the "
        "run's) or --config.data.cache_dir=DIR"]

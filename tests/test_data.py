"""Data: the stdlib corpus and its split, local files through `datasets`, tokenizers, packing, and
the (seed, step) batch order."""

from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np
import pytest

import _helpers_train as h
from gqa_uptrain import data, evaluate


_spec = h.data_spec  # a stdlib DataSpec of 32-token windows, overridable


def test_stdlib_split_is_deterministic_disjoint_and_recorded(tmp_path):
    spec = _spec()
    docs = {}
    for split in ("train", "validation"):
        docs[split], manifest = data.load_documents(spec, split, str(tmp_path))
        files = [rel for rel, _ in manifest["files"]]
        assert not any(part in ("test", "tests", "site-packages")
                       for rel in files for part in rel.split(os.sep))
        for (rel, sha), doc in zip(manifest["files"], docs[split]):
            with open(os.path.join(data.stdlib_root(), rel), "rb") as f:
                content = f.read()
            assert content == doc and hashlib.sha256(content).hexdigest() == sha
        docs[split + "_files"] = set(files)
    assert not docs["train_files"] & docs["validation_files"]
    assert docs["train_files"] | docs["validation_files"] == set(data.stdlib_files())
    # ~2% of the files, chosen by path hash: independent of the other files.
    n = len(docs["validation_files"])
    assert 0 < n < 0.06 * len(docs["train_files"])
    assert data._hash_unit(b"argparse.py") == data._hash_unit(b"argparse.py")
    _, again = data.load_documents(spec, "validation", str(tmp_path))
    assert again["sha256"] == manifest["sha256"]
    # Some stdlib files are not UTF-8: they are read as bytes, untouched.
    assert all(isinstance(d, bytes) for d in docs["train"])


def test_byte_tokenizer_and_token_store(tmp_path):
    tok = data.ByteTokenizer()
    assert list(tok.encode_document("é")) == [data.BYTE_BOS_ID, 0xC3, 0xA9]
    spec = _spec()
    stream, manifest = data.load_split(spec, tok, "validation", str(tmp_path))
    stores = [f for f in os.listdir(tmp_path) if f.startswith("tokens-validation-")]
    assert len(stores) == 1 and manifest["store"]["path"] == str(tmp_path / stores[0])
    with open(tmp_path / stores[0] / "manifest.json") as f:
        on_disk = json.load(f)
    assert on_disk["tokenizer"]["fingerprint"] == tok.fingerprint == manifest["tokenizer"][
        "fingerprint"]
    assert on_disk["source"]["sha256"] == manifest["sha256"]
    assert on_disk["num_tokens"] == manifest["num_tokens"] == len(stream.tokens)
    assert on_disk["dtype"] == "uint16" and on_disk["format_version"] == 1
    mtime = os.path.getmtime(tmp_path / stores[0] / "tokens.bin")
    again, _ = data.load_split(spec, tok, "validation", str(tmp_path))  # opened, not re-written
    assert os.path.getmtime(tmp_path / stores[0] / "tokens.bin") == mtime
    assert np.array_equal(again.tokens, stream.tokens)
    assert np.array_equal(again.doc_starts, stream.doc_starts)
    assert all(stream.tokens[stream.doc_starts] == data.BYTE_BOS_ID)
    assert (stream.tokens == data.BYTE_BOS_ID).sum() == manifest["num_documents"]


def _reference_rows(stream: data.TokenStream, window: int, seq_len: int):
    """The packing rule written as a plain loop over the window's tokens."""
    starts = set(stream.doc_starts.tolist())
    rows = {k: [] for k in data.BATCH_KEYS}
    segment, position = 1, 0
    for i in range(seq_len):
        p = window * seq_len + i
        if p >= len(stream.tokens):
            for k in rows:
                rows[k].append(0)
            continue
        if i > 0 and p in starts:
            segment, position = segment + 1, 0
        target_ok = p + 1 < len(stream.tokens) and (p + 1) not in starts
        rows["inputs"].append(stream.tokens[p])
        rows["targets"].append(stream.tokens[p + 1] if p + 1 < len(stream.tokens) else 0)
        rows["segment_ids"].append(segment)
        rows["positions"].append(position)
        rows["loss_mask"].append(int(target_ok))
        position += 1
    return rows


def test_packing_matches_a_plain_loop_and_scores_every_token_once():
    docs = [h.stdlib_text("abc.py", 50), h.stdlib_text("keyword.py", 7),
            h.stdlib_text("bisect.py", 90), h.stdlib_text("this.py", 30)]
    stream = data.tokenize(docs, data.ByteTokenizer())
    seq_len = 16
    num = stream.num_windows(seq_len, full_only=False)
    assert num == math.ceil((len(stream.tokens) - 1) / seq_len)
    rows = data.window_rows(stream, np.arange(num), seq_len)
    for w in range(num):
        want = _reference_rows(stream, w, seq_len)
        for key in data.BATCH_KEYS:
            assert rows[key][w].tolist() == [int(x) for x in want[key]], (w, key)
    # Every token but each document's first is a target exactly once.
    scored = rows["targets"][rows["loss_mask"] == 1]
    assert len(scored) == len(stream.tokens) - len(docs)
    assert sorted(scored.tolist()) == sorted(evaluate.scored_tokens(stream, seq_len).tolist())
    assert data.window_rows(stream, np.array([-1]), seq_len)["loss_mask"].sum() == 0


def test_batch_order_is_a_pure_function_of_seed_and_step():
    num_windows, batch = 37, 8
    a = data.train_window_ids(3, 5, batch, num_windows)
    # Any subset of rows (what one host builds) agrees with the full batch.
    assert np.array_equal(data.train_window_ids(3, 5, batch, num_windows, np.arange(4, 8)), a[4:])
    data._epoch_permutation.cache_clear()
    assert np.array_equal(data.train_window_ids(3, 5, batch, num_windows), a)
    assert not np.array_equal(data.train_window_ids(4, 5, batch, num_windows), a)
    # Each epoch visits every window once.
    steps = [data.train_window_ids(3, s, batch, num_windows) for s in range(37)]
    flat = np.concatenate(steps)  # 37 steps x 8 = 8 epochs of 37 windows
    for epoch in range(8):
        assert sorted(flat[epoch * 37:(epoch + 1) * 37]) == list(range(37))


def test_local_text_jsonl_parquet_files(tmp_path):
    texts = [h.stdlib_text(n, 400) for n in ("abc.py", "bisect.py", "this.py", "keyword.py")]
    for i, t in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(t)
    with open(tmp_path / "docs.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"content": t}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts}), tmp_path / "docs.parquet")
    cache = str(tmp_path / "cache")
    tok = data.ByteTokenizer()
    streams = {}
    for name, kw in {"txt": dict(path=str(tmp_path / "doc*.txt")),
                     "jsonl": dict(path=str(tmp_path / "docs.jsonl"), text_field="content"),
                     "parquet": dict(path=str(tmp_path / "docs.parquet"))}.items():
        spec = _spec(source="files", val_fraction=0.0, **kw)
        streams[name], manifest = data.load_split(spec, tok, "train", cache)
        assert manifest["num_documents"] == 4
    want = data.tokenize(texts, tok)
    for name, stream in streams.items():
        assert np.array_equal(stream.tokens, want.tokens), name
    # Explicit validation files.
    spec = _spec(source="files", path=str(tmp_path / "doc[0-2].txt"),
                 val_path=str(tmp_path / "doc3.txt"))
    val, _ = data.load_split(spec, tok, "validation", cache)
    assert np.array_equal(val.tokens, tok.encode_document(texts[3]))
    with pytest.raises(data.DataError, match="no column 'body'"):
        data.load_split(_spec(source="files", path=str(tmp_path / "docs.jsonl"),
                              text_field="body"), tok, "train", cache)
    with pytest.raises(data.DataError, match="no file matches"):
        data.load_split(_spec(source="files", path=str(tmp_path / "nope*.txt")), tok, "train",
                        cache)


def test_hf_tokenizer_json_with_its_bos_rule(tmp_path):
    path = h.make_bpe_tokenizer(str(tmp_path / "tokenizer.json"))
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(path)
    tok = data.load_tokenizer(str(tmp_path))  # a folder holding tokenizer.json works too
    text = h.stdlib_text("this.py", 300)
    ids = tok.encode_document(text.encode())
    assert ids.tolist() == reference.encode(text).ids
    assert ids[0] == reference.token_to_id("<s>")
    stream = data.tokenize([text, text], tok)
    assert stream.doc_starts.tolist() == [0, len(ids)]
    with pytest.raises(data.DataError, match="neither 'byte' nor a tokenizer.json"):
        data.load_tokenizer(str(tmp_path / "missing.json"))


def test_unigram_entropy():
    assert data.unigram_entropy(np.arange(8)) == pytest.approx(math.log(8))
    # Counted in chunks of 2**20: a stream longer than one chunk, ids unequal across chunks.
    long = np.concatenate([np.zeros(2**20, np.uint16), np.full(2**20 + 5, 3, np.uint16)])
    q = np.array([2**20, 2**20 + 5]) / len(long)
    assert data.unigram_entropy(long) == pytest.approx(-(q * np.log(q)).sum(), rel=1e-12)
    assert data.unigram_entropy(np.array([5, 5, 5])) == pytest.approx(0.0)
    p = np.array([0.5, 0.25, 0.25])
    assert data.unigram_entropy(np.array([1, 1, 2, 3])) == pytest.approx(-(p * np.log(p)).sum())


def test_bad_specs():
    with pytest.raises(data.DataError, match="data.source='web'"):
        _spec(source="web")
    with pytest.raises(data.DataError, match="val_fraction"):
        _spec(val_fraction=1.5)


def test_hf_source_through_datasets_with_a_local_dataset_folder(tmp_path):
    """source='hf' passes the name to datasets.load_dataset; a local folder stands in for a hub
    name (tests never touch the network)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [h.stdlib_text(n, 300) for n in ("abc.py", "bisect.py", "this.py")]
    folder = tmp_path / "ds"
    folder.mkdir()
    pq.write_table(pa.table({"body": texts[:2]}), folder / "train.parquet")
    pq.write_table(pa.table({"body": texts[2:]}), folder / "validation.parquet")
    spec = _spec(source="hf", hf_name=str(folder), val_split="validation", text_field="body")
    tok = data.ByteTokenizer()
    train, manifest = data.load_split(spec, tok, "train", str(tmp_path / "cache"))
    val, _ = data.load_split(spec, tok, "validation", str(tmp_path / "cache"))
    assert np.array_equal(train.tokens, data.tokenize(texts[:2], tok).tokens)
    assert np.array_equal(val.tokens, data.tokenize(texts[2:], tok).tokens)
    assert manifest["name"] == str(folder) and manifest["fingerprint"]
    # Opening the store again checks the dataset's fingerprint, which is stable.
    again, _ = data.load_split(spec, tok, "train", str(tmp_path / "cache"))
    assert np.array_equal(again.tokens, train.tokens)

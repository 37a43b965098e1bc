"""Data at scale: a prepare killed mid-way and rerun gives the same store byte for byte (whatever
the number of workers or shard bounds, reusing its finished shards); streaming and Arrow reading of
the same parquet files give the same store; prefetched batches, and a killed and resumed training
run with prefetch on, are bit-identical to prefetch off."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import _helpers_train as h
from gqa_uptrain import checkpoints, data, prefetch, sharding, token_store

_STORE_FILES = (token_store.TOKENS_FILE, token_store.DOC_STARTS_FILE, token_store.MANIFEST_FILE)


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    yield from h.compilation_cache(tmp_path_factory)


_spec = h.data_spec  # a stdlib DataSpec of 32-token windows, overridable


def _store_bytes(path: str) -> dict[str, bytes]:
    out = {}
    for name in _STORE_FILES:
        with open(os.path.join(path, name), "rb") as f:
            out[name] = f.read()
    return out


def _stdlib_documents(count: int, chars: int) -> list[str]:
    """`count` documents of real text: stdlib files cut to at most `chars` characters."""
    names = [n for n in data.stdlib_files() if os.sep not in n][:count]
    return [h.stdlib_text(n, chars) for n in names]


_PREPARE_CHILD = """
import sys
from gqa_uptrain import data
spec = data.DataSpec.from_dict(__import__('json').loads(sys.argv[1]))
data.prepare_split(spec, data.load_tokenizer(sys.argv[2]), 'train', sys.argv[3], workers=2,
                   shard_chars=16384)
"""


def test_a_prepare_killed_mid_way_and_rerun_gives_the_same_store_byte_for_byte(tmp_path):
    corpus = tmp_path / "docs.jsonl"
    with open(corpus, "w") as f:
        for text in _stdlib_documents(120, 12_000):
            f.write(json.dumps({"text": text}) + "\n")
    tok_path = h.make_bpe_tokenizer(str(tmp_path / "tokenizer.json"))
    tok = data.load_tokenizer(tok_path)
    spec = _spec(source="files", path=str(corpus), val_fraction=0.0)
    # Reference: one process, the default shard bounds (one shard).
    reference = data.prepare_split(spec, tok, "train", str(tmp_path / "reference"), workers=1)

    # Two worker processes and 16 KiB shards (~70), SIGKILLed once a few shards are finished.
    cache = str(tmp_path / "killed")
    store = data.store_path(spec, tok, "train", cache)
    shards = store + data.SHARDS_SUFFIX
    cmd = [sys.executable, "-c", _PREPARE_CHILD, json.dumps(spec.to_dict()), tok_path, cache]
    finished = lambda: [n for n in os.listdir(shards) if ".tmp" not in n] \
        if os.path.isdir(shards) else []  # noqa: E731
    proc = subprocess.Popen(cmd, cwd=h.REPO, env=h.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(finished()) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err
    kept = sorted(finished())
    assert not token_store.is_complete(store) and 3 <= len(kept) < 60, kept

    # Kept shards are used, not tokenized again: a copy of the killed run's shards with one
    # replaced by other valid tokens ends up in that copy's store.
    poisoned_cache = str(tmp_path / "poisoned")
    poisoned = data.store_path(spec, tok, "train", poisoned_cache)
    shutil.copytree(shards, poisoned + data.SHARDS_SUFFIX)
    lengths, _ = token_store.read_shard(os.path.join(shards, kept[-1]),
                                        token_store.token_dtype(tok.vocab_size))
    token_store.write_shard(os.path.join(poisoned + data.SHARDS_SUFFIX, kept[-1]),
                            [np.full(n, 7) for n in lengths], tok.vocab_size)
    data.prepare_split(spec, tok, "train", poisoned_cache, workers=1, shard_chars=16384)
    tokens, _, _ = token_store.open_store(poisoned)
    ref_tokens, _, _ = token_store.open_store(reference)
    assert len(tokens) == len(ref_tokens) and not np.array_equal(tokens, ref_tokens)
    assert (tokens == 7).sum() > (ref_tokens == 7).sum()

    # The same command again: the store of the uninterrupted single-process run, and no shards.
    rerun = subprocess.run(cmd, cwd=h.REPO, env=h.env(), capture_output=True, text=True,
                           timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert _store_bytes(store) == _store_bytes(reference)
    assert [e for e in os.listdir(cache) if "tokens-" in e] == [os.path.basename(store)]


def _write_parquet(folder, documents: list[str]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(folder)
    half = len(documents) // 2
    for i, part in enumerate((documents[:half], documents[half:])):
        table = pa.table({"id": list(range(len(part))), "text": part})
        pq.write_table(table, os.path.join(folder, f"part-{i}.parquet"), row_group_size=7)
    return os.path.join(folder, "*.parquet")


def _arrow_files(folder: str) -> list[str]:
    return [f for _, _, files in os.walk(folder) for f in files if f.endswith(".arrow")]


def test_streaming_and_arrow_reading_of_the_same_parquet_files_give_the_same_store(tmp_path):
    documents = _stdlib_documents(40, 3_000)
    documents[5] = ""  # an empty row: no document either way
    pattern = _write_parquet(tmp_path / "corpus", documents)
    tok = data.ByteTokenizer()
    stores = {}
    for streaming in (True, False):
        cache = str(tmp_path / f"cache-{streaming}")
        spec = _spec(source="files", path=pattern, val_fraction=0.25, streaming=streaming)
        for split in ("train", "validation"):
            stores[streaming, split] = _store_bytes(data.prepare_split(
                spec, tok, split, cache, workers=1, shard_documents=4))
            stream, _ = data.load_split(spec, tok, split, cache)
            want = data.tokenize([d for d in documents if d and (data._hash_unit(d.encode())
                                 < 0.25) == (split == "validation")], tok)
            assert np.array_equal(stream.tokens, want.tokens), (streaming, split)
        # Streaming reads the parquet files as they are; the other way converts them to Arrow.
        assert bool(_arrow_files(cache)) == (not streaming)
    for split in ("train", "validation"):
        assert stores[True, split] == stores[False, split], split
    # The 'hf' source streams too: a local dataset folder of the same files, the same tokens.
    spec = _spec(source="hf", hf_name=str(tmp_path / "corpus"), val_fraction=0.25)
    hf_store = data.prepare_split(spec, tok, "train", str(tmp_path / "hf"), workers=1)
    assert _store_bytes(hf_store)[token_store.TOKENS_FILE] == \
        stores[True, "train"][token_store.TOKENS_FILE]
    assert not _arrow_files(str(tmp_path / "hf"))


def test_prefetched_batches_equal_direct_ones_in_any_step_order(tmp_path):
    seq_len, accum, micro, num_steps = 16, 2, 4, 12
    stream, _ = data.load_split(_spec(seq_len=seq_len), data.ByteTokenizer(), "validation",
                                str(tmp_path))
    num_windows = stream.num_windows(seq_len, full_only=True)
    mesh = sharding.make_mesh(-1, 1, 1)
    batch_sh = sharding.jax.sharding.NamedSharding(mesh, sharding.batch_spec(1))
    calls = []

    def host_rows(step, rows):
        calls.append((step, prefetch.threading.current_thread().name))
        if step == 9:
            raise RuntimeError("bad step 9")
        ids = data.train_window_ids(0, step, accum * micro, num_windows, rows)
        return data.window_rows(stream, ids, seq_len)

    def build(rows_fn):
        batch = sharding.make_global_batch((accum, micro, seq_len), batch_sh, rows_fn,
                                           data.BATCH_KEYS)
        return {k: np.asarray(v) for k, v in batch.items()}

    direct = prefetch.BatchPrefetcher(host_rows, build, 0)
    ahead = prefetch.BatchPrefetcher(host_rows, build, 3, stop_step=num_steps)
    for step in (0, 1, 2, 3, 4, 7, 8, 2, 3, 10, 11):  # in order, a jump, back, to the end
        want = direct.batch(step)
        got = ahead.batch(step)
        for key in data.BATCH_KEYS:
            assert np.array_equal(got[key], want[key]), (step, key)
    # The thread built the steps after each batch asked for, never past stop_step.
    threaded = {s for s, name in calls if name == "batch-prefetch"}
    assert {1, 2, 3, 4, 5, 11} <= threaded and max(threaded) < num_steps
    # An error while reading ahead is raised by the batch() of its step, on this thread.
    ahead.batch(8)
    with pytest.raises(RuntimeError, match="bad step 9"):
        ahead.batch(9)
    with pytest.raises(ValueError, match="data.prefetch=-1 must be >= 0"):
        prefetch.BatchPrefetcher(host_rows, build, -1)


NUM_STEPS = 8
FLAGS = h.cli_flags(num_steps=NUM_STEPS, checkpoint_every=2, keep_checkpoints=2, eval_every=4,
                    log_every=1, **{"optimizer.learning_rate": 1e-2})


def test_kill_and_resume_with_prefetch_is_bit_identical_to_prefetch_off(tmp_path):
    reference = str(tmp_path / "prefetch_off")
    h.run(h.train_cmd(reference, FLAGS, ["--config.data.prefetch=0"]))
    workdir = str(tmp_path / "prefetch_on")
    cmd = h.train_cmd(workdir, FLAGS, ["--config.data.prefetch=3"])
    proc = subprocess.Popen(cmd, cwd=h.REPO, env=h.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while (max(checkpoints.list_steps(workdir), default=0) < 4 and proc.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    killed_at = max(checkpoints.list_steps(workdir), default=0)
    assert 4 <= killed_at < NUM_STEPS, killed_at
    h.run(cmd)
    got, want = h.final_params(workdir), h.final_params(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert np.array_equal(got[name], want[name]), name
    assert h.deterministic(h.metrics(workdir)) == h.deterministic(h.metrics(reference))


def test_host_tokens_per_s_is_the_documented_formula_by_hand():
    from gqa_uptrain.benchmarks import data as bench_data

    d, layers, kv, mlp, vocab, seq = 4096, 32, 8 * 128, 11008, 32000, 4096
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * mlp  # q, o; k, v; SwiGLU (norms: ~0.0001%)
    params = layers * per_layer + d * vocab  # and the output head; the input embedding is a gather
    want = 8 * 989e12 * 0.40 / (6 * params + 12 * layers * d * seq)
    assert bench_data.host_tokens_per_s() == pytest.approx(want, rel=1e-5)
    assert 76_000 < want < 77_000

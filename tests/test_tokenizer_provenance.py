"""A model's tokenizer travels with it: an HF folder's tokenizer.json is copied into the converted
checkpoint (sha256 in meta.json) and from there into converted, trained and exported models; a model
whose vocabulary is not a byte-level one trained here never gets the byte tokenizer silently."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import _helpers_train as h
from _hf_helpers import make_hf_folder, random_params
from gqa_uptrain import checkpoints, convert, evaluate, train
from gqa_uptrain import model as model_lib

VOCAB = 1000
CONFIG = model_lib.ModelConfig(vocab_size=VOCAB, d_model=32, num_layers=1, num_heads=4,
                               num_kv_heads=4, mlp_dim=64)
TRAIN_KEY = "--config.data.tokenizer=PATH/tokenizer.json"


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    yield from h.compilation_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A random Llama with vocabulary 1000 and a real BPE tokenizer.json (<= 1000 ids)."""
    folder = tmp_path_factory.mktemp("hf") / "llama"
    make_hf_folder(folder, vocab=VOCAB, layers=1)
    h.make_bpe_tokenizer(str(folder / "tokenizer.json"), vocab_size=VOCAB)
    return str(folder)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(h.stdlib_text("argparse.py", 12000))
    return str(path)


def test_tokenizer_travels_hf_checkpoint_train_export(hf_folder, corpus, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_folder, src)
    want = _sha(src / "tokenizer.json")
    ck = tmp_path / "ck"
    convert.convert(str(src), str(ck), 2, output_format="checkpoint")
    meta = checkpoints.read_meta(str(ck))
    assert _sha(ck / "tokenizer.json") == want
    prov = meta.provenance
    assert (prov["tokenizer"], prov["tokenizer_sha256"]) == ("tokenizer.json", want)
    assert prov["tokenizer_source"] == str(src / "tokenizer.json")
    assert checkpoints.tokenizer_spec(str(ck)) == str(ck / "tokenizer.json")
    # While the HF folder is there, an export ships its companion files too (same tokenizer.json).
    summary = convert.convert(str(ck), str(tmp_path / "with_src"), output_format="hf")
    assert summary["tokenizer"] == f"copied from {src}"
    assert (summary["num_kv_heads_before"], summary["num_kv_heads_after"]) == (2, 2)
    assert os.path.isfile(tmp_path / "with_src" / "generation_config.json")

    # Checkpoint -> checkpoint carries the file along.
    ck1 = tmp_path / "ck1"
    convert.convert(str(ck), str(ck1), 1)
    assert _sha(ck1 / "tokenizer.json") == want
    assert checkpoints.read_meta(str(ck1)).provenance["tokenizer_sha256"] == want

    shutil.rmtree(src)  # from here on, only the checkpoints' own copies exist
    text = tmp_path / "text.txt"
    text.write_text(h.stdlib_text("textwrap.py", 3000))
    result = evaluate.evaluate_model(str(ck1), text_file=str(text), seq_len=32, batch_size=2,
                                     max_batches=1)
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(ck1 / "tokenizer.json")).encode(text.read_text()).ids
    assert result["tokens"] == min(len(ids) - 1, 2 * 32)
    assert max(ids) >= 256  # a real BPE vocabulary, not bytes

    out = tmp_path / "out"
    summary = convert.convert(str(ck1), str(out), output_format="hf")
    assert summary["tokenizer"] == f"copied from {ck1 / 'tokenizer.json'}"
    assert _sha(out / "tokenizer.json") == want
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok("def f(x):")["input_ids"] == Tokenizer.from_file(
        str(out / "tokenizer.json")).encode("def f(x):").ids

    # Uptraining from the checkpoint (data.tokenizer='auto') uses its tokenizer.json and every
    # checkpoint the run saves carries a copy.
    workdir = tmp_path / "up"
    config = h.config(h.UPTRAIN, "smoke", init_checkpoint=str(ck1), num_steps=2,
                      checkpoint_every=1, keep_checkpoints=5, eval_every=0, final_eval_batches=0,
                      batch_size=2, progress_bar=False, **{
                          "data.source": "files", "data.path": corpus,
                          "data.val_fraction": 0.0, "data.seq_len": 32})
    train.train_and_evaluate(config, str(workdir))
    with open(workdir / "run.json") as f:
        assert json.load(f)["tokenizer"] == str(ck1 / "tokenizer.json")
    assert checkpoints.list_steps(str(workdir)) == [1, 2]
    for step in (1, 2):
        path = checkpoints.step_dir(str(workdir), step)
        assert _sha(os.path.join(path, "tokenizer.json")) == want
        assert checkpoints.read_meta(path).provenance["tokenizer_sha256"] == want
    # With the init checkpoint (whose tokenizer.json the run recorded) deleted, the workdir still
    # resumes: its own checkpoints' copies are used.
    shutil.rmtree(ck1)
    assert train.train_and_evaluate(config, str(workdir)) == {}  # already complete
    # A tokenizer.json edited after the fact is refused, naming the file.
    with open(os.path.join(checkpoints.step_dir(str(workdir), 2), "tokenizer.json"), "a") as f:
        f.write(" ")
    with pytest.raises(checkpoints.CheckpointError, match="does not match the sha256"):
        checkpoints.tokenizer_spec(checkpoints.step_dir(str(workdir), 2))


def _one_line_error(result):
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_no_silent_byte_tokenizer(hf_folder, tmp_path):
    """A vocabulary-1000 checkpoint with no tokenizer: uptraining, evaluating and calibrating refuse
    with one line naming the key to set; an HF folder without tokenizer.json likewise."""
    bare = tmp_path / "bare"
    checkpoints.save(str(bare), random_params(CONFIG), checkpoints.Meta(CONFIG, step=10))
    expected = (f"error: cannot tell which tokenizer checkpoint {bare} uses (it has no "
                f"tokenizer.json and records none, and its vocabulary of {VOCAB} ids is not a "
                f"byte-level model trained here); set {TRAIN_KEY}")
    workdir = tmp_path / "up"
    result = subprocess.run(
        [sys.executable, "-m", "gqa_uptrain.train", "--config=configs/uptrain.py:smoke",
         f"--config.init_checkpoint={bare}", f"--workdir={workdir}"],
        capture_output=True, text=True, cwd=h.REPO, env=h.env(), timeout=300)
    assert _one_line_error(result) == expected
    assert checkpoints.list_steps(str(workdir)) == [] and not os.path.exists(workdir / "run.json")

    text = tmp_path / "text.txt"
    text.write_text("x = 1\n" * 50)
    result = subprocess.run(
        [sys.executable, "-m", "gqa_uptrain.evaluate", f"--checkpoint={bare}",
         f"--text_file={text}"], capture_output=True, text=True, cwd=h.REPO, env=h.env(),
        timeout=300)
    line = _one_line_error(result)
    assert line.endswith("set --tokenizer=PATH/tokenizer.json"), line
    # Given explicitly, the byte tokenizer is used (the user's choice, not a default).
    result = evaluate.evaluate_model(str(bare), text_file=str(text), tokenizer="byte",
                                     seq_len=32, batch_size=1, max_batches=1)
    assert result["tokens"] == 32

    with pytest.raises(ValueError, match="--calib_tokenizer=byte or a tokenizer.json path"):
        convert.convert(str(bare), str(tmp_path / "fit"), 2, method="fit")
    assert not os.path.exists(tmp_path / "fit")

    # An HF folder without tokenizer.json, as init_checkpoint: the same key named.
    no_tok = tmp_path / "no_tok"
    shutil.copytree(hf_folder, no_tok)
    os.remove(no_tok / "tokenizer.json")
    config = h.config(h.UPTRAIN, "smoke", init_checkpoint=str(no_tok), num_steps=2)
    with pytest.raises(ValueError) as e:
        train.train_and_evaluate(config, str(tmp_path / "up_hf"))
    assert str(e.value) == f"{no_tok} has no tokenizer.json; set {TRAIN_KEY}"
    # HF -> checkpoint without tokenizer.json: the checkpoint records none (no byte fallback).
    convert.convert(str(no_tok), str(tmp_path / "ck_no_tok"), output_format="checkpoint")
    assert checkpoints.default_tokenizer(str(tmp_path / "ck_no_tok")) is None


def test_default_tokenizer_rule_for_older_checkpoints(tmp_path):
    """meta.json only (no arrays are read): the recorded spec, else the one byte-level rule."""
    def rule(vocab, provenance):
        meta = checkpoints.Meta(CONFIG.replace(vocab_size=vocab), provenance=provenance)
        return checkpoints.default_tokenizer(str(tmp_path), meta)

    tok = tmp_path / "elsewhere" / "tokenizer.json"
    tok.parent.mkdir()
    tok.write_text("{}")
    assert rule(VOCAB, {"tokenizer": str(tok)}) == str(tok)  # an absolute path, as before
    assert rule(VOCAB, {"tokenizer": "byte"}) == "byte"  # trained here on bytes, recorded
    assert rule(260, {}) == "byte"  # byte-sized, no record, no HF ancestor
    assert rule(260, {"hf_config": {"vocab_size": 260}}) is None  # an HF model of that size
    assert rule(VOCAB, {}) is None
    assert rule(VOCAB, {"tokenizer": str(tmp_path / "gone.json")}) is None
    meta = checkpoints.Meta(CONFIG, provenance={"tokenizer": str(tmp_path / "gone.json")})
    assert "its recorded tokenizer" in checkpoints.no_tokenizer_message(str(tmp_path), meta, "K")
    assert np.all([rule(v, {}) == "byte" for v in (256, 512)]) and rule(513, {}) is None

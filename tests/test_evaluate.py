"""evaluate on a small random transformers Llama folder against transformers' own loss, and the
Hugging Face paths of the trainer."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

import _helpers_train as h
from gqa_uptrain import checkpoints, train

SEQ_LEN = 32


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    yield from h.compilation_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A random LlamaForCausalLM (4 heads, 2 KV heads) with a real BPE tokenizer.json."""
    import torch
    import transformers

    folder = tmp_path_factory.mktemp("llama")
    h.make_bpe_tokenizer(str(folder / "tokenizer.json"))
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float().eval()
    model.save_pretrained(str(folder))
    return str(folder), model


def _hf_windowed_loss(model, ids: list[int], seq_len: int) -> tuple[float, int]:
    """transformers' own mean loss over evaluate's windows (seq_len targets, overlap 1 token)."""
    import torch

    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, seq_len):
        chunk = torch.tensor([ids[start:start + seq_len + 1]])
        with torch.no_grad():
            loss = model(input_ids=chunk, labels=chunk).loss.item()  # mean over len - 1 targets
        total += loss * (chunk.shape[1] - 1)
        count += chunk.shape[1] - 1
    return total / count, count


def test_evaluate_cli_matches_transformers_loss(hf_folder, tmp_path):
    folder, model = hf_folder
    text = h.stdlib_text("abc.py", 1500)
    text_file = tmp_path / "text.py"
    text_file.write_text(text)
    out = h.run([os.sys.executable, "-m", "gqa_uptrain.evaluate", f"--checkpoint={folder}",
                 f"--text_file={text_file}", f"--seq_len={SEQ_LEN}", "--batch_size=4"])
    result = json.loads(out.stdout.strip().splitlines()[-1])

    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(os.path.join(folder, "tokenizer.json")).encode(text).ids
    assert ids[0] == 0  # the tokenizer's BOS rule: <s> first
    assert len(ids) > 3 * SEQ_LEN  # several windows, the last one partial
    want, count = _hf_windowed_loss(model, ids, SEQ_LEN)
    assert result["tokens"] == count == len(ids) - 1
    np.testing.assert_allclose(result["loss"], want, rtol=2e-5)
    assert result["perplexity"] == pytest.approx(math.exp(want), rel=1e-4)


def test_evaluate_cli_bad_path_is_one_line_error(tmp_path):
    out = h.run([os.sys.executable, "-m", "gqa_uptrain.evaluate",
                 f"--checkpoint={tmp_path / 'nothing'}"], check=False)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "nothing" in lines[0], out.stderr


def test_uptrain_from_hf_folder(hf_folder, tmp_path):
    folder, _ = hf_folder
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(h.stdlib_text("argparse.py", 20000))
    overrides = {"init_checkpoint": folder, "data.source": "files", "data.path": str(corpus),
                 "data.val_fraction": 0.0, "data.seq_len": SEQ_LEN, "batch_size": 4,
                 "eval_every": 0, "final_eval_batches": 0, "progress_bar": False}
    # A Hugging Face folder records no pretraining steps: alpha x steps cannot be used.
    with pytest.raises(train.TrainError, match="set config.num_steps"):
        train.train_and_evaluate(h.config(h.UPTRAIN, "num_kv_heads=1", **overrides),
                                 str(tmp_path / "no_steps"))
    workdir = str(tmp_path / "up")
    final = train.train_and_evaluate(
        h.config(h.UPTRAIN, "num_kv_heads=1", num_steps=2, **overrides), workdir)
    assert final["step"] == 2 and math.isfinite(final["train/loss"])
    with open(os.path.join(workdir, "run.json")) as f:
        run = json.load(f)
    assert run["tokenizer"] == os.path.join(folder, "tokenizer.json")
    assert run["init"]["converted"]["num_kv_heads_before"] == 2
    meta = checkpoints.read_meta(checkpoints.latest_checkpoint(workdir))
    assert meta.model_config.num_kv_heads == 1 and meta.source_step is None

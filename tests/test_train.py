"""The training loop in-process on tiny configs: one run, overfitting, faults, configs, uptraining
from a converted checkpoint, and evaluate on this project's checkpoints."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _helpers_train as h
from gqa_uptrain import checkpoints, data, evaluate, losses, optim, pooling, train, train_step


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
    yield from h.compilation_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny MHA model trained for 12 steps (loss well below a random model's)."""
    workdir = str(tmp_path_factory.mktemp("pretrain"))
    config = h.config(num_steps=12, checkpoint_every=4, eval_every=6,
                      **{"optimizer.learning_rate": 1e-2})
    final = train.train_and_evaluate(config, workdir)
    return workdir, config, final


def test_one_run_writes_checkpoints_metrics_and_manifest(pretrained):
    workdir, config, final = pretrained
    assert checkpoints.list_steps(workdir) == [8, 12]  # every 4, keep the last 2
    records = h.metrics(workdir)
    steps = [r["step"] for r in records]
    assert steps == list(range(0, 13))  # step 0: validation before training; then every step
    assert "val/loss" in records[0] and "val/loss" in records[6] and "val/loss" in records[12]
    assert all(math.isfinite(r["train/loss"]) for r in records[1:])
    assert records[12]["val/loss"] == final["val/loss"]
    assert final["val/loss"] < records[0]["val/loss"] - 1.0  # it learned something
    # The unigram entropy printed beside the loss is that of the scored validation tokens.
    assert 0 < final["val/unigram_entropy"] < math.log(256)
    meta = checkpoints.read_meta(checkpoints.latest_checkpoint(workdir))
    assert meta.step == 12 and meta.source_step is None
    assert meta.provenance["tokenizer"] == "byte"
    with open(os.path.join(workdir, "data_manifest.json")) as f:
        manifest = json.load(f)
    rel, sha = manifest["validation"]["files"][0]
    import hashlib
    with open(os.path.join(data.stdlib_root(), rel), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == sha
    assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_evaluate_project_checkpoint_matches_training_metrics(pretrained):
    workdir, config, final = pretrained
    # Validation split with the run's recorded data and seq_len, final_eval_batches=2 of 4 rows.
    result = evaluate.evaluate_model(workdir, batch_size=config.batch_size,
                                     max_batches=config.final_eval_batches)
    assert result["seq_len"] == config.data.seq_len
    assert result["tokens"] == final["val/tokens"]
    np.testing.assert_allclose(result["loss"], final["val/loss"], rtol=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))


def test_workdir_with_a_different_config_is_an_error(pretrained):
    workdir, config, _ = pretrained
    other = h.config(num_steps=12, checkpoint_every=4, eval_every=6,
                     **{"optimizer.learning_rate": 2e-2})
    with pytest.raises(train.TrainError, match="optimizer.learning_rate"):
        train.train_and_evaluate(other, workdir)
    # A finished run rerun with its own config does nothing and changes nothing.
    before = h.metrics(workdir)
    train.train_and_evaluate(config, workdir)
    assert h.metrics(workdir) == before


def test_uptrain_starts_at_the_converted_models_loss(pretrained, tmp_path):
    source, pre_config, _ = pretrained
    config = h.config(h.UPTRAIN, "smoke,num_kv_heads=2", init_checkpoint=source, alpha=0.25,
                      num_steps=-1,
                      **{"data.seq_len": 32, "batch_size": 4, "eval_batches": 2,
                         "final_eval_batches": 2, "progress_bar": False})
    workdir = str(tmp_path / "up")
    train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "run.json")) as f:
        run = json.load(f)
    assert run["num_steps"] == 3  # alpha x the source's 12 steps
    assert run["source_step"] == 12
    meta = checkpoints.read_meta(checkpoints.latest_checkpoint(workdir))
    assert meta.model_config.num_kv_heads == 2 and meta.source_step == 12

    # The converted model's loss, computed independently of the trainer.
    params, meta_src, _ = checkpoints.restore(checkpoints.latest_checkpoint(source))
    converted, conv_config = pooling.convert_params(params, meta_src.model_config, 2)
    spec = data.DataSpec.from_dict({**pre_config.data.to_dict(), "cache_dir": str(tmp_path)})
    stream, _ = data.load_split(spec, data.ByteTokenizer(), "validation", str(tmp_path))
    step = losses.make_eval_step(conv_config, "auto")
    expected = evaluate.evaluate_stream(step, {k: jnp.asarray(v) for k, v in converted.items()},
                                        stream, seq_len=32, batch_size=4, max_batches=2)
    first = h.metrics(workdir)[0]
    assert first["step"] == 0
    np.testing.assert_allclose(first["val/loss"], expected["loss"], rtol=1e-5)
    # Not silently re-initialised: a random model (the source's own step 0) is far worse.
    assert first["val/loss"] < h.metrics(source)[0]["val/loss"] - 1.0


def test_overfits_a_tiny_batch(tmp_path):
    """A tiny model memorises a one-batch corpus (a local text file through `datasets`)."""
    with open(os.path.join(data.stdlib_root(), "abc.py"), "rb") as f:
        text = f.read()[:128]  # + BOS = 129 tokens = exactly 4 windows of 32 = one batch
    path = tmp_path / "tiny.txt"
    path.write_bytes(text)
    config = h.config(num_steps=120, log_every=120, eval_every=0, final_eval_batches=0,
                      checkpoint_every=0, **{"data.source": "files", "data.path": str(path),
                                             "data.val_fraction": 0.0,
                                             "optimizer.learning_rate": 1e-2,
                                             "optimizer.schedule": "constant"})
    workdir = str(tmp_path / "w")
    final = train.train_and_evaluate(config, workdir)
    first = h.metrics(workdir)[0]
    assert final["step"] == 120 and first["step"] == 120
    assert final["train/loss"] < 0.1, final
    with open(os.path.join(workdir, "data_manifest.json")) as f:
        assert json.load(f)["train"]["num_tokens"] == 129


def test_gradient_accumulation_and_remat_match_one_plain_step(pretrained):
    """batch [1, 4, seq] without remat == [2, 2, seq] micro-batches with remat."""
    workdir, config, _ = pretrained
    params, meta, _ = checkpoints.restore(checkpoints.latest_checkpoint(workdir))
    with open(os.path.join(data.stdlib_root(), "abc.py"), "rb") as f:
        stream = data.tokenize([f.read()], data.ByteTokenizer())
    rows = data.window_rows(stream, np.arange(4), 16)
    rows["loss_mask"][1, :5] = 0  # unequal token counts per micro-batch
    schedule = optim.make_schedule("constant", peak_lr=1e-3, warmup_steps=0, total_steps=10,
                                   decay_fraction=0.0, min_lr_ratio=1.0)
    tx = optim.make_optimizer(schedule, params, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1,
                              clip_norm=0.0)
    results = []
    for accum, remat in ((1, False), (2, True)):
        step = jax.jit(train_step.make_train_step(meta.model_config, tx, implementation="auto",
                                                  remat=remat))
        batch = {k: jnp.asarray(v).reshape(accum, 4 // accum, 16) for k, v in rows.items()}
        results.append(step(params, tx.init(params), batch))
    one, two = results
    np.testing.assert_allclose(one[2]["loss"], two[2]["loss"], rtol=1e-6)
    np.testing.assert_allclose(one[2]["grad_norm"], two[2]["grad_norm"], rtol=1e-5)
    for name in one[0]:
        np.testing.assert_allclose(one[0][name], two[0][name], rtol=1e-5, atol=1e-7)
    assert not np.allclose(one[0]["embed"], params["embed"])  # the step did update


def test_divergence_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    # Warmup (W = 2): step 1's rate is 1e8, which leaves every param finite but ~1e8 (a good
    # checkpoint); the gradient at those params overflows, so step 2 is not finite.
    config = h.config(num_steps=4, checkpoint_every=1, eval_every=0, final_eval_batches=0,
                      **{"optimizer.learning_rate": 2e8, "optimizer.clip_norm": 0.0})
    workdir = str(tmp_path)
    with pytest.raises(FloatingPointError, match="at step 2 ") as e:
        train.train_and_evaluate(config, workdir)
    assert "checkpoints/1" in str(e.value)
    assert checkpoints.list_steps(workdir) == [1]
    params, _, _ = checkpoints.restore(checkpoints.latest_checkpoint(workdir))
    assert all(np.isfinite(np.asarray(v)).all() for v in params.values())


def test_schedules():
    kw = dict(peak_lr=1.0, warmup_steps=10, total_steps=110, decay_fraction=0.5, min_lr_ratio=0.1)
    cosine = optim.make_schedule("cosine", **kw)
    wsd = optim.make_schedule("wsd", **kw)
    constant = optim.make_schedule("constant", **kw)
    for s in (cosine, wsd, constant):
        # Warmup lr(s) = peak (s + 1) / W: step 0 already moves the weights; the peak at W - 1.
        assert float(s(0)) == pytest.approx(0.1) and float(s(4)) == pytest.approx(0.5)
        assert float(s(9)) == pytest.approx(1.0) and float(s(10)) == pytest.approx(1.0)
    for name in optim.SCHEDULES:  # lr(0) > 0 for every schedule and warmup, 1 included
        for warmup in (1, 2, 5, 110):
            s = optim.make_schedule(name, **{**kw, "warmup_steps": warmup})
            assert float(s(0)) == pytest.approx(1.0 / warmup), (name, warmup)
            assert float(s(warmup - 1)) == pytest.approx(1.0), (name, warmup)
    assert float(cosine(60)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert float(cosine(110)) == pytest.approx(0.1)
    assert float(wsd(55)) == pytest.approx(1.0)  # stable until the last 55 steps
    assert float(wsd(55 + 27.5)) == pytest.approx(0.55, abs=0.02)
    assert float(wsd(110)) == pytest.approx(0.1)
    assert float(constant(110)) == 1.0
    with pytest.raises(ValueError, match="schedule='linear'"):
        optim.make_schedule("linear", **kw)


def test_configs_define_the_same_keys_and_parse_arguments():
    pre = h.load_config_module(h.PRETRAIN)
    up = h.load_config_module(h.UPTRAIN)

    def keys(c, prefix=""):
        out = set()
        for k, v in c.items():
            out |= keys(v, f"{prefix}{k}.") if hasattr(v, "items") and k != "model" else {
                prefix + k}
        return out

    assert keys(pre.get_config()) == keys(up.get_config())
    c = up.get_config("num_kv_heads=4,method=first")
    assert (c.num_kv_heads, c.convert_method, c.num_steps, c.alpha) == (4, "first", -1, 0.05)
    assert up.get_config("smoke,num_kv_heads=2").num_steps > 0
    assert pre.get_config("smoke").num_steps < pre.get_config().num_steps
    assert pre.get_config("size=base").model.d_model == 768
    with pytest.raises(ValueError, match="num_kv_head"):
        up.get_config("num_kv_head=4")
    locked = h.config()
    with pytest.raises(AttributeError):
        locked.optimizer.learnin_rate = 1.0


def test_command_line_typo_is_an_error(tmp_path):
    out = h.run(h.train_cmd(str(tmp_path), h.cli_flags(**{"optimizer.learnin_rate": 1.0})),
                check=False, timeout=120)
    assert out.returncode != 0
    assert "learnin_rate" in out.stderr
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))

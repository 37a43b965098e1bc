"""The benchmark commands decode / train / convert: each `--quick` form runs as its command line and
ends with its JSON headline under the documented keys, its targets "not judged"; decode reports the
cost model's bytes.

No timing is asserted: speed is judged by the benchmarks themselves, not by a timed test.
"""

import json
import os
import subprocess
import sys

import pytest

from gqa_uptrain import bench, hf, perf
from gqa_uptrain.cpu import hostmem
from gqa_uptrain.model import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_bench(*args: str, timeout: int = 240) -> tuple[dict, list[str]]:
    """Runs `python -m gqa_uptrain.bench ARGS`; returns (last stdout line as JSON, stdout lines)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "gqa_uptrain.bench", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]), lines


def _table_rows(lines: list[str]) -> list[list[str]]:
    """Body rows of the Markdown table(s) in the output."""
    rows = [line for line in lines if line.startswith("| ") and "---" not in line]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]


def _assert_not_judged(headline: dict, lines: list[str]) -> None:
    """A --quick run's times mean nothing: every target says so, in the JSON and printed."""
    assert headline["targets"] and set(headline["targets"].values()) == {bench.NOT_JUDGED}
    (printed,) = [line for line in lines if line.startswith("Targets: ")]
    assert printed == "Targets: " + "; ".join(f"{name} {bench.NOT_JUDGED}"
                                              for name in headline["targets"])


MACHINE_KEYS = {"date_utc", "cpu", "cpu_count", "platform", "device", "jax", "python",
                "malloc_env"}
INHERITED_MALLOC = hostmem.in_force()
# train re-runs itself with hostmem.ENV (where wanted); decode and convert must not (hostmem.py).
TUNED_MALLOC = hostmem.ENV if hostmem.wanted() else INHERITED_MALLOC


@pytest.mark.slow
def test_decode_quick_reports_the_cost_models_bytes():
    headline, lines = _run_bench("decode", "--quick")
    assert {"bench", "quick", "machine", "config", "batch", "contexts", "repeats",
            "implementation", "torch_threads", "bandwidth_gbps", "peak_gflops", "rows",
            "targets"} <= set(headline)
    assert headline["bench"] == "decode" and headline["quick"] is True
    assert set(headline["machine"]) == MACHINE_KEYS
    assert headline["machine"]["malloc_env"] == INHERITED_MALLOC
    assert headline["bandwidth_gbps"] > 0 and headline["peak_gflops"] > 0
    assert set(headline["targets"]) == {"all_ge_70pct_roofline_at_long_context",
                                        "faster_than_hf_every_g", "monotonic",
                                        "half_ideal_speedup_at_long"}
    _assert_not_judged(headline, lines)
    config = ModelConfig.from_dict(headline["config"])
    batch, contexts = headline["batch"], headline["contexts"]
    rows = headline["rows"]
    assert {(r["num_kv_heads"], r["context"]) for r in rows} == {
        (g, c) for g in (config.num_heads, 1) for c in contexts}
    for r in rows:
        assert {"context", "num_kv_heads", "ms_per_token", "hf_ms_per_token", "kv_cache_mib",
                "bytes_per_step", "flops_per_step", "roofline_ms", "roofline_fraction",
                "speedup_vs_mha", "ideal_speedup", "speedup_vs_hf"} <= set(r)
        assert r["ms_per_token"] > 0 and r["hf_ms_per_token"] > 0, r.get("hf_error")
        cost = perf.decode_cost(config.replace(num_kv_heads=r["num_kv_heads"]), batch,
                                r["context"])
        assert r["bytes_per_step"] == cost.total_bytes
        assert r["flops_per_step"] == cost.flops
        assert r["kv_cache_mib"] * 2 ** 20 == pytest.approx(cost.kv_read_bytes)
        assert r["roofline_ms"] == pytest.approx(1e3 * cost.roofline_seconds(
            headline["bandwidth_gbps"] * 1e9, headline["peak_gflops"] * 1e9))
        if r["num_kv_heads"] == config.num_heads:
            assert r["speedup_vs_mha"] == 1.0 and r["ideal_speedup"] == pytest.approx(1.0)

    # And the same bytes by hand, for the quick model (d_model 128, 2 layers, 4 heads of 32,
    # mlp 352, vocab 512, untied, fp32) at num_kv_heads 1. Per layer: q 128·128 = 16384,
    # k 128·32 = 4096, v 4096, o 16384, norms 256, MLP 3·128·352 = 135168 -> 176384; 2 layers
    # 352768, + final norm 128 + lm_head 128·512 = 65536 -> 418432 non-embedding weights.
    assert (config.d_model, config.num_layers, config.num_heads, config.head_dim,
            config.mlp_dim, config.vocab_size, batch) == (128, 2, 4, 32, 352, 512, 2)
    mqa_long = next(r for r in rows if r["num_kv_heads"] == 1 and r["context"] == max(contexts))
    context = mqa_long["context"]
    kv_per_token = 2 * 2 * 1 * 32 * 4  # K and V, 2 layers, 1 KV head, head_dim 32, fp32
    weights = (418432 + batch * 128) * 4  # plus the batch's 2 embedding rows
    assert mqa_long["bytes_per_step"] == weights + (batch * context + batch) * kv_per_token
    assert mqa_long["flops_per_step"] == 2 * batch * 418432 + 4 * 2 * batch * 4 * context * 32

    table = _table_rows(lines)
    assert len(table) == len(rows)
    assert not [row for row in table if "n/a" in " ".join(row)]


@pytest.mark.slow
def test_train_quick_emits_tokens_per_second_and_mfu():
    headline, lines = _run_bench("train", "--quick")
    assert {"bench", "quick", "machine", "peak_gflops", "repeats", "implementation",
            "torch_threads", "rows", "targets"} <= set(headline)
    assert headline["bench"] == "train" and set(headline["machine"]) == MACHINE_KEYS
    assert headline["machine"]["malloc_env"] == TUNED_MALLOC
    assert set(headline["targets"]) == {"ahead_of_hf_every_shape", "mfu_ge_70pct_every_shape"}
    _assert_not_judged(headline, lines)
    (row,) = headline["rows"]
    assert {"shape", "config", "batch", "seq_len", "params", "flops_per_token", "step_ms",
            "tokens_per_s", "mfu", "hf_step_ms", "hf_tokens_per_s", "hf_mfu",
            "speedup_vs_hf"} <= set(row)
    config = ModelConfig.from_dict(row["config"])
    assert row["flops_per_token"] == perf.train_flops_per_token(config, row["seq_len"])
    tokens = row["batch"] * row["seq_len"]
    for ms, per_s, mfu in ((row["step_ms"], row["tokens_per_s"], row["mfu"]),
                           (row["hf_step_ms"], row["hf_tokens_per_s"], row["hf_mfu"])):
        assert ms > 0
        assert per_s == pytest.approx(tokens / (ms / 1e3))
        peak = headline["peak_gflops"] * 1e9
        assert mfu == pytest.approx(per_s * row["flops_per_token"] / peak)
    assert len(_table_rows(lines)) == 1


def test_train_flops_per_token_by_hand():
    # d_model 64, 2 layers, 4 heads of 16, 2 KV heads, mlp 128, vocab 100, untied. Per layer:
    # q 4096, k 2048, v 2048, o 4096, norms 128, MLP 24576 -> 36992; 2 layers 73984, + final
    # norm 64 + lm_head 6400 = 80448 matmul params (the input embedding is a gather).
    config = ModelConfig(vocab_size=100, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         mlp_dim=128)
    assert perf.matmul_params(config) == 80448
    assert perf.train_flops_per_token(config, 32) == 6 * 80448 + 12 * 2 * 32 * 4 * 16
    # Tied: the table is the head, so it counts once, as lm_head did.
    assert perf.matmul_params(config.replace(tie_embeddings=True)) == 80448


def test_convert_quick_caches_its_checkpoint_and_cleans_its_outputs(tmp_path):
    cache = tmp_path / "cache"
    headline, lines = _run_bench("convert", "--quick", "--cache_dir", str(cache))
    assert {"bench", "quick", "machine", "checkpoint", "num_kv_heads_before",
            "num_kv_heads_after", "method", "repeats", "copy_s", "convert_s", "copy_runs_s",
            "convert_runs_s", "time_ratio", "copy_peak_rss_mib", "convert_peak_rss_mib",
            "convert_output_bytes", "rss_fraction", "targets"} <= set(headline)
    assert headline["bench"] == "convert" and set(headline["machine"]) == MACHINE_KEYS
    assert headline["machine"]["malloc_env"] == INHERITED_MALLOC
    assert set(headline["targets"]) == {"time_le_2x_copy", "rss_le_25pct_of_checkpoint"}
    _assert_not_judged(headline, lines)
    assert headline["time_ratio"] == pytest.approx(headline["convert_s"] / headline["copy_s"])
    assert headline["convert_peak_rss_mib"] > headline["copy_peak_rss_mib"] > 0
    checkpoint = headline["checkpoint"]
    assert checkpoint["generated"] is True
    # The synthetic checkpoint is a real sharded HF folder: the converter's own reader accepts it.
    config = hf.read_hf_config(checkpoint["path"])
    layout = hf.hf_layout(config)
    assert (layout.num_heads, layout.num_kv_heads) == (headline["num_kv_heads_before"],) * 2
    tensors, files, index = hf.weight_tensors(checkpoint["path"])
    assert len(files) == 3 and index is not None and hf.check_tensors(tensors, layout) == []
    assert sum(t.nbytes for t in tensors.values()) <= checkpoint["bytes"]
    # K/V went from 8 to 2 heads: the output is smaller by 3/4 of the K/V bytes (give or take
    # the small JSON files: the converter adds its provenance).
    kv = sum(t.nbytes for name, t in tensors.items() if "k_proj" in name or "v_proj" in name)
    assert checkpoint["bytes"] - headline["convert_output_bytes"] == pytest.approx(0.75 * kv,
                                                                                   abs=2 ** 16)
    # Only the checkpoint stays in the cache; a second run reuses it.
    assert os.listdir(cache) == [os.path.basename(checkpoint["path"])]
    again, _ = _run_bench("convert", "--quick", "--cache_dir", str(cache))
    assert again["checkpoint"]["generated"] is False
    assert again["checkpoint"]["bytes"] == checkpoint["bytes"]
    assert os.listdir(cache) == [os.path.basename(checkpoint["path"])]
    assert len(_table_rows(lines)) == 2


def test_targets_are_judged_unless_quick(capsys, monkeypatch):
    """bench.main reports targets (met / missed / n/a) for every subcommand, and under --quick
    none: a stand-in benchmark, so no run is needed."""
    headline = {"bench": "decode", "targets": {"fast": True, "small": False, "peer": None}}
    monkeypatch.setitem(bench.SUBCOMMANDS, "decode", (bench.SUBCOMMANDS["decode"][0],
                                                      lambda args: json.loads(json.dumps(headline))))
    assert bench.main(["decode"]) == 0
    *_, printed, last = capsys.readouterr().out.strip().splitlines()
    assert printed == "Targets: fast met; small missed; peer n/a"
    assert json.loads(last)["targets"] == headline["targets"]
    assert bench.main(["decode", "--quick"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    _assert_not_judged(json.loads(lines[-1]), lines)


@pytest.mark.parametrize("argv,needle", [
    (["decode", "--quick", "--num_kv_heads", "3"], "--num_kv_heads 3"),
    (["train", "--quick", "--shapes", "nope"], "nope"),
    (["convert", "--quick", "--repeats", "0"], "--repeats 0"),
])
def test_bad_values_give_one_line_and_exit_1(capsys, tmp_path, argv, needle):
    assert bench.main(argv + (["--cache_dir", str(tmp_path)] if argv[0] == "convert" else [])) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
    assert captured.out == ""
    assert os.listdir(tmp_path) == []  # nothing generated

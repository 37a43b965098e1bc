"""The decode bytes/FLOPs model, checked against a computation done by hand."""

from gqa_uptrain import perf
from gqa_uptrain.model import ModelConfig


def test_decode_cost_matches_hand_computation():
    # d_model 64, 2 layers, 4 query heads, 2 KV heads, head_dim 16, mlp 128, vocab 100, untied, fp32.
    config = ModelConfig(vocab_size=100, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         mlp_dim=128)
    cost = perf.decode_cost(config, batch=3, context=10)
    # Per layer: q 64·4·16 = 4096, k 64·2·16 = 2048, v 2048, o 4096, two norms 128,
    # MLP 3·64·128 = 24576 -> 36992; two layers 73984. Non-embedding params: 73984 + final norm 64 +
    # lm_head 6400 = 80448. The step reads those plus 3 embedding rows of 64: 80640 floats.
    assert cost.weight_bytes == 80640 * 4
    # KV per token: 2 (K, V) · 2 layers · 2 kv heads · 16 · 4 bytes = 512; 3 sequences · 10 tokens.
    assert cost.kv_read_bytes == 3 * 10 * 512
    assert cost.kv_write_bytes == 3 * 512
    # 2 FLOPs per weight per sequence, plus q·k and p·v: 4 · 2 layers · 3 · 4 heads · 10 · 16.
    assert cost.flops == 2 * 3 * 80448 + 4 * 2 * 3 * 4 * 10 * 16
    assert cost.total_bytes == 80640 * 4 + 15360 + 1536
    # Roofline picks the binding limit.
    assert cost.roofline_seconds(bandwidth=1e9, peak_flops=1e15) == cost.total_bytes / 1e9
    assert cost.roofline_seconds(bandwidth=1e15, peak_flops=1e6) == cost.flops / 1e6


def test_tied_embeddings_are_read_whole_as_the_head():
    untied = ModelConfig(vocab_size=100, d_model=64, num_layers=1, num_heads=4, num_kv_heads=4,
                         mlp_dim=128)
    tied = untied.replace(tie_embeddings=True)
    # Same bytes: tied reads the 100×64 table once as the head instead of a separate lm_head.
    assert perf.decode_cost(tied, 2, 5).weight_bytes == perf.decode_cost(untied, 2, 5).weight_bytes
    assert perf.decode_cost(tied, 2, 5).flops == perf.decode_cost(untied, 2, 5).flops


def test_median_interval_is_the_binomial_order_statistics():
    import math

    import numpy as np
    import pytest

    # n = 10: ranks 2 and 9 (coverage 1 - 2 P(B(10, 1/2) <= 1) = 97.9%); n = 30: ranks 10 and 21.
    assert perf.median_ci(list(range(10, 0, -1))) == (2.0, 9.0)
    assert perf.median_ci(range(1, 31)) == (10.0, 21.0)
    for n in (6, 11, 60):
        lo, hi = perf.median_ci(range(1, n + 1))
        k = int(lo)
        assert hi == n + 1 - k
        tail = sum(math.comb(n, i) for i in range(k)) / 2 ** n
        assert tail <= 0.025 < tail + math.comb(n, k) / 2 ** n  # the largest such k
    with pytest.raises(ValueError, match="5 repeats are too few"):
        perf.median_ci([1.0] * 5)
    # Paired ratios: a variant 5% faster in every round, under noise common to the round, is
    # resolved: the whole interval lies above 1.
    rng = np.random.default_rng(0)
    phase = np.exp(rng.normal(0, 0.3, 60))  # the machine's slow and fast phases, shared
    mha = 10.0 * phase * np.exp(rng.normal(0, 0.01, 60))
    gqa = 10.0 / 1.05 * phase * np.exp(rng.normal(0, 0.01, 60))
    ratio = perf.paired_ratio(mha, gqa)
    assert 1.0 < ratio["lo"] <= ratio["median"] <= ratio["hi"] < 1.1
    assert ratio["median"] == pytest.approx(1.05, abs=0.01)
    with pytest.raises(ValueError, match="differ in length"):
        perf.paired_ratio([1.0] * 6, [1.0] * 7)

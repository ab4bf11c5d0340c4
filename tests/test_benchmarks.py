"""The benchmarks' own logic (not their timings, which belong in benchmarks/results)."""

from benchmarks.bench_mfu_125m import budget_for_params
from dualpath.config import ModelConfig
from dualpath.solver import solve


def test_budget_for_params_is_the_smallest_budget_reaching_the_target():
    backbone = ModelConfig(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, vocab_size=1024, seq_len=128,
                           tie_embeddings=True)
    target = 2.0e6
    r = budget_for_params(backbone, target)
    assert r["arch"] == "dual" and r["K"] == 2 and r["alpha"] == 0.5
    assert r["params"] >= target
    below = solve(backbone, r["budget"] * (1 - 1e-6), "dual", K=2, alpha=0.5, build_multiple=64, match="paper")
    assert below["params"] < target
    # widths are those the solver gives for this budget, and both paths have a real FFN
    assert r["d_ffn_deep"] >= 64 and r["d_ffn_wide"] > r["d_ffn_deep"]

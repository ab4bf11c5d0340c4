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


def test_bench_train_rows_and_its_plain_gpt_baseline(tmp_path, monkeypatch):
    """bench_train at a tiny shape with every path: the rows it reports, ratios computed from its own
    timings, and a PlainGPT whose matmuls are PureWide's (so PureWide's FLOPs count for both)."""
    import torch.nn as nn

    import benchmarks.common
    from benchmarks.bench_train import PLAIN, PlainGPT, main
    from dualpath.model import DualPathLM

    monkeypatch.setattr(benchmarks.common, "RESULTS", tmp_path)
    out = main(["--d-model", "32", "--n-layers", "2", "--n-heads", "2", "--vocab-size", "128", "--seq-len", "32",
                "--budget", "2e5", "--batch", "1", "--rounds", "1", "--threads", "1", "--reference"])
    rows = {(r["model"], r["path"]): r for r in out["rows"]}
    assert set(rows) == {(m, p) for p in ("fast", "fast model, default AdamW", "reference")
                         for m in ("wide", "loop K=2", "dual K=2 α=0.5")} | {(PLAIN, "fast")}
    wide, plain = rows[("wide", "fast")], rows[(PLAIN, "fast")]
    assert wide["time_per_flop_vs_wide"]["median"] == 1.0
    assert wide["tokens_per_s_vs_plain_gpt"]["median"] == \
        plain["seconds_per_step"]["median"] / wide["seconds_per_step"]["median"]
    assert (tmp_path / "train_mfu.json").is_file()

    backbone = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, vocab_size=128, seq_len=32)
    cfg = solve(backbone, 2e5, "wide", K=1, alpha=0.5, build_multiple=64, match="true", seq_len=32)["config"]

    def matmul_weights(model):
        return sorted(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))

    assert sum(matmul_weights(PlainGPT(cfg))) == sum(matmul_weights(DualPathLM(cfg)))

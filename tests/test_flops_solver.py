"""FLOP accounting (against torch's FlopCounterMode and closed forms), parameter counts, and the iso-FLOP
solver (against the paper's F_M = 80e6 table and a brute-force implementation of its rules)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dualpath import ConfigError, DualPathLM, ModelConfig, Overrides, swiglu_hidden
from dualpath.solver import PAPER_GRID, solve, solve_grid, table_markdown

REFERENCE = Path("/work/shared/reference/paper_widths_f80m.json")


def tiny(arch, **kw) -> ModelConfig:
    base = dict(arch=arch, vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, seq_len=32,
                d_ffn_deep=96, d_ffn_wide=192, ffn_multiple=16, K=3, max_loops=6)
    base.update(kw)
    return ModelConfig(**base)


def hidden(d_ffn: int, m: int) -> int:
    """The built SwiGLU width, m * ceil(floor(2 d_ffn / 3) / m), in integer arithmetic."""
    return -(-(2 * d_ffn // 3) // m) * m


# ----------------------------------------------------------------------------------------------
# FLOPs of a real forward pass, counted by torch


def counted_forward_flops(model, idx, **kw) -> int:
    # On CPU the fused SDPA kernel is invisible to FlopCounterMode; the math backend decomposes the
    # attention into bmm's that it does count.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx, **kw)
    return counter.get_total_flops()


SHAPES = [
    # (arch, d_model, n_heads, n_kv_heads, T, K, vocab, B)
    ("wide", 32, 4, 4, 16, 1, 128, 2),
    ("wide", 64, 8, 2, 32, 1, 300, 1),
    ("wide", 48, 4, 1, 7, 1, 100, 3),
    ("loop", 32, 4, 4, 16, 3, 128, 2),
    ("loop", 64, 8, 2, 32, 2, 300, 1),
    ("loop", 48, 4, 1, 9, 5, 100, 2),
    ("loop", 32, 2, 2, 24, 1, 200, 2),
    ("dual", 32, 4, 4, 16, 3, 128, 2),
    ("dual", 64, 8, 2, 32, 2, 300, 1),
    ("dual", 48, 4, 1, 9, 4, 100, 2),
    ("dual", 32, 2, 1, 24, 1, 200, 2),
]


@pytest.mark.parametrize("arch,d,H,Hkv,T,K,V,B", SHAPES)
def test_true_flops_match_flop_counter(arch, d, H, Hkv, T, K, V, B):
    cfg = tiny(arch, d_model=d, n_heads=H, n_kv_heads=Hkv, K=K, max_loops=6, vocab_size=V,
               d_ffn_deep=3 * d, d_ffn_wide=6 * d)
    torch.manual_seed(0)
    model = DualPathLM(cfg).eval()
    idx = torch.randint(0, V, (B, T))
    counted = counted_forward_flops(model, idx)
    predicted = model.flops_per_token(T, "true") * B * T
    assert counted > 0
    assert abs(predicted - counted) / counted < 0.01, (predicted, counted)


@pytest.mark.parametrize("arch", ["loop", "dual"])
@pytest.mark.parametrize("K", [1, 5])
def test_true_flops_with_forced_K_match_flop_counter(arch, K):
    torch.manual_seed(0)
    model = DualPathLM(tiny(arch, K=3, max_loops=6, n_kv_heads=2)).eval()
    B, T = 2, 12
    idx = torch.randint(0, 128, (B, T))
    counted = counted_forward_flops(model, idx, overrides=Overrides(K=K))
    predicted = model.flops_per_token(T, "true", K=K) * B * T
    assert abs(predicted - counted) / counted < 0.01, (predicted, counted)
    assert model.flops_per_token(T, "true", K=K) != model.flops_per_token(T, "true")


def test_wide_true_flops_are_exact():
    """Without halting routers every FLOP is a matmul FlopCounterMode sees: the counts agree exactly."""
    torch.manual_seed(0)
    model = DualPathLM(tiny("wide", n_kv_heads=2)).eval()
    idx = torch.randint(0, 128, (2, 20))
    assert counted_forward_flops(model, idx) == model.flops_per_token(20, "true") * 2 * 20


# ----------------------------------------------------------------------------------------------
# Closed forms


def attn_paper(d, H, Hkv):
    n_rep = H // Hkv
    return 4 * d * d + 4 * d * d / n_rep


@pytest.mark.parametrize("d,H,Hkv,K,dd,dw,m", [(32, 4, 4, 3, 96, 192, 16), (64, 8, 2, 2, 100, 250, 32),
                                               (48, 4, 1, 5, 64, 640, 64), (768, 12, 12, 4, 1600, 11392, 256)])
def test_paper_flops_per_layer_closed_form(d, H, Hkv, K, dd, dw, m):
    common = dict(d_model=d, n_heads=H, n_kv_heads=Hkv, K=K, max_loops=K, d_ffn_deep=dd, d_ffn_wide=dw,
                  ffn_multiple=m, seq_len=4096)
    attn = attn_paper(d, H, Hkv)
    h_deep, h_wide = hidden(dd, m), hidden(dw, m)
    assert swiglu_hidden(dd, m) == h_deep and swiglu_hidden(dw, m) == h_wide
    expected = {
        "dual": K * (attn + 6 * d * h_deep) + attn + 6 * d * h_wide + 4 * d,
        "loop": K * (attn + 6 * d * h_deep),
        "wide": attn + 6 * d * h_wide,
    }
    for arch, per_layer in expected.items():
        model = tiny(arch, **common).meta_model()
        for layer in model.layers:
            assert layer.flops_per_token(4096, "paper") == per_layer
            assert layer.flops_per_token(7, "paper") == per_layer  # projections only: independent of T
        # the model's paper number sums the layers and leaves the LM head out
        assert model.flops_per_token(4096, "paper") == 2 * per_layer


@pytest.mark.parametrize("arch", ["wide", "loop", "dual"])
def test_true_flops_closed_form(arch):
    d, H, Hkv, K, V, T, m = 64, 8, 2, 3, 300, 50, 16
    cfg = tiny(arch, d_model=d, n_heads=H, n_kv_heads=Hkv, K=K, vocab_size=V, seq_len=64, ffn_multiple=m,
               d_ffn_deep=150, d_ffn_wide=400)
    model = cfg.meta_model()
    attn = attn_paper(d, H, Hkv) + 4 * d * T  # + QKᵀ and AV over all T keys (n_heads * head_dim = d)
    deep = K * (attn + 6 * d * hidden(150, m)) + (K - 1) * 2 * (d + 1)
    wide = attn + 6 * d * hidden(400, m)
    per_layer = {"wide": wide, "loop": deep, "dual": deep + wide + 4 * d}[arch]
    assert model.layers[0].flops_per_token(T, "true") == per_layer
    assert model.flops_per_token(T, "true") == 2 * per_layer + 2 * d * V
    assert model.train_flops_per_token(T) == 3 * model.flops_per_token(T, "true")
    # default sequence length is the config's
    assert model.flops_per_token(convention="true") == model.flops_per_token(64, "true")
    assert cfg.flops_per_token(T, "true") == model.flops_per_token(T, "true")


@pytest.mark.parametrize("mode,n_logits", [("two_gates", 2), ("softmax", 2), ("convex", 1), ("fixed", 0)])
def test_gate_flops_follow_gate_mode(mode, n_logits):
    model = tiny("dual", gate_mode=mode).meta_model()
    assert model.layers[0].gate.flops_per_token(16, "paper") == 2 * 32 * n_logits


def test_unknown_convention_raises():
    model = tiny("dual").meta_model()
    with pytest.raises(ValueError, match="convention"):
        model.flops_per_token(16, "approx")


# ----------------------------------------------------------------------------------------------
# Parameter counts


def unique_numel(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once


@pytest.mark.parametrize("arch", ["wide", "loop", "dual"])
@pytest.mark.parametrize("tie", [False, True])
def test_param_counts_add_up(arch, tie):
    torch.manual_seed(0)
    model = DualPathLM(tiny(arch, tie_embeddings=tie, n_kv_heads=2))
    c = model.param_counts()
    assert c["total"] == unique_numel(model)
    parts = ("embeddings", "deep", "wide", "gates", "routers", "duo", "other")
    assert set(c) == {"total", "non_embedding", *parts}
    assert sum(c[p] for p in parts) == c["total"]
    assert c["non_embedding"] == c["total"] - c["embeddings"]
    # the meta model (no weights allocated) counts the same
    assert model.cfg.num_params() == c


@pytest.mark.parametrize("arch", ["wide", "loop", "dual"])
def test_param_counts_closed_form(arch):
    d, H, Hkv, V, L, max_loops, m = 32, 4, 2, 128, 2, 6, 16
    cfg = tiny(arch, n_kv_heads=Hkv)
    hd = d // H
    attn = d * d * 2 + 2 * d * (Hkv * hd) + 2 * hd  # wq, wo, wk, wv, q_norm, k_norm
    block = lambda d_ffn: attn + 2 * d + 3 * d * hidden(d_ffn, m)  # + two RMSNorms + SwiGLU
    expect = {"embeddings": 2 * V * d, "other": d, "duo": 0,
              "deep": L * (block(96) + max_loops) if arch != "wide" else 0,
              "routers": L * (d + 2) if arch != "wide" else 0,
              "wide": L * (block(192) + 1) if arch != "loop" else 0,
              "gates": L * (2 * d + 2) if arch == "dual" else 0}
    c = cfg.num_params()
    assert {k: c[k] for k in expect} == expect
    assert c["total"] == sum(expect.values())


# ----------------------------------------------------------------------------------------------
# The solver against the paper's table


PAPER_BACKBONE = dict(d_model=768, n_layers=16, n_heads=12, n_kv_heads=12, vocab_size=50304)
ROWS = json.loads(REFERENCE.read_text())["rows"] if REFERENCE.is_file() else []


def row_id(row):
    return f"{row['arch']}-K{row['K']}" + (f"-a{row['alpha']}" if "alpha" in row else "")


@pytest.mark.skipif(not ROWS, reason=f"{REFERENCE} not available")
@pytest.mark.parametrize("row", ROWS, ids=[row_id(r) for r in ROWS])
def test_solver_reproduces_paper_table(row):
    r = solve(ModelConfig(**PAPER_BACKBONE), 80e6, row["arch"], K=row["K"], alpha=row.get("alpha", 0.5),
              build_multiple=256)
    for path in ("deep", "wide"):
        if f"d_ffn_{path}" in row:
            assert r[f"d_ffn_{path}"] == row[f"d_ffn_{path}"]
            assert swiglu_hidden(row[f"d_ffn_{path}"], 64) == row[f"hidden_{path}_m64"]
            assert r[f"hidden_{path}"] == row[f"hidden_{path}_m256"]
        else:
            assert r[f"d_ffn_{path}"] is None and r[f"hidden_{path}"] is None
    assert round(r["params"] / 1e6) == row["params_M"]
    built = r["config"]
    assert (built.arch, built.K, built.ffn_multiple) == (row["arch"], row["K"], 256)
    assert built.num_params()["total"] == r["params"]


@pytest.mark.skipif(not ROWS, reason=f"{REFERENCE} not available")
def test_paper_grid_is_the_table():
    assert [(a, k, al) for a, k, al in PAPER_GRID] == [(r["arch"], r["K"], r.get("alpha")) for r in ROWS]
    rows = solve_grid(ModelConfig(**PAPER_BACKBONE), 80e6, build_multiple=256)
    assert [r["d_ffn_deep"] for r in rows] == [r.get("d_ffn_deep") for r in ROWS]
    assert [r["d_ffn_wide"] for r in rows] == [r.get("d_ffn_wide") for r in ROWS]
    table = table_markdown(rows).splitlines()
    assert len(table) == 2 + len(ROWS)


# ----------------------------------------------------------------------------------------------
# The solver against a brute-force implementation of the stated rules


def brute_largest(budget, d, m):
    """Largest multiple of m whose FFN (6 d hidden) fits the budget; 0 if none (linear scan)."""
    best, w = 0, m
    while 6 * d * hidden(w, m) <= budget:
        best, w = w, w + m
    return best


def brute_solve(d, H, Hkv, budget, arch, K, alpha, m):
    attn, gate = attn_paper(d, H, Hkv), 4 * d
    if arch == "wide":
        h = m * math.ceil((budget - attn) / (6 * d) / m)
        return None, m * math.ceil(1.5 * h / m)
    if arch == "loop":
        return brute_largest(budget / K - attn, d, m), None
    return (max(m, brute_largest(alpha * (budget - gate) / K - attn, d, m)),
            brute_largest((1 - alpha) * (budget - gate) - attn, d, m))


@pytest.mark.parametrize("d,H,Hkv,budget,m", [(512, 8, 2, 30e6, 64), (256, 4, 4, 7.3e6, 32), (384, 6, 3, 2.2e7, 128)])
@pytest.mark.parametrize("arch,K,alpha", [("wide", 1, 0.5), ("loop", 2, 0.5), ("loop", 5, 0.5), ("dual", 3, 0.3),
                                          ("dual", 2, 0.8)])
def test_solver_follows_paper_rules(d, H, Hkv, budget, m, arch, K, alpha):
    bb = ModelConfig(d_model=d, n_layers=4, n_heads=H, n_kv_heads=Hkv, vocab_size=1000)
    r = solve(bb, budget, arch, K=K, alpha=alpha, multiple=m, build_multiple=m)
    dd, dw = brute_solve(d, H, Hkv, budget, arch, K, alpha, m)
    assert (r["d_ffn_deep"], r["d_ffn_wide"]) == (dd or None, dw or None)
    # paper mismatch is reported against the paper per-layer count
    assert r["mismatch"] == pytest.approx((r["flops_paper_per_layer"] - budget) / budget, rel=1e-12, abs=1e-15)
    if arch == "loop":  # largest width: at or below budget, one step wider would exceed it
        assert r["flops_paper_per_layer"] <= budget
        assert K * (attn_paper(d, H, Hkv) + 6 * d * hidden(dd + m, m)) > budget
    if arch == "wide":  # smallest width that reaches the budget
        assert r["flops_paper_per_layer"] >= budget


BOUNDARY_BB = dict(d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000)


def boundary_budget(arch, K, alpha, w, m, path):
    """The budget at which width w of `path` just fits (exact in float64 for these K and alpha)."""
    d = BOUNDARY_BB["d_model"]
    attn, gate, f = attn_paper(d, 4, 2), 4 * d, 6 * d * hidden(w, m)
    if arch == "loop":
        return K * (attn + f)
    if arch == "wide":
        return attn + 6 * d * w  # here w is the hidden width h that the wide rule rounds up to
    share = alpha / K if path == "deep" else 1 - alpha
    return (attn + f) / share + gate


@pytest.mark.parametrize("arch,K,alpha,path", [("loop", 1, 0.5, "deep"), ("loop", 2, 0.5, "deep"),
                                               ("loop", 4, 0.5, "deep"), ("wide", 1, 0.5, "wide"),
                                               ("dual", 2, 0.5, "deep"), ("dual", 4, 0.75, "deep"),
                                               ("dual", 2, 0.25, "wide"), ("dual", 1, 0.75, "wide")])
@pytest.mark.parametrize("w_mult", [1, 2, 3, 8])
@pytest.mark.parametrize("offset", [-1.0, 0.0, 1.0])
def test_solver_at_exact_width_boundaries(arch, K, alpha, path, w_mult, offset):
    """Budgets one FLOP either side of the point where a width just fits, against the brute force."""
    m = 64
    budget = boundary_budget(arch, K, alpha, w_mult * m, m, path) + offset
    bb = ModelConfig(**BOUNDARY_BB)
    expected = brute_solve(256, 4, 2, budget, arch, K, alpha, m)
    if any(w is not None and w < 1 for w in expected):
        with pytest.raises(ConfigError):
            solve(bb, budget, arch, K=K, alpha=alpha, multiple=m, build_multiple=m)
        return
    r = solve(bb, budget, arch, K=K, alpha=alpha, multiple=m, build_multiple=m)
    assert (r["d_ffn_deep"], r["d_ffn_wide"]) == tuple(w or None for w in expected)


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("T", [256, 2048])
def test_match_true_loop_is_largest_width_at_or_below_budget(K, T):
    bb = ModelConfig(d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=1000, seq_len=T)
    budget, m = 12e6, 64
    r = solve(bb, budget, "loop", K=K, multiple=m, build_multiple=m, match="true", seq_len=T)
    assert r["match"] == "true" and r["seq_len"] == T
    assert r["flops_true_per_layer"] <= budget
    assert r["mismatch"] == pytest.approx((r["flops_true_per_layer"] - budget) / budget, rel=1e-12, abs=1e-15)
    assert r["mismatch"] <= 0
    # one multiple wider would exceed the budget
    wider = ModelConfig(**{**r["config"].__dict__, "d_ffn_deep": r["d_ffn_deep"] + m})
    assert wider.meta_model().layers[0].flops_per_token(T, "true") > budget
    # true matching at a long context leaves less room for the FFN than paper matching
    paper = solve(bb, budget, "loop", K=K, multiple=m, build_multiple=m, seq_len=T)
    assert r["d_ffn_deep"] <= paper["d_ffn_deep"]
    # reported per-token true FLOPs: layers plus the LM head
    assert r["flops_true_per_token"] == 4 * r["flops_true_per_layer"] + 2 * 256 * 1000


@pytest.mark.parametrize("arch,K", [("dual", 2), ("wide", 1)])
def test_match_true_mismatch_is_reported_consistently(arch, K):
    bb = ModelConfig(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, vocab_size=1000, seq_len=1024)
    budget = 20e6
    r = solve(bb, budget, arch, K=K, match="true", multiple=64, build_multiple=64)
    assert r["mismatch"] == pytest.approx((r["flops_true_per_layer"] - budget) / budget, rel=1e-12, abs=1e-15)
    model = r["config"].meta_model()
    assert r["flops_true_per_layer"] == model.layers[0].flops_per_token(1024, "true")
    assert r["flops_paper_per_layer"] == model.layers[0].flops_per_token(1024, "paper")


@pytest.mark.parametrize("arch,K", [("wide", 1), ("loop", 2), ("dual", 3)])
@pytest.mark.parametrize("match", ["paper", "true"])
def test_too_small_budget_raises_config_error(arch, K, match):
    with pytest.raises(ConfigError, match="too small"):
        solve(ModelConfig(**PAPER_BACKBONE), 3e6, arch, K=K, match=match)


@pytest.mark.parametrize("kw", [dict(arch="transformer"), dict(match="exact"), dict(budget=0), dict(K=0),
                                dict(alpha=1.0), dict(alpha=0.0), dict(multiple=0)])
def test_bad_solver_arguments_raise_config_error(kw):
    args = dict(budget=80e6, arch="dual", K=2, alpha=0.5)
    args.update(kw)
    budget, arch = args.pop("budget"), args.pop("arch")
    with pytest.raises(ConfigError):
        solve(ModelConfig(**PAPER_BACKBONE), budget, arch, **args)

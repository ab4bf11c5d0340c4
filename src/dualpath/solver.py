"""The iso-FLOP solver: FFN widths that spend a per-layer budget F_M (the paper's appendix on FLOP matching).

    attn  = 4d² + 4d²/n_rep          ffn(d_ffn) = 6·d·swiglu_hidden(d_ffn, m)        gate = 4d
    dual: d_deep = largest multiple of m (>= m) with ffn(d_deep) <= α(F_M − gate)/K − attn
          d_wide = largest multiple of m with ffn(d_wide) <= (1 − α)(F_M − gate) − attn
    loop: largest multiple of m with ffn <= F_M/K − attn
    wide: h = m·ceil((F_M − attn)/(6d)/m), the smallest that reaches the budget; d_ffn = m·ceil(1.5h/m)

With match="true" the same rules run on true FLOPs per layer at a sequence length T (attention scores and
values, halting routers), which matters at small scale where the scores are a large share.
The costs come from the modules' own `flops_per_token`, so solver and model cannot disagree.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .config import ModelConfig
from .errors import ConfigError
from .model import Attention, Gate, HaltingRouter, SwiGLU, swiglu_hidden

PAPER_GRID = [("wide", 1, None)] + [("loop", k, None) for k in (2, 3, 4)] + [
    ("dual", k, a) for a in (0.25, 0.5, 0.75) for k in (2, 3, 4)]


def _largest_width(budget: float, d_model: int, multiple: int) -> int:
    """Largest d_ffn (a multiple of `multiple`) with 6·d·swiglu_hidden(d_ffn) <= budget; 0 if none."""
    if budget < SwiGLU.flops(d_model, swiglu_hidden(multiple, multiple)):
        return 0
    d = multiple * (math.floor(1.5 * budget / (6 * d_model) / multiple) + 2)
    while d > multiple and SwiGLU.flops(d_model, swiglu_hidden(d, multiple)) > budget:
        d -= multiple
    return d


def _fixed_costs(cfg: ModelConfig, convention: str, seq_len: int) -> tuple[float, float, float]:
    """(attention, gate, halting router) FLOPs per token per call, from the modules themselves."""
    with torch.device("meta"):
        attn = Attention(cfg).flops_per_token(seq_len, convention)
        gate = Gate(dataclasses.replace(cfg, gate_mode="two_gates")).flops_per_token(seq_len, convention)
        router = HaltingRouter(cfg.d_model).flops_per_token(seq_len, convention)
    return attn, gate, router


def solve(backbone: ModelConfig, budget: float, arch: str, K: int = 1, alpha: float = 0.5, multiple: int = 64,
          build_multiple: int = 256, match: str = "paper", seq_len: int | None = None) -> dict:
    """Solve FFN widths for one architecture. Returns a report dict and the built config under 'config'."""
    if arch not in ("wide", "loop", "dual"):
        raise ConfigError(f"--arch must be wide, loop or dual, got '{arch}'")
    if match not in ("paper", "true"):
        raise ConfigError(f"--match must be paper or true, got '{match}'")
    if budget <= 0:
        raise ConfigError(f"--budget must be > 0, got {budget}")
    if K < 1:
        raise ConfigError(f"--K must be >= 1, got {K}")
    if not 0 < alpha < 1 and arch == "dual":
        raise ConfigError(f"--alpha must be in (0, 1), got {alpha}")
    if multiple < 1 or build_multiple < 1:
        raise ConfigError("--multiple and --build-multiple must be >= 1")
    K = 1 if arch == "wide" else K
    T = seq_len or backbone.seq_len
    base = dataclasses.replace(backbone, arch=arch, K=K, max_loops=max(backbone.max_loops, K), ffn_multiple=multiple,
                               d_ffn_deep=0, d_ffn_wide=0)
    attn, gate, router = _fixed_costs(base, match, T)
    d = backbone.d_model
    # A loop of K steps calls the halting router K-1 times; spread that over the steps.
    router_per_step = router * (K - 1) / K
    d_deep = d_wide = 0
    if arch == "wide":
        h = multiple * math.ceil((budget - attn) / (6 * d) / multiple)
        d_wide = multiple * math.ceil(1.5 * h / multiple)
    elif arch == "loop":
        d_deep = _largest_width(budget / K - attn - router_per_step, d, multiple)
    else:
        after_gate = budget - gate
        d_deep = max(multiple, _largest_width(alpha * after_gate / K - attn - router_per_step, d, multiple))
        d_wide = _largest_width((1 - alpha) * after_gate - attn, d, multiple)
    for name, width in (("d_ffn_deep", d_deep), ("d_ffn_wide", d_wide)):
        needed = {"wide": ("d_ffn_wide",), "loop": ("d_ffn_deep",), "dual": ("d_ffn_deep", "d_ffn_wide")}[arch]
        if name in needed and width < 1:
            raise ConfigError(f"budget {budget:.4g} is too small for arch={arch} K={K} alpha={alpha}: "
                              f"no {name} fits after attention ({attn:.4g} FLOPs)")

    built = dataclasses.replace(base, ffn_multiple=build_multiple, d_ffn_deep=d_deep, d_ffn_wide=d_wide).validate()
    model = built.meta_model()
    layer = model.layers[0]
    per_layer_paper = layer.flops_per_token(T, "paper")
    per_layer_matched = layer.flops_per_token(T, match)
    params = model.param_counts()
    return {
        "arch": arch, "K": K, "alpha": alpha if arch == "dual" else None,
        "budget": budget, "match": match, "seq_len": T, "multiple": multiple, "build_multiple": build_multiple,
        "d_ffn_deep": d_deep or None, "d_ffn_wide": d_wide or None,
        "hidden_deep": swiglu_hidden(d_deep, build_multiple) if d_deep else None,
        "hidden_wide": swiglu_hidden(d_wide, build_multiple) if d_wide else None,
        "params": params["total"], "params_non_embedding": params["non_embedding"], "param_parts": params,
        "flops_paper_per_layer": per_layer_paper,
        "flops_true_per_layer": layer.flops_per_token(T, "true"),
        "flops_true_per_token": model.flops_per_token(T, "true"),
        "mismatch": (per_layer_matched - budget) / budget,
        "config": built,
    }


def solve_grid(backbone: ModelConfig, budget: float, grid=PAPER_GRID, **kw) -> list[dict]:
    return [solve(backbone, budget, arch, K=k, alpha=a if a is not None else 0.5, **kw) for arch, k, a in grid]


def table_markdown(rows: list[dict]) -> str:
    head = ("| arch | K | α | d_ffn_deep | d_ffn_wide | hidden_deep | hidden_wide | params (M) | "
            "paper FLOPs/layer (M) | mismatch | true FLOPs/token (M) |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    name = {"wide": "PureWide", "loop": "PureLoop", "dual": "Dual"}

    def f(v):
        return "–" if v is None else str(v)

    for r in rows:
        lines.append(
            f"| {name[r['arch']]} | {r['K']} | {f(r['alpha'])} | {f(r['d_ffn_deep'])} | {f(r['d_ffn_wide'])} | "
            f"{f(r['hidden_deep'])} | {f(r['hidden_wide'])} | {r['params'] / 1e6:.1f} | "
            f"{r['flops_paper_per_layer'] / 1e6:.2f} | {r['mismatch'] * 100:+.2f}% | "
            f"{r['flops_true_per_token'] / 1e6:.1f} |")
    return "\n".join(lines)

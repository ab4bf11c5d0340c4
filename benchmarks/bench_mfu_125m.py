"""bf16 + torch.compile training MFU of a 125M-parameter Dual model (K=2, α=0.5) on a GPU.

The backbone is d=512, L=12, 8 heads, vocab 50304, T=1024, tied embeddings (at d=768 a 125M Dual model has no
room for a deep FFN); the per-layer budget (paper convention) is found by bisection so the Dual model has the
target parameter count (d_ffn_deep 1600, d_ffn_wide 4416 at 125.3M), and PureWide at the same budget is timed
beside it. MFU divides true training FLOPs/s by a bf16 GEMM peak measured in the same run (the spec-sheet peak
is recorded too).   python -m benchmarks.bench_mfu_125m [--target-params 125e6 --batch 16]
"""

from __future__ import annotations

import argparse

import torch

from dualpath.config import ModelConfig
from dualpath.errors import ConfigError
from dualpath.perf import GPU_PEAKS, measure_gemm_peak
from dualpath.solver import solve

from .bench_train import measure
from .common import table, write


def budget_for_params(backbone: ModelConfig, target: float, K: int = 2, alpha: float = 0.5,
                      multiple: int = 64) -> dict:
    """The solve() result of the smallest per-layer budget whose Dual model reaches `target` parameters."""
    def params(budget):
        try:
            return solve(backbone, budget, "dual", K=K, alpha=alpha, build_multiple=multiple, match="paper")["params"]
        except ConfigError:  # too small for any FFN width
            return 0

    lo, hi = 1.0, 1e6
    while params(hi) < target:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if params(mid) < target else (lo, mid)
    return solve(backbone, hi, "dual", K=K, alpha=alpha, build_multiple=multiple, match="paper")


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser()
    p.add_argument("--target-params", type=float, default=125e6)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=12)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_mfu_125m: no CUDA device, skipped (it measures bf16 GPU MFU)")
        return None
    backbone = ModelConfig(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                           n_kv_heads=args.n_heads, vocab_size=50304, seq_len=args.seq_len, tie_embeddings=True)
    dual = budget_for_params(backbone, args.target_params)
    wide = solve(backbone, dual["budget"], "wide", build_multiple=64, match="paper")
    peak = measure_gemm_peak("cuda", torch.bfloat16)
    name = torch.cuda.get_device_name(0)
    spec = next((v for k, v in GPU_PEAKS.items() if k in name), None)
    rows = []
    for label, r in (("dual K=2 α=0.5", dual), ("wide", wide)):
        m = measure(r["config"], args.batch, args.steps, "cuda", torch.bfloat16, compile=not args.no_compile)
        rows.append({"model": label, **m, "mfu": m["flops_per_s"] / peak,
                     "mfu_spec_sheet": m["flops_per_s"] / spec if spec else None})
    payload = {"device": "cuda", "gpu": name, "dtype": "bfloat16 autocast", "compile": not args.no_compile,
               "gemm_peak_flops": peak, "spec_sheet_peak_flops": spec, "budget_per_layer": dual["budget"],
               "shape": vars(args), "rows": rows}
    path = write("mfu_125m", payload)
    print(f"{name}: bf16 GEMM peak {peak / 1e12:.0f} TFLOP/s measured")
    print(table(rows, ["model", "params", "tokens_per_s", "mfu", "mfu_spec_sheet"]))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()

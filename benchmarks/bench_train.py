"""Training throughput and MFU of wide, loop and dual at matched FLOPs, and time per FLOP, dual vs wide.

MFU = true training FLOPs per token (3x forward, every matmul) x tokens/s / a GEMM peak measured in the
same run on the same machine.  python -m benchmarks.bench_train [--d-model 384 --n-layers 6 --seq-len 256]
"""

from __future__ import annotations

import argparse

import torch

from dualpath.config import ModelConfig, OptimConfig
from dualpath.model import DualPathLM
from dualpath.perf import measure_gemm_peak
from dualpath.solver import solve
from dualpath.train import build_optimizer

from .common import best_time, table, write


def measure(cfg: ModelConfig, batch: int, steps: int, device: str, dtype, compile: bool = False) -> dict:
    torch.manual_seed(0)
    model = DualPathLM(cfg).to(device)
    opt = build_optimizer(model, OptimConfig())
    flops_per_token, params = model.train_flops_per_token(cfg.seq_len), model.param_counts()["total"]
    if compile:
        model = torch.compile(model)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), device=device)
    ctx = torch.autocast(device, dtype=dtype) if dtype is not None else torch.autocast(device, enabled=False)

    def step():
        with ctx:
            loss = model(x, x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device == "cuda" else None
    t = best_time(lambda: [step() for _ in range(steps)], repeats=3, warmup=1, sync=sync) / steps
    tokens = batch * cfg.seq_len
    flops = flops_per_token * tokens
    return {"seconds_per_step": t, "tokens_per_s": tokens / t, "train_flops_per_step": flops,
            "flops_per_s": flops / t, "params": params}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--n-heads", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--budget", type=float, default=8e6, help="per-layer true FLOPs to match")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="time torch.compile'd models (warm-up includes compiling)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else None
    peak = measure_gemm_peak(device, dtype or torch.float32)
    backbone = ModelConfig(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                           n_kv_heads=args.n_heads, vocab_size=args.vocab_size, seq_len=args.seq_len)
    rows = []
    for name, arch, K, alpha in (("wide", "wide", 1, None), ("loop K=2", "loop", 2, None),
                                 ("dual K=2 α=0.5", "dual", 2, 0.5)):
        r = solve(backbone, args.budget, arch, K=K, alpha=alpha or 0.5, build_multiple=64, match="true",
                  seq_len=args.seq_len)
        m = measure(r["config"], args.batch, args.steps, device, dtype, args.compile)
        rows.append({"model": name, **m, "mfu": m["flops_per_s"] / peak})
    wide = rows[0]
    for r in rows:
        r["time_per_flop_vs_wide"] = (r["seconds_per_step"] / r["train_flops_per_step"]) / (
            wide["seconds_per_step"] / wide["train_flops_per_step"])
    payload = {"device": device, "dtype": str(dtype or torch.float32), "gemm_peak_flops": peak,
               "shape": vars(args), "rows": rows}
    path = write("train_mfu_compiled" if args.compile else "train_mfu", payload)
    print(f"GEMM peak {peak / 1e9:.1f} GFLOP/s on {device}")
    print(table(rows, ["model", "params", "tokens_per_s", "mfu", "time_per_flop_vs_wide"]))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()

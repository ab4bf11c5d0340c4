"""Training throughput and MFU of wide, loop and dual at matched FLOPs, time per FLOP vs wide, and where the time goes.

MFU = true training FLOPs per token (3x forward, every matmul) x tokens/s / a GEMM peak measured in the same run,
with the same thread count. The models (and, with --reference, the same models on the eager reference path:
unfused attention, torch's default AdamW) are timed in interleaved rounds, so a load that drifts hits every
variant alike; each figure is the median over rounds, with its spread. --profile splits one step of each into
GEMM, attention, elementwise/norm, loss and optimizer time (torch.profiler, self time per op). A textbook GPT of
PureWide's shape (PlainGPT) runs beside them: PureWide's tokens/s over its tokens/s is the last column.

    python -m benchmarks.bench_train [--threads 2 --rounds 3 --reference --profile --compile]
"""

from __future__ import annotations

import argparse
import statistics
import time

from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from dualpath.config import ModelConfig, OptimConfig
from dualpath.model import DualPathLM, swiglu_hidden
from dualpath.perf import measure_gemm_peak
from dualpath.solver import solve
from dualpath.train import build_optimizer

from .common import best_time, load, table, write

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mv", "aten::addmv", "aten::dot"}
OPT_SCOPE = "## optimizer ##"
CATEGORIES = ("gemm", "attention", "elementwise", "loss", "optimizer")


def category(name: str) -> str | None:
    """The category an op and everything it calls count in (None: decided by its callers, else elementwise)."""
    if name == OPT_SCOPE:
        return "optimizer"
    if "log_softmax" in name or "nll_loss" in name or "cross_entropy" in name:
        return "loss"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if name in GEMM_OPS or "_linear_pointwise" in name:
        return "gemm"
    return None


def event_category(e) -> str:
    """The outermost categorised op around e (e.g. the fill_ inside nll_loss_backward is loss), or elementwise:
    norms, RoPE, activations, residual and gate mixes, copies, fills, compiled kernels."""
    found, p = None, e
    while p is not None:
        found = category(p.name) or found
        p = p.cpu_parent
    return found or "elementwise"


# (name, fast model paths (fused attention, chunked loss), fused AdamW, torch.compile): the model's, the
# optimiser's and the compiler's share
PATHS = (("fast", True, True, False), ("fast model, default AdamW", True, False, False),
         ("reference", False, False, False))
COMPILED = ("fast, compiled", True, True, True)
PLAIN = "plain GPT"


class PlainGPT(nn.Module):
    """The textbook GPT of PureWide's shape, as a user would write it with torch's own modules: learned
    positions instead of RoPE, no QK-norm, no gains, SwiGLU of the same width, F.cross_entropy. The baseline
    the issue measured PureWide against (#30)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f = cfg.d_model, swiglu_hidden(cfg.d_ffn_wide, cfg.ffn_multiple)
        self.n_heads = cfg.n_heads
        self.emb, self.pos = nn.Embedding(cfg.vocab_size, d), nn.Embedding(cfg.seq_len, d)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "norm1": nn.RMSNorm(d), "qkv": nn.Linear(d, 3 * d, bias=False), "out": nn.Linear(d, d, bias=False),
            "norm2": nn.RMSNorm(d), "up": nn.Linear(d, 2 * f, bias=False), "down": nn.Linear(f, d, bias=False)})
            for _ in range(cfg.n_layers))
        self.norm, self.head = nn.RMSNorm(d), nn.Linear(d, cfg.vocab_size, bias=False)

    def forward(self, x, y):
        B, T = x.shape
        h = self.emb(x) + self.pos(torch.arange(T, device=x.device))
        for b in self.blocks:
            q, k, v = b["qkv"](b["norm1"](h)).view(B, T, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + b["out"](a.transpose(1, 2).reshape(B, T, -1))
            gate, up = b["up"](b["norm2"](h)).chunk(2, dim=-1)
            h = h + b["down"](F.silu(gate) * up)
        loss = F.cross_entropy(self.head(self.norm(h)).flatten(0, 1), y.flatten())
        return SimpleNamespace(loss=loss)


def make_step(cfg: ModelConfig, batch: int, device: str, dtype, compile: bool, fast: bool, fast_opt: bool = True,
              plain: bool = False):
    """(one training step, train FLOPs per step, parameters) of a fresh model: forward, backward, AdamW.
    plain: PlainGPT of cfg's shape (the FLOPs counted are PureWide's, whose matmuls it shares)."""
    torch.manual_seed(0)
    model = DualPathLM(cfg).to(device).set_fast(fast)
    flops = model.train_flops_per_token(cfg.seq_len) * batch * cfg.seq_len
    if plain:
        model = PlainGPT(cfg).to(device)
    opt = (torch.optim.AdamW(model.parameters(), fused=fast_opt or None) if plain  # the same AdamW kernel
           else build_optimizer(model, OptimConfig(), fast=fast_opt))
    params = sum(p.numel() for p in model.parameters())
    run = torch.compile(model) if compile else model
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), device=device)
    ctx = torch.autocast(device, dtype=dtype) if dtype is not None else torch.autocast(device, enabled=False)

    def step():
        with ctx:
            loss = run(x, x).loss
        loss.backward()
        with torch.profiler.record_function(OPT_SCOPE):
            opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return step, flops, params


def measure(cfg: ModelConfig, batch: int, steps: int, device: str, dtype, compile: bool = False) -> dict:
    """Best-of-3 time of `steps` training steps of one model (bench_mfu_125m's timing)."""
    step, flops, params = make_step(cfg, batch, device, dtype, compile, fast=True)
    t = best_time(lambda: [step() for _ in range(steps)], repeats=3, warmup=1) / steps
    return {"seconds_per_step": t, "tokens_per_s": batch * cfg.seq_len / t, "train_flops_per_step": flops,
            "flops_per_s": flops / t, "params": params}


def profile_split(step) -> dict:
    """Seconds of one step per category (self time of every op, counted in its outermost category)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    split = dict.fromkeys(CATEGORIES, 0.0)
    for e in prof.events():
        split[event_category(e)] += e.self_cpu_time_total / 1e6
    total = sum(split.values())
    return {"seconds": split, "share": {k: v / total for k, v in split.items()}}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--n-heads", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--budget", type=float, default=8e6, help="per-layer true FLOPs to match")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=1, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median and spread over them)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: process CPU time, which other processes do not inflate (meaningful with --threads 1: "
                        "with more, OpenMP's spin-waits count too)")
    p.add_argument("--reference", action="store_true", help="also time the eager reference path (before/after)")
    p.add_argument("--profile", action="store_true", help="split one step of each variant by category")
    p.add_argument("--compile", action="store_true",
                   help="also time the fast path torch.compile'd, interleaved with eager (warm-up includes compiling)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else None
    load_before = load()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    backbone = ModelConfig(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                           n_kv_heads=args.n_heads, vocab_size=args.vocab_size, seq_len=args.seq_len)
    variants = []
    paths = (PATHS if args.reference else PATHS[:1]) + ((COMPILED,) if args.compile else ())
    for path, fast, fast_opt, compile in paths:
        models = (("wide", "wide", 1), ("loop K=2", "loop", 2), ("dual K=2 α=0.5", "dual", 2))
        if path in ("fast", COMPILED[0]):
            models += ((PLAIN, "wide", 1),)
        for name, arch, K in models:
            r = solve(backbone, args.budget, arch, K=K, alpha=0.5, build_multiple=64, match="true",
                      seq_len=args.seq_len)
            step, flops, params = make_step(r["config"], args.batch, device, dtype, compile, fast, fast_opt,
                                            plain=name == PLAIN)
            step()  # warm-up (and compile)
            variants.append({"model": name, "path": path, "step": step,
                             "flops": flops, "params": params, "times": []})
    peaks = []
    for _ in range(args.rounds):
        peaks.append(measure_gemm_peak(device, dtype or torch.float32, seconds=0.3, clock=clock))
        for v in variants:
            t = clock()
            for _ in range(args.steps):
                v["step"]()
            v["times"].append((clock() - t) / args.steps)
    peak = spread(peaks)
    rows = []
    for v in variants:
        wide = next(w for w in variants if w["path"] == v["path"])  # the first of each path is wide
        per_flop = [t / v["flops"] for t in v["times"]]
        ratios = [a / (w / wide["flops"]) for a, w in zip(per_flop, wide["times"])]
        mfu = [v["flops"] / t / pk for t, pk in zip(v["times"], peaks)]
        row = {"model": v["model"], "path": v["path"], "params": v["params"], "train_flops_per_step": v["flops"],
               "seconds_per_step": spread(v["times"]), "mfu": spread(mfu), "time_per_flop_vs_wide": spread(ratios)}
        if args.reference and v["path"] != "reference" and v["model"] != PLAIN:  # no reference path of its own
            ref = next(w for w in variants if w["path"] == "reference" and w["model"] == v["model"])
            row["speedup_vs_reference"] = spread([r / f for r, f in zip(ref["times"], v["times"])])
        plain = next((w for w in variants if w["path"] == v["path"] and w["model"] == PLAIN), None)
        if plain is not None and v["model"] == "wide":  # the same tokens per step: the speed ratio
            row["tokens_per_s_vs_plain_gpt"] = spread([p / t for p, t in zip(plain["times"], v["times"])])
        if v["path"] == COMPILED[0]:
            eager = next(w for w in variants if w["path"] == "fast" and w["model"] == v["model"])
            row["speedup_vs_eager"] = spread([e / c for e, c in zip(eager["times"], v["times"])])
        if args.profile:
            row["profile"] = profile_split(v["step"])
        rows.append(row)
    payload = {"device": device, "dtype": str(dtype or torch.float32), "threads": torch.get_num_threads(),
               "clock": args.clock,
               "gemm_peak_flops": peak, "load_before": load_before, "load_after": load(),
               "shape": vars(args), "rows": rows}
    path = write("train_mfu", payload)
    print(f"GEMM peak {peak['median'] / 1e9:.1f} GFLOP/s on {device}, {torch.get_num_threads()} threads, {args.clock} clock "
          f"(rounds: {peak['min'] / 1e9:.1f}-{peak['max'] / 1e9:.1f}); load {load_before} -> {payload['load_after']}")
    flat = [{"model": r["model"], "path": r["path"], "params": r["params"],
             "s/step": r["seconds_per_step"]["median"], "mfu": r["mfu"]["median"],
             "t/FLOP vs wide": r["time_per_flop_vs_wide"]["median"],
             "ratio range": "{:.3f}-{:.3f}".format(r["time_per_flop_vs_wide"]["min"], r["time_per_flop_vs_wide"]["max"]),
             "wide vs plain GPT": r.get("tokens_per_s_vs_plain_gpt", {}).get("median"),
             "speedup": r.get("speedup_vs_reference", {}).get("median"),
             **({"vs eager": r.get("speedup_vs_eager", {}).get("median")} if args.compile else {}),
             **({f"%{k}": 100 * r["profile"]["share"][k] for k in CATEGORIES} if args.profile else {})} for r in rows]
    print(table(flat, list(flat[0])))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()

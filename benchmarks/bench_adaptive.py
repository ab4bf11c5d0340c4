"""Adaptive depth: wall-clock against realised FLOP savings (docs/ADAPTIVE.md).

    python -m benchmarks.bench_adaptive [--checkpoint RUN] [--policies "exit=0.3;exit=0.1,deep=0.2"]
        (writes benchmarks/results/adaptive.json)

For each policy (and forced K = 1..K, the fixed-K baseline), one batch of windows is scored (best of
--repeats forward passes) and, at batch 1, tokens are generated with the KV cache. Reported per row: realised
FLOPs per token (FlopTally of the executed pass) and its ratio to the full model, the deep path's share, the
measured time ratio, and "realised": the share of the FLOP saving seen in wall-clock time,
(1 − time ratio) / (1 − FLOP ratio). Without --checkpoint a perturbed random Dual model is used (its halting
is arbitrary: a mechanics benchmark, not a quality one). On CUDA the forward is timed with synchronisation.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from dualpath.generate import generate_tokens
from dualpath.model import AdaptivePolicy, FlopTally, ModelConfig, Overrides

from .common import best_time, table, write

DEFAULT_POLICIES = "exit=0.5;exit=0.3;exit=0.1;exit=0.3,deep=0.2;exit=0.3,deep=0.2,wide=0.2;exit=1"


def _random_dual(seed: int):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="dual", vocab_size=4096, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, seq_len=256,
                      K=4, d_ffn_deep=384, d_ffn_wide=768, ffn_multiple=64)
    model = cfg.build().eval()
    with torch.no_grad():  # gains and routers away from their init, so every step matters and halting varies
        for name, p in model.named_parameters():
            if name.endswith(("step_gain", "beta")):
                p.normal_(0.0, 0.5)
            elif ".halt." in name or name.endswith(("W_g", "b_g")):
                p.normal_(0.0, 2.0 / math.sqrt(p.shape[0]) if p.dim() == 2 else 0.5)
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="a run or checkpoint folder (default: a perturbed random Dual model)")
    ap.add_argument("--data", default="/work/shared/data/wikitext-2/test.txt", help="text for the batch (with "
                    "--checkpoint; random tokens otherwise)")
    ap.add_argument("--policies", default=DEFAULT_POLICIES, help="';'-separated policies")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gen-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="adaptive", help="result file name under benchmarks/results/")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        from dualpath.checkpoint import load_model
        from dualpath.data.tokenizer import load_tokenizer

        model, _, folder = load_model(args.checkpoint)
        ids = load_tokenizer(folder).encode(Path(args.data).read_text(encoding="utf-8")[:200_000]).ids
    else:
        model = _random_dual(args.seed)
        ids = torch.randint(0, model.cfg.vocab_size, (args.batch * model.cfg.seq_len + 1,),
                            generator=torch.Generator().manual_seed(args.seed)).tolist()
    model = model.to(args.device).eval()
    T = model.cfg.seq_len
    x = torch.tensor(ids[:args.batch * T], device=args.device).view(args.batch, T)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    variants = [("full", Overrides())] + [(f"K={k}", Overrides(K=k)) for k in range(1, model.cfg.K)]
    variants += [(f"adaptive {p}", Overrides(adaptive=AdaptivePolicy.parse(p))) for p in args.policies.split(";")
                 if p.strip()]
    rows = []
    prompt = ids[:16]
    for name, ov in variants:
        tally = FlopTally()
        with torch.inference_mode():
            model(x, overrides=ov, flops=tally)

            def fwd(ov=ov):
                model(x, overrides=ov)

            seconds = best_time(fwd, repeats=args.repeats, warmup=1, sync=sync)
            t0 = time.perf_counter()
            n_gen = len(list(generate_tokens(model, prompt, args.gen_tokens, overrides=ov)))
            gen_s = time.perf_counter() - t0
        per = tally.per_token()
        rows.append({"variant": name, "flops_per_token": per["flops_per_token"],
                     "deep_flops_per_token": per["deep_flops_per_token"], "forward_s": seconds,
                     "tokens_per_s": x.numel() / seconds, "generate_tokens_per_s": n_gen / gen_s})
        print(f"{name}: {per['flops_per_token']:.4g} FLOPs/token, {seconds * 1e3:.1f} ms", file=sys.stderr)
    full = rows[0]
    for r in rows:
        r["flop_ratio"] = r["flops_per_token"] / full["flops_per_token"]
        r["deep_flop_ratio"] = r["deep_flops_per_token"] / full["deep_flops_per_token"]
        r["time_ratio"] = r["forward_s"] / full["forward_s"]
        saved = 1 - r["flop_ratio"]
        r["realised"] = (1 - r["time_ratio"]) / saved if saved > 1e-9 else None
        r["generate_speedup"] = r["generate_tokens_per_s"] / full["generate_tokens_per_s"]
    cols = ["variant", "flop_ratio", "deep_flop_ratio", "time_ratio", "realised", "tokens_per_s",
            "generate_speedup"]
    print(table(rows, cols))
    out = write(args.name, {"checkpoint": args.checkpoint, "device": args.device, "batch": args.batch, "seq_len": T,
                            "d_model": model.cfg.d_model, "n_layers": model.cfg.n_layers, "K": model.cfg.K,
                            "threads": torch.get_num_threads(), "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

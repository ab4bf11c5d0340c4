"""Duo oracle: prefix-shared pattern search against naive enumeration.

    python -m benchmarks.bench_duo_oracle [--layers 12 --budget 6] (writes benchmarks/results/duo_oracle.json)

A randomly initialised (perturbed, so every branch matters) Duo model evaluates all C(L, k) patterns with
exactly k big layers (the others small) on one batch, three ways:

    naive forward      one full model forward per pattern, model(x, choices=mask) (gather/scatter)
    prefix shared      a depth-first walk of the pattern trie: patterns agreeing on their first j layers
                       share those j layers' computation (only the trie's nodes are computed)
    + sibling attn     the same walk, and sibling choices at a node share that layer's attention

The per-pattern losses of the three must agree (max |Δ| is reported). "FLOP ratio" is the naive method's
forward FLOPs over the method's (the LM head, run once per pattern by every method, included): the speedup
that pure compute would give. Optionally (--beam-skip) the beam search
over the with-skip space C(L, k)·2^(L−k) is timed too. Writes JSON and prints a short table.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from dualpath import DualPathLM, ModelConfig
from dualpath.model import NAMES
from dualpath.routing.adapters import DuoSearchModel
from dualpath.routing.search import PatternEvaluator, SearchSpace, search

from .common import write


class _NoSiblings:
    """The Duo adapter without apply_layer_multi: prefix sharing only."""

    def __init__(self, sm):
        self.sm = sm
        self.n_layers, self.choices = sm.n_layers, sm.choices
        self.default_choice, self.letters = sm.default_choice, sm.letters

    def embed(self, idx):
        return self.sm.embed(idx)

    def apply_layer(self, i, state, choice):
        return self.sm.apply_layer(i, state, choice)

    def logits_loss(self, state, targets):
        return self.sm.logits_loss(state, targets)


def build(args) -> DualPathLM:
    torch.manual_seed(args.seed)
    cfg = ModelConfig(arch="duo", vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
                      n_heads=args.heads, n_kv_heads=args.heads, seq_len=args.seq_len, d_ffn_big=args.d_ffn_big,
                      ffn_multiple=64)
    model = DualPathLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[1]))
    return model


def naive_forward(model, batch, patterns) -> list[float]:
    x, y = batch
    L, (B, T) = model.cfg.n_layers, x.shape
    out = []
    with torch.inference_mode():
        for p in patterns:
            mask = torch.tensor([NAMES.index(c) for c in p]).view(L, 1, 1).expand(L, B, T)
            out.append(model(x, y, choices=mask).loss.item())
    return out


def timed(fn):
    t0 = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--budget", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-ffn-big", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch default; 1 is steadier on a shared CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--beam-skip", action="store_true", help="also time the with-skip beam search")
    ap.add_argument("--beam", type=int, default=16)
    ap.add_argument("--out", help="JSON path (default benchmarks/results/duo_oracle.json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=gen)
    y = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=gen)
    batch = (x, y)
    space = SearchSpace(args.layers, ("big", "small"), "big", args.budget, "small")
    patterns = list(space.enumerate())
    sm = DuoSearchModel(model)
    naive_forward(model, batch, patterns[:2])  # warm-up

    ref, t_naive = timed(lambda: naive_forward(model, batch, patterns))
    n_nodes = sum(len({p[:d] for p in patterns}) for d in range(1, args.layers + 1))  # trie nodes below the root
    n_inner = sum(len({p[:d] for p in patterns}) for d in range(args.layers))  # nodes with children (root included)
    rows = [{"method": "naive forward", "seconds": t_naive, "layer_calls": len(patterns) * args.layers,
             "attention_calls": len(patterns) * args.layers, "max_abs_diff": 0.0}]
    for name, adapter in (("prefix shared", _NoSiblings(sm)), ("prefix shared + sibling attn", sm)):
        ev = PatternEvaluator(adapter, [batch])
        losses, t = timed(lambda ev=ev: ev.evaluate(patterns))
        rows.append({"method": name, "seconds": t, "layer_calls": ev.layer_calls,
                     "attention_calls": n_inner if adapter is sm else n_nodes,
                     "max_abs_diff": max(abs(a - b) for a, b in zip(losses, ref))})
    # forward FLOPs per token of each method (true convention), from the modules' own accounting
    f = model.layers[0].module_flops(args.seq_len)
    ffn = {"big": f["big"], "small": f["small"]}
    head = 2.0 * args.d_model * args.vocab
    nodes = {p[:d] for p in patterns for d in range(1, args.layers + 1)}
    ffn_naive = sum(ffn[c] for p in patterns for c in p)
    ffn_shared = sum(ffn[q[-1]] for q in nodes)
    flops = [len(patterns) * args.layers * f["attn"] + ffn_naive,
             n_nodes * f["attn"] + ffn_shared, n_inner * f["attn"] + ffn_shared]
    for r, fl in zip(rows, flops):
        r["flops_per_token"] = fl + len(patterns) * head
        r["flop_ratio"] = (flops[0] + len(patterns) * head) / r["flops_per_token"]
    for r in rows:
        r["speedup"] = t_naive / r["seconds"]
        r["patterns_per_s"] = len(patterns) / r["seconds"]
    res = {"n_layers": args.layers, "budget": args.budget, "n_patterns": len(patterns),
           "tokens": args.batch * args.seq_len, "d_model": args.d_model, "d_ffn_big": args.d_ffn_big,
           "hidden_big": model.layers[0].ffn_big.hidden, "hidden_small": model.layers[0].ffn_small.hidden,
           "vocab": args.vocab, "threads": torch.get_num_threads(), "rows": rows}
    if args.beam_skip:
        sk = SearchSpace(args.layers, ("big", "small", "skip"), "big", args.budget, "small")
        r, t = timed(lambda: search(sm, [batch], sk, max_patterns=1, beam=args.beam))
        res["beam_with_skip"] = {"space_size": sk.count(), "beam": args.beam, "n_evaluated": r["n_evaluated"],
                                 "seconds": t, "best_pattern": r["best_pattern_string"], "best_loss": r["best_loss"],
                                 "per_token_oracle": r["per_token_oracle"]}
    out = write("duo_oracle", res)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(out.read_text())
        out = Path(args.out)
    print(f"Duo oracle, L={args.layers}, k={args.budget}: {len(patterns)} patterns on {args.batch}x{args.seq_len} "
          f"tokens, d_model={args.d_model}, {res['threads']} threads")
    print(f"{'method':<30} {'seconds':>8} {'speedup':>8} {'FLOP ratio':>10} {'FFN calls':>10} {'attn calls':>10} "
          f"{'max |dloss|':>12}")
    for r in rows:
        print(f"{r['method']:<30} {r['seconds']:>8.2f} {r['speedup']:>7.2f}x {r['flop_ratio']:>9.2f}x "
              f"{r['layer_calls']:>10} {r['attention_calls']:>10} {r['max_abs_diff']:>12.2e}")
    if args.beam_skip:
        b = res["beam_with_skip"]
        print(f"with skip: beam {b['beam']} evaluated {b['n_evaluated']} of {b['space_size']} patterns in "
              f"{b['seconds']:.2f}s (best {b['best_pattern']} {b['best_loss']:.4f})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

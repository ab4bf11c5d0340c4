"""`make demo`: PureWide against Dual-Path at matched true training FLOPs, on the synthetic corpus.

1. prepare the built-in capacity-vs-compute corpus (facts need capacity, arithmetic needs steps);
2. solve FFN widths so both architectures cost the same true FLOPs per layer, and give both runs the
   same total training FLOPs;
3. train both, then evaluate: val BPB, per-category BPB and greedy exact-match answer accuracy;
4. print the comparison and say where everything was written.

The numbers are whatever this run measures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from ..solver import solve, solve_grid, table_markdown

BACKBONE = dict(vocab_size=2048, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, seq_len=128, ffn_multiple=64)
ARMS = (("PureWide", "wide", 1, None), ("Dual K=2 α=0.5", "dual", 2, 0.5))


def run_demo(out: str | Path = "runs/demo", quick: bool = False, budget: float = 1.5e6,
             train_flops: float = 1.2e13, log=print) -> dict:
    from ..checkpoint import load_model
    from ..data.prepare import prepare
    from ..data.synthetic import SyntheticConfig
    from ..eval.evaluate import evaluate_examples, load_tokenizer
    from ..train import train

    out = Path(out)
    if quick:
        train_flops, n_eval, max_tokens = 4e11, 8, 300_000
    else:
        n_eval, max_tokens = 100, 3_000_000
    t_start = time.perf_counter()
    data = out / "data"
    if not (data / "meta.json").is_file():
        log(f"[1/4] preparing the synthetic corpus ({max_tokens:,} tokens) in {data}")
        prepare(["synthetic"], data, vocab_size=BACKBONE["vocab_size"], max_tokens=max_tokens, val_fraction=0.02,
                synthetic=SyntheticConfig(), synthetic_eval_per_category=max(n_eval, 100), progress=not quick,
                overwrite=True)
    else:
        log(f"[1/4] reusing the prepared corpus in {data}")
    meta = json.loads((data / "meta.json").read_text())

    backbone = ModelConfig(**BACKBONE, d_ffn_deep=1, d_ffn_wide=1)
    rows = [solve(backbone, budget, arch, K=k, alpha=a or 0.5, build_multiple=64, match="true")
            for _, arch, k, a in ARMS]
    log(f"[2/4] widths at a per-layer budget of {budget:.3g} true FLOPs (T={BACKBONE['seq_len']}):")
    log(table_markdown(rows))
    if not quick:
        paper = ModelConfig(d_model=768, n_layers=16, n_heads=12, n_kv_heads=12, vocab_size=50304, d_ffn_deep=1,
                            d_ffn_wide=1)
        log("For reference, the paper's grid at F_M = 80M (paper FLOPs, `dualpath solve --table`):")
        log(table_markdown(solve_grid(paper, 80e6)))

    examples = [json.loads(line) for line in (data / "eval_examples.jsonl").read_text().splitlines() if line]
    by_cat: dict[str, list] = {}
    for ex in examples:
        by_cat.setdefault(ex["category"], []).append(ex)
    examples = [ex for cat in by_cat.values() for ex in cat[:n_eval]]

    results = []
    for (name, arch, k, _), row in zip(ARMS, rows):
        run_dir = out / arch
        cfg = RunConfig(
            model=row["config"],
            data=DataConfig(path=str(data), batch_size=16),
            optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=20),
            train=TrainConfig(out_dir=str(run_dir), target_flops=train_flops, log_every=25, eval_every=0,
                              save_every=0, eval_batches=16, progress=not quick, resume="auto", seed=0),
        )
        cfg.model.vocab_size = max(cfg.model.vocab_size, meta["vocab_size"])
        log(f"[3/4] training {name} for {train_flops:.3g} true FLOPs -> {run_dir}")
        t0 = time.perf_counter()
        summary = train(cfg)
        model, _, ckpt = load_model(run_dir)
        tok = load_tokenizer(ckpt)
        ev = evaluate_examples(model, tok, examples, batch_size=32)
        results.append({"name": name, "arch": arch, "params": summary["params"],
                        "flops_per_token": model.flops_per_token(BACKBONE["seq_len"], "true"),
                        "train_flops": summary["flops"], "tokens": summary["tokens"], "val_bpb": summary["val_bpb"],
                        "categories": ev, "seconds": time.perf_counter() - t0, "checkpoint": str(ckpt)})

    cats = [c for c in ("fact", "arith", "program", "gsm") if c in results[0]["categories"]]
    head = ("| model | params | true FLOPs/token | train FLOPs | tokens | val BPB | "
            + " | ".join(f"{c} BPB" for c in cats) + " | " + " | ".join(f"{c} acc" for c in cats) + " |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in results:
        c = r["categories"]
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['flops_per_token'] / 1e6:.2f}M | "
                     f"{r['train_flops']:.3g} | {r['tokens']:,} | {r['val_bpb']:.4f} | "
                     + " | ".join(f"{c[k]['bpb']:.4f}" for k in cats) + " | "
                     + " | ".join(f"{c[k]['accuracy']:.1%}" for k in cats) + " |")
    table = "\n".join(lines)
    log(f"[4/4] results ({n_eval} held-out examples per category; accuracy is greedy exact match):")
    log(table)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(table + "\n")
    log(f"checkpoints: {', '.join(r['checkpoint'] for r in results)}")
    log(f"logs: {out}/<arch>/metrics.jsonl (and TensorBoard in {out}/<arch>/tb when installed); "
        f"tables: {out}/results.md, {out}/results.json")
    log(f"total time: {time.perf_counter() - t_start:.0f} s")
    return {"results": results, "table": table}

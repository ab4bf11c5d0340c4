"""`make demo`: what each architecture is good at, at laptop scale.

1. prepare the synthetic capacity-vs-compute corpus (`DEMO_SYNTHETIC`: recall of stored facts needs
   capacity, chains of dependent steps need sequential compute);
2. solve FFN widths so PureWide, PureLoop (K=2) and Dual-Path (K=2, α=0.5) cost the same true FLOPs per
   token (within the solver's build multiple), and train all three on the same tokens;
3. evaluate on held-out examples: per-category exact-match accuracy and answer BPB, and where each model
   routes the answer-producing positions (Dual: g_d, g_w, ρ_d; loops: expected steps) by category;
4. print both tables, save results.json / results.md / demo.png.

The numbers are whatever this run measures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from ..fileio import atomic_save_figure, atomic_write_text
from ..solver import solve, table_markdown

BACKBONE = dict(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, seq_len=128, ffn_multiple=16)
ARMS = (("PureWide", "wide", 1, None), ("PureLoop K=2", "loop", 2, None), ("Dual K=2 α=0.5", "dual", 2, 0.5))
# The corpus: the two mechanism tasks that learn at this budget (docs/MECHANISM.md, docs/SYNTHETIC.md): recall
# (capacity) and chains of 1-4 digit sums (compute; the mod-10 chains stay at chance here).
DEMO_SYNTHETIC = dict(mix_facts=0.0, mix_arith=0.0, mix_programs=0.0, mix_gsm=0.0, mix_recall=1.0, mix_chain=1.0,
                      chain_ops="sum", chain_steps_min=1, chain_steps_max=4)
BUDGET = 1.2e6  # true forward FLOPs per layer and token, at T = BACKBONE["seq_len"]
TOKENS = 1_000_000  # training tokens, the same for every arm
QUICK_TOKENS = 40_000


def solve_arms(budget: float = BUDGET) -> list[dict]:
    """The solver's widths of every arm at a per-layer true-FLOP budget (width multiples of 8, so every
    arm lands within about 1% of PureWide's true FLOPs per token)."""
    backbone = ModelConfig(**BACKBONE, d_ffn_deep=1, d_ffn_wide=1)
    return [solve(backbone, budget, arch, K=k, alpha=a or 0.5, multiple=8, build_multiple=8, match="true")
            for _, arch, k, a in ARMS]


def _train_config(row: dict, data: Path, run_dir: Path, tokens: int, vocab: int, quiet: bool) -> RunConfig:
    cfg = RunConfig(
        model=row["config"],
        data=DataConfig(path=str(data), batch_size=16),
        optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=20),
        train=TrainConfig(out_dir=str(run_dir), tokens=tokens, log_every=25, eval_every=0, save_every=0,
                          eval_batches=16, progress=not quiet, resume="auto", seed=0),
    )
    cfg.model.vocab_size = max(cfg.model.vocab_size, vocab)
    return cfg


def routing_table(results: list[dict], cats: list[str]) -> str:
    """Mean over layers of each routing value at the answer-producing positions, per model and category."""
    lines = ["| model | value | " + " | ".join(cats) + " |", "|---|---|" + "---|" * len(cats)]
    for r in results:
        by_cat = r["routing"]
        for key, label in (("gate_deep", "g_d"), ("gate_wide", "g_w"), ("rho_deep", "ρ_d"),
                           ("expected_steps", "E[steps]")):
            vals = []
            for c in cats:
                layers = by_cat.get(c, {}).get("layers", [])
                v = [lay[key] for lay in layers if key in lay]
                vals.append(f"{sum(v) / len(v):.3f}" if v else None)
            if any(v is not None for v in vals):
                lines.append(f"| {r['name']} | {label} | " + " | ".join(v or "–" for v in vals) + " |")
    return "\n".join(lines)


def _figure(results: list[dict], cats: list[str], path: Path) -> None:
    """Two panels: accuracy by category per model; ρ_d by layer per category (Dual)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2, 1)
    width = 0.8 / len(results)
    for i, r in enumerate(results):
        ax.bar([j + i * width for j in range(len(cats))], [100 * r["categories"][c]["accuracy"] for c in cats],
               width, label=r["name"])
    ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(cats))], cats)
    ax.set_ylabel("greedy exact-match accuracy (%)")
    ax.set_title("held-out accuracy by category")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    dual = [r for r in results if r["arch"] == "dual"]
    if dual:
        for c in cats:
            layers = dual[0]["routing"].get(c, {}).get("layers", [])
            ax.plot(range(len(layers)), [lay.get("rho_deep", float("nan")) for lay in layers], marker="o", label=c)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("layer")
        ax.set_ylabel("deep share ρ_d at answer-producing positions")
        ax.set_title(f"{dual[0]['name']}: routing by category")
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)


def run_demo(out: str | Path = "runs/demo", quick: bool = False, budget: float = BUDGET, tokens: int | None = None,
             log=print) -> dict:
    from ..analysis.by_category import routing_by_category
    from ..checkpoint import load_model
    from ..data.prepare import prepare
    from ..data.synthetic import SyntheticConfig
    from ..data.tokenizer import load_tokenizer
    from ..eval.evaluate import evaluate_examples
    from ..train import train

    out = Path(out)
    tokens = tokens or (QUICK_TOKENS if quick else TOKENS)
    n_eval, max_tokens = (8, 200_000) if quick else (100, 2 * tokens)
    t_start = time.perf_counter()
    data = out / "data"
    synthetic = SyntheticConfig(**DEMO_SYNTHETIC)
    if not (data / "meta.json").is_file():
        log(f"[1/4] preparing the synthetic corpus ({max_tokens:,} tokens) in {data}")
        prepare(["synthetic"], data, vocab_size=BACKBONE["vocab_size"], max_tokens=max_tokens, val_fraction=0.02,
                synthetic=synthetic, synthetic_eval_per_category=max(n_eval, 100), progress=not quick,
                overwrite=True)
    else:
        log(f"[1/4] reusing the prepared corpus in {data}")
    meta = json.loads((data / "meta.json").read_text())

    rows = solve_arms(budget)
    log(f"[2/4] widths at a per-layer budget of {budget:.3g} true FLOPs (T={BACKBONE['seq_len']}); "
        f"every arm trains on {tokens:,} tokens:")
    log(table_markdown(rows))

    examples = [json.loads(line) for line in (data / "eval_examples.jsonl").read_text().splitlines() if line]
    by_cat: dict[str, list] = {}
    for ex in examples:
        by_cat.setdefault(ex["category"], []).append(ex)
    examples = [ex for cat in by_cat.values() for ex in cat[:n_eval]]
    cats = list(by_cat)

    results = []
    train_seconds = 0.0
    for (name, arch, k, _), row in zip(ARMS, rows):
        run_dir = out / arch
        cfg = _train_config(row, data, run_dir, tokens, meta["vocab_size"], quick)
        log(f"[3/4] training {name} on {tokens:,} tokens -> {run_dir}")
        t0 = time.perf_counter()
        summary = train(cfg)
        train_seconds += time.perf_counter() - t0
        model, _, ckpt = load_model(run_dir)
        tok = load_tokenizer(ckpt)
        results.append({"name": name, "arch": arch, "params": summary["params"],
                        "flops_per_token": model.flops_per_token(BACKBONE["seq_len"], "true"),
                        "train_flops": summary["flops"], "tokens": summary["tokens"], "val_bpb": summary["val_bpb"],
                        "categories": evaluate_examples(model, tok, examples, batch_size=32),
                        "routing": routing_by_category(model, tok, examples),
                        "seconds": time.perf_counter() - t0, "checkpoint": str(ckpt)})

    wide_fpt = results[0]["flops_per_token"]
    head = ("| model | params | true FLOPs/token (vs PureWide) | tokens | val BPB | "
            + " | ".join(f"{c} acc" for c in cats) + " | " + " | ".join(f"{c} answer bits/token" for c in cats) + " |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in results:
        c = r["categories"]
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['flops_per_token'] / 1e6:.2f}M "
                     f"({r['flops_per_token'] / wide_fpt - 1:+.1%}) | {r['tokens']:,} | {r['val_bpb']:.4f} | "
                     + " | ".join(f"{c[k]['accuracy']:.1%}" for k in cats) + " | "
                     + " | ".join(f"{c[k]['answer_loss'] / 0.6931471805599453:.3f}" for k in cats) + " |")
    table = "\n".join(lines)
    routing = routing_table(results, cats)
    log(f"[4/4] results ({n_eval} held-out examples per category; accuracy is greedy exact match; answer "
        "bits/token is the loss on the answer tokens, in bits):")
    log(table)
    log("Routing at the positions that produce the answer (mean over layers; g = gates, ρ_d = deep share of "
        "the update, E[steps] = expected loop steps):")
    log(routing)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    atomic_write_text(out / "results.md", table + "\n\n" + routing + "\n")
    _figure(results, cats, out / "demo.png")
    log(f"checkpoints: {', '.join(r['checkpoint'] for r in results)}")
    log(f"logs: {out}/<arch>/metrics.jsonl (and TensorBoard in {out}/<arch>/tb when installed); "
        f"tables: {out}/results.md, {out}/results.json; figure: {out}/demo.png")
    log(f"training time: {train_seconds:.0f} s; total time: {time.perf_counter() - t_start:.0f} s")
    return {"results": results, "table": table, "routing": routing}

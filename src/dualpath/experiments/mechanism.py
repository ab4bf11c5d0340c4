"""The mechanism study of docs/MECHANISM.md, on the demo's setup (experiments/demo.py: backbone, corpus,
per-layer budget, equal tokens for every arm).

    dualpath mechanism OUT [--seeds 0,1,2] [--tokens N] [--skip-gate-study] [--skip-routing] [--world-seed 1]

1. gate study: the Dual arm under one knob at a time (training length, init, the gain start, the
   reference's weight decay, a gate/gain LR multiplier): do the gates move, and what does it cost in loss;
2. routing by category over seeds: PureWide, PureLoop and Dual at matched FLOPs per token and equal tokens;
   per-category accuracy and answer loss, the Dual model's g_d, g_w, ρ_d at the answer-producing positions
   per layer, and the per-category cost of forcing deep-only, wide-only and shuffled gates; mean, std and
   95% t-intervals over seeds, and differences to PureWide paired by seed;
3. the calibration on another synthetic world (`--world-seed`, without retuning).

Every run is resumable (a finished run is reused); results go to OUT/gate_study.{json,md} and
OUT/routing.{json,md}. The dose-response sweep is `dualpath sweep configs/sweeps/mechanism_dose_response.yaml`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..config import apply_overrides
from ..fileio import atomic_write_text

LN2 = math.log(2.0)

# One knob at a time against the baseline (the paper's defaults with the reference's scaled init).
GATE_STUDY = (
    ("baseline", ()),
    ("3x tokens", ("train.tokens=*3",)),
    ("plain init", ("model.init=plain",)),
    ("gain start 0 (s=0.69)", ("model.branch_scale_init=0",)),
    ("reference decay (wd 0.3 on gates, norms, gains)", ("optim.weight_decay=0.3", "optim.decay_gates_and_norms=true")),
    ("gate/gain LR x10", ("optim.gate_lr_mult=10",)),
    ("gate/gain LR x30", ("optim.gate_lr_mult=30",)),
)
# The first four keep each token's g_d + g_w (they move or permute the gate mass); the last three rescale the
# residual too (both paths contain x), so they mix a scale shift with the routing.
FORCED = (("deep-favoured", "deep-favoured"), ("wide-favoured", "wide-favoured"), ("swapped", "swapped"),
          ("share-shuffled", "share-shuffled"), ("deep-only", "deep-only"), ("wide-only", "wide-only"),
          ("shuffled", "shuffled"))
RESCALING = ("deep-only", "wide-only", "shuffled")


def _setup(out: Path, quick: bool, log, world_seed: int = 0):
    """The demo's corpus (prepared once under OUT/data, or OUT/data_world{seed} for another synthetic world),
    widths and eval examples."""
    from ..data.prepare import prepare
    from ..data.synthetic import SyntheticConfig
    from .demo import ARMS, BACKBONE, BUDGET, DEMO_SYNTHETIC, TOKENS, solve_arms

    data = out / ("data" if not world_seed else f"data_world{world_seed}")
    if not (data / "meta.json").is_file():
        log(f"preparing the corpus in {data}")
        prepare(["synthetic"], data, vocab_size=BACKBONE["vocab_size"], max_tokens=200_000 if quick else 4 * TOKENS,
                val_fraction=0.02, synthetic=SyntheticConfig(**{**DEMO_SYNTHETIC, "seed": world_seed}),
                synthetic_eval_per_category=200, progress=False, overwrite=True)
    meta = json.loads((data / "meta.json").read_text())
    rows = {arch: row for (_, arch, _, _), row in zip(ARMS, solve_arms(BUDGET))}
    names = {arch: name for name, arch, _, _ in ARMS}
    examples = [json.loads(x) for x in (data / "eval_examples.jsonl").read_text().splitlines() if x.strip()]
    return data, meta, rows, names, examples


def _train(row: dict, data: Path, run_dir: Path, tokens: int, vocab: int, seed: int, knobs=()):
    """Train (or reuse) one run; returns (model, tokenizer, summary)."""
    from ..checkpoint import load_model
    from ..data.tokenizer import load_tokenizer
    from ..train import train
    from .demo import _train_config

    cfg = _train_config(row, data, run_dir, tokens, vocab, quiet=True)
    cfg.train.seed = seed
    cfg.train.eval_every = max(1, tokens // (cfg.data.batch_size * cfg.model.seq_len) // 4)  # gate dynamics
    knobs = [k.replace("=*3", f"={3 * tokens}") for k in knobs]
    apply_overrides(cfg, knobs)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else train(cfg)
    model, _, ckpt = load_model(run_dir)
    return model, load_tokenizer(ckpt), summary


def _gate_summary(metrics_path: Path) -> list[dict]:
    """Per eval record: step, val loss and the mean over layers of each logged gate statistic."""
    out = []
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if "val_loss" not in rec:
            continue
        row = {"step": rec["step"], "val_loss": rec["val_loss"]}
        for stat in ("deep_mean", "deep_std", "wide_mean", "wide_std", "entropy_deep", "entropy_wide", "rho_deep"):
            vals = [v for k, v in rec.items() if k.startswith("gates/") and k.endswith("/" + stat)]
            row[stat] = sum(vals) / len(vals) if vals else math.nan
        out.append(row)
    return out


def gate_study(out: str | Path, tokens: int | None = None, seed: int = 0, quick: bool = False, log=print) -> dict:
    from ..eval.evaluate import evaluate_examples
    from .demo import TOKENS

    out = Path(out)
    tokens = tokens or TOKENS
    data, meta, rows, _, examples = _setup(out, quick, log)
    examples = _per_category(examples, 8 if quick else 100)
    results = []
    for name, knobs in GATE_STUDY:
        # the baseline is the routing study's Dual run of this seed (the same config): trained once
        run_dir = (out / "routing" / "dual" / f"seed{seed}" if not knobs else
                   out / "gate_study" / name.split(" (")[0].replace(" ", "_").replace("/", "-"))
        log(f"gate study: {name}")
        model, tok, summary = _train(rows["dual"], data, run_dir, tokens, meta["vocab_size"], seed, knobs)
        ev = evaluate_examples(model, tok, examples, batch_size=32)
        results.append({"variant": name, "knobs": list(knobs), "val_loss": summary["val_loss"],
                        "tokens": summary["tokens"], "trajectory": _gate_summary(run_dir / "metrics.jsonl"),
                        "accuracy": {c: v["accuracy"] for c, v in ev.items() if c != "all" and "@" not in c}})
    lines = ["| variant | tokens | val loss | Δ vs baseline | g_d mean | g_d std | g_w std | gate entropy (deep) | "
             "ρ_d | " + " | ".join(f"{c} acc" for c in results[0]["accuracy"]) + " |",
             "|---" * (9 + len(results[0]["accuracy"])) + "|"]
    base = results[0]["val_loss"]
    for r in results:
        last = r["trajectory"][-1]
        lines.append(f"| {r['variant']} | {r['tokens']:,} | {r['val_loss']:.4f} | {r['val_loss'] - base:+.4f} | "
                     f"{last['deep_mean']:.3f} | {last['deep_std']:.4f} | {last['wide_std']:.4f} | "
                     f"{last['entropy_deep']:.3f} | {last['rho_deep']:.3f} | "
                     + " | ".join(f"{100 * v:.1f}%" for v in r["accuracy"].values()) + " |")
    table = "\n".join(lines)
    atomic_write_text(out / "gate_study.json", json.dumps(results, indent=2))
    atomic_write_text(out / "gate_study.md", table + "\n")
    log(table)
    return {"results": results, "table": table}


def world_seed_check(out: str | Path, world_seed: int = 1, tokens: int | None = None, quick: bool = False,
                     log=print) -> dict:
    """The calibration on another synthetic world (synthetic.seed), without retuning: every arm's
    per-category accuracy, seed 0."""
    from ..eval.evaluate import evaluate_examples
    from .demo import TOKENS

    out = Path(out)
    tokens = tokens or TOKENS
    data, meta, rows, names, examples = _setup(out, quick, log, world_seed)
    examples = _per_category(examples, 8 if quick else 100)
    result = {}
    for arch, row in rows.items():
        log(f"world {world_seed}: {names[arch]}")
        model, tok, summary = _train(row, data, out / f"world{world_seed}" / arch, tokens, meta["vocab_size"], 0)
        ev = evaluate_examples(model, tok, examples, batch_size=32)
        result[arch] = {c: v["accuracy"] for c, v in ev.items() if c != "all"}
    cats = [c for c in next(iter(result.values())) if "@" not in c]
    lines = [f"synthetic.seed = {world_seed} (the demo's settings otherwise), model seed 0", "",
             "| model | " + " | ".join(f"{c} acc" for c in cats) + " |", "|---" * (1 + len(cats)) + "|"]
    lines += [f"| {names[a]} | " + " | ".join(f"{100 * r[c]:.1f}%" for c in cats) + " |" for a, r in result.items()]
    atomic_write_text(out / f"world{world_seed}.json", json.dumps(result, indent=2))
    atomic_write_text(out / f"world{world_seed}.md", "\n".join(lines) + "\n")
    log("\n".join(lines))
    return result


def _per_category(examples: list[dict], n: int) -> list[dict]:
    by_cat: dict[str, list] = {}
    for ex in examples:
        by_cat.setdefault(ex["category"], []).append(ex)
    return [ex for cat in by_cat.values() for ex in cat[:n]]


def routing_study(out: str | Path, seeds=(0, 1, 2), tokens: int | None = None, quick: bool = False,
                  log=print) -> dict:
    from ..analysis.by_category import routing_by_category
    from ..eval.evaluate import evaluate_examples
    from ..model import Overrides
    from .demo import TOKENS

    out = Path(out)
    tokens = tokens or TOKENS
    data, meta, rows, names, examples = _setup(out, quick, log)
    examples = _per_category(examples, 8 if quick else 100)
    per_seed: dict[str, dict[int, dict]] = {}
    for seed in seeds:
        for arch, row in rows.items():
            run_dir = out / "routing" / arch / f"seed{seed}"
            log(f"routing study: {names[arch]}, seed {seed}")
            model, tok, summary = _train(row, data, run_dir, tokens, meta["vocab_size"], seed)
            ev = evaluate_examples(model, tok, examples, batch_size=32)
            rec = {"val_loss": summary["val_loss"], "tokens": summary["tokens"],
                   "flops_per_token": model.flops_per_token(model.cfg.seq_len, "true"),
                   "categories": {c: {"accuracy": v["accuracy"], "answer_bits": v["answer_loss"] / LN2}
                                  for c, v in ev.items() if c != "all"},
                   "routing": routing_by_category(model, tok, examples)}
            if arch == "dual":
                rec["forced"] = {}
                for label, gates in FORCED:
                    fe = evaluate_examples(model, tok, examples, batch_size=32, overrides=Overrides(gates=gates, seed=seed),
                                           exact_match=False)
                    rec["forced"][label] = {c: (v["answer_loss"] - ev[c]["answer_loss"]) / LN2
                                            for c, v in fe.items() if c != "all"}
            per_seed.setdefault(arch, {})[seed] = rec
    summary = _routing_summary(per_seed, names)
    atomic_write_text(out / "routing.json", json.dumps({"per_seed": per_seed, "summary": summary["stats"]}, indent=2))
    atomic_write_text(out / "routing.md", summary["markdown"] + "\n")
    log(summary["markdown"])
    return summary


def _routing_summary(per_seed: dict, names: dict) -> dict:
    from ..analysis.by_category import seed_intervals

    def fmt(st, pct=False):
        k = 100 if pct else 1
        if st["n"] < 2:
            return f"{k * st['mean']:.3g}"
        return f"{k * st['mean']:.3g} ± {k * st['std']:.2g} [±{k * st['ci95']:.2g}]"

    first = next(iter(per_seed.values()))
    seeds = sorted(first)
    cats = [c for c in next(iter(first.values()))["categories"] if "@" not in c]
    stats: dict = {}
    md = [f"Mean ± std over seeds {seeds} [95% t-interval half-width].", "",
          "#### Accuracy (%) and answer loss (bits/token) by category", "",
          "| model | " + " | ".join(f"{c} acc" for c in cats) + " | " + " | ".join(f"{c} bits" for c in cats) + " |",
          "|---" * (1 + 2 * len(cats)) + "|"]
    for arch, by_seed in per_seed.items():
        acc = {c: seed_intervals([by_seed[s]["categories"][c]["accuracy"] for s in seeds]) for c in cats}
        bits = {c: seed_intervals([by_seed[s]["categories"][c]["answer_bits"] for s in seeds]) for c in cats}
        stats[arch] = {"accuracy": acc, "answer_bits": bits}
        md.append(f"| {names[arch]} | " + " | ".join(fmt(acc[c], True) for c in cats) + " | "
                  + " | ".join(fmt(bits[c]) for c in cats) + " |")
    if "wide" in per_seed:
        md += ["", "#### Paired by seed: arm minus PureWide", "",
               "| model | " + " | ".join(f"Δ {c} acc (pp)" for c in cats) + " | "
               + " | ".join(f"Δ {c} bits" for c in cats) + " |", "|---" * (1 + 2 * len(cats)) + "|"]
        for arch, by_seed in per_seed.items():
            if arch == "wide":
                continue
            da = {c: seed_intervals([by_seed[s]["categories"][c]["accuracy"]
                                     - per_seed["wide"][s]["categories"][c]["accuracy"] for s in seeds]) for c in cats}
            db = {c: seed_intervals([by_seed[s]["categories"][c]["answer_bits"]
                                     - per_seed["wide"][s]["categories"][c]["answer_bits"] for s in seeds])
                  for c in cats}
            stats[arch]["paired_vs_wide"] = {"accuracy": da, "answer_bits": db}
            md.append(f"| {names[arch]} | " + " | ".join(fmt(da[c], True) for c in cats) + " | "
                      + " | ".join(fmt(db[c]) for c in cats) + " |")
    if "dual" in per_seed:
        dual = per_seed["dual"]
        n_layers = len(dual[seeds[0]]["routing"][cats[0]]["layers"])
        md += ["", f"#### {names['dual']}: routing at the answer-producing positions, per layer", "",
               "| category | value | " + " | ".join(f"layer {i}" for i in range(n_layers)) + " |",
               "|---|---|" + "---|" * n_layers]
        stats["dual"]["routing"] = {}
        for c in cats:
            for key, label in (("gate_deep", "g_d"), ("gate_wide", "g_w"), ("rho_deep", "ρ_d")):
                cells = []
                for i in range(n_layers):
                    st = seed_intervals([dual[s]["routing"][c]["layers"][i][key] for s in seeds])
                    stats["dual"]["routing"].setdefault(c, {}).setdefault(key, []).append(st)
                    cells.append(fmt(st))
                md.append(f"| {c} | {label} | " + " | ".join(cells) + " |")
        md += ["", f"#### {names['dual']}: cost of forcing the gates (answer loss, bits/token, vs the learned gates)",
               "", "| forced | " + " | ".join(cats) + " |", "|---" * (1 + len(cats)) + "|"]
        stats["dual"]["forced"] = {}
        for label, _ in FORCED:
            sts = {c: seed_intervals([dual[s]["forced"][label][c] for s in seeds]) for c in cats}
            stats["dual"]["forced"][label] = sts
            md.append(f"| {label}{' (rescales the residual)' if label in RESCALING else ' (keeps g_d + g_w)'} | "
                      + " | ".join(fmt(sts[c]) for c in cats) + " |")
    return {"stats": stats, "markdown": "\n".join(md)}

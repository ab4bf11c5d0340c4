"""A sweep's report: results.csv (one row per finished run), results.md (the paper's layout: mean ± std over
seeds, paired differences, the best arm per budget in bold) and the plots, from the run folders alone,
so it can be rebuilt at any time (`dualpath sweep SWEEP.yaml --aggregate-only`). It reads the plan's
`SweepConfig` and `Run` objects (from `sweep`, which imports this module) by attribute."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from ..fileio import atomic_open, atomic_save_figure, atomic_write_text


def _collect(runs: list) -> list[dict]:
    rows = []
    for r in runs:
        path = Path(r.config.train.out_dir) / "eval.json"
        if not path.is_file():
            continue
        res = json.loads(path.read_text())
        row = {"budget": r.budget, "arm": r.arm, "arch": r.arch, "K": r.K, "alpha": r.alpha, "seed": r.seed,
               "params": r.params, "flops_per_token": r.flops_per_token, "flops_ratio": r.flops_ratio,
               "tokens": res["summary"].get("tokens"), "train_flops": res["summary"]["flops"],
               "val_bpb": res["summary"].get("val_bpb")}
        if r.dial_value is not None:
            row = {"dial": r.dial_value, **row}
        for ds, v in (res.get("eval") or {}).items():
            row[f"{ds}/bpb"] = v.get("bpb")
            row[f"{ds}/loss"] = v.get("loss")
            if v.get("answer_loss") is not None and not ds.endswith(":examples"):
                row[f"{ds}/answer_loss"] = v.get("answer_loss")
            for cat, c in (v.get("categories") or {}).items():
                if ds.endswith(":examples"):
                    row[f"{cat}/bpb"] = c.get("bpb")
                    row[f"{cat}/acc"] = c.get("accuracy")
        rows.append(row)
    return rows


def aggregate(sweep, runs: list) -> list[dict]:
    """results.csv (one row per run), results.md (mean ± std over seeds, best per budget in bold), plots."""
    import statistics

    out = Path(sweep.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = _collect(runs)
    if not rows:
        return rows
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    columns = _paper_columns(keys)
    lines = []
    dial = sweep.synthetic.dial
    for dial_value, budget in sorted({(r.get("dial"), r["budget"]) for r in rows}, key=lambda g: (g[0] or 0, g[1])):
        group = [r for r in rows if r["budget"] == budget and r.get("dial") == dial_value]
        arms = list(dict.fromkeys(r["arm"] for r in group))
        stats = {}
        for arm in arms:
            rs = [r for r in group if r["arm"] == arm]
            toks = sorted({r["tokens"] for r in rs if r.get("tokens")})
            stats[arm] = {"params": rs[0]["params"], "fpt": rs[0]["flops_per_token"], "ratio": rs[0]["flops_ratio"],
                          "tokens": "/".join(f"{t / 1e6:.3g}M" for t in toks) or "–", "n": len(rs)}
            for m in (m for col in columns.values() for m in col):
                vals = [r[m] for r in rs if isinstance(r.get(m), (int, float)) and math.isfinite(r[m])]
                stats[arm][m] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else None) \
                    if vals else None
        best = {}
        for metric, *_ in columns.values():
            vals = {a: s[metric][0] for a, s in stats.items() if s[metric] is not None}
            if len(set(vals.values())) > 1:  # no winner among ties
                best[metric] = min(vals, key=vals.get)
        where = f"{dial} = {dial_value:g}, " if dial_value is not None else ""
        lines += [f"### {where}Budget F_M = {budget:.3g} ({sweep.match} FLOPs per layer; protocol: "
                  f"{sweep.protocol})", "",
                  "| arm | params | true FLOPs/token (vs PureWide) | tokens | seeds | " + " | ".join(columns) + " |",
                  "|---" * (len(columns) + 5) + "|"]
        for arm, s in stats.items():
            cells = []
            for metric, *acc in columns.values():
                if s[metric] is None:
                    cells.append("–")
                    continue
                mean, sd = s[metric]
                text = f"{mean:.4f}" + (f" ± {sd:.4f}" if sd is not None else "")
                text = f"**{text}**" if best.get(metric) == arm else text
                if acc and s[acc[0]] is not None:
                    text += f" ({100 * s[acc[0]][0]:.1f}%)"
                cells.append(text)
            lines.append(f"| {arm} | {s['params'] / 1e6:.2f}M | {s['fpt'] / 1e6:.2f}M ({s['ratio'] - 1:+.1%}) | "
                         f"{s['tokens']} | {s['n']} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += _paired(group, arms, "val_bpb")
    lines.append("Mean ± std over seeds (no ± for one seed); bold: lowest in the budget. BPB is bits per byte, the "
                 "answer loss nats per answer token, (x%) greedy exact-match accuracy; results.csv has every metric "
                 "of every run.")
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    _plots(out, rows, runs)
    if dial:
        dose_response(out, rows, sweep)
    return rows


def dose_response_points(rows: list[dict], metric_of, xs_of) -> dict[str, list[tuple[float, float, float, int]]]:
    """arm -> [(x, mean, std, seeds)] over the x values `xs_of(row)` yields with `metric_of(row, x)`."""
    import statistics

    acc: dict[tuple[str, float], list[float]] = {}
    for r in rows:
        for x in xs_of(r):
            v = metric_of(r, x)
            if isinstance(v, (int, float)) and math.isfinite(v):
                acc.setdefault((r["arm"], x), []).append(v)
    out: dict[str, list] = {}
    for (arm, x), vals in sorted(acc.items(), key=lambda kv: kv[0][1]):
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.setdefault(arm, []).append((x, statistics.mean(vals), sd, len(vals)))
    return out


def dose_response(out: Path, rows: list[dict], sweep) -> dict:
    """dose_response.png and .json: accuracy of the capacity category against the dial (one model per dial
    value), and accuracy of the compute category against its per-example steps (per dial value's models
    pooled: every corpus holds the same chain distribution)."""
    s = sweep.synthetic
    cap = dose_response_points(rows, lambda r, x: r.get(f"{s.capacity_category}/acc"), lambda r: [r["dial"]])
    step_keys = sorted({k for r in rows for k in r if k.startswith(f"{s.compute_category}@") and k.endswith("/acc")})

    def step_of(k):
        return float(k.split("=", 1)[1].split("/", 1)[0])

    comp = dose_response_points(rows, lambda r, x: r.get(next(k for k in step_keys if step_of(k) == x)),
                                lambda r: [step_of(k) for k in step_keys if k in r])
    result = {"capacity": {"category": s.capacity_category, "dial": s.dial, "points": cap},
              "compute": {"category": s.compute_category, "points": comp}}
    atomic_write_text(out / "dose_response.json", json.dumps(result, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return result
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (title, pts, xlabel) in zip(axes, (
            (f"capacity: {s.capacity_category}", cap, s.dial),
            (f"compute: {s.compute_category}", comp, f"{s.compute_category} steps"))):
        for arm, p in pts.items():
            ax.errorbar([x for x, *_ in p], [100 * m for _, m, _, _ in p], yerr=[100 * sd for _, _, sd, _ in p],
                        marker="o", capsize=3, label=arm)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("greedy exact-match accuracy (%)")
        ax.set_title(title)
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8)
    axes[0].set_xscale("log")
    fig.suptitle("mean ± std over seeds; matched FLOPs per token" + (", equal tokens" if sweep.protocol == "tokens"
                                                                     else ""))
    fig.tight_layout()
    atomic_save_figure(fig, out / "dose_response.png", dpi=120)
    plt.close(fig)
    return result


def _paper_columns(keys: list[str]) -> dict[str, tuple[str, ...]]:
    """The paper's layout: val BPB, BPB per eval set, Q/A answer loss, synthetic per-category BPB (with the
    category's accuracy beside it). Header -> (metric, [accuracy metric])."""
    cols = {"val BPB": ("val_bpb",)}
    for k in keys:
        name, _, metric = k.rpartition("/")
        if not name or name.endswith(":examples") or "@" in name:  # a set's total; per-dial bins: results.csv only
            continue
        if metric == "bpb" and f"{name}/acc" in keys:
            cols[f"{name} BPB (acc)"] = (k, f"{name}/acc")
        elif metric == "bpb":
            cols[f"{name} BPB"] = (k,)
        elif metric == "answer_loss":
            cols[f"{name} answer loss"] = (k,)
    return cols


def _paired(group: list[dict], arms: list[str], metric: str) -> list[str]:
    """Arm minus baseline, seed by seed. Within a seed every arm sees the same windows, so this spread is far
    tighter than the seed-to-seed spread of the means."""
    import statistics

    def value(r):
        v = r.get(metric)
        return v if isinstance(v, (int, float)) and math.isfinite(v) else None

    base = "PureWide" if "PureWide" in arms else arms[0]
    ref = {r["seed"]: value(r) for r in group if r["arm"] == base and value(r) is not None}
    if len(ref) < 2:
        return []
    lines = [f"Paired by seed: {metric}, arm minus {base}, mean ± std over seeds; "
             "better in: seeds where the arm is lower", "",
             f"| arm | Δ {metric} vs {base} | better in |", "|---|---|---|"]
    for arm in arms:
        d = [value(r) - ref[r["seed"]] for r in group
             if r["arm"] == arm != base and r["seed"] in ref and value(r) is not None]
        if d:
            spread = f" ± {statistics.stdev(d):.4f}" if len(d) > 1 else ""  # one seed: no spread to claim
            lines.append(f"| {arm} | {statistics.mean(d):+.4f}{spread} | {sum(x < 0 for x in d)}/{len(d)} |")
    return lines + [""]


def _plots(out: Path, rows: list[dict], runs: list) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        return
    budgets = sorted({r["budget"] for r in rows})
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 4), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        for arch, marker in (("wide", "s"), ("loop", "^"), ("dual", "o")):
            rs = [r for r in rows if r["budget"] == budget and r["arch"] == arch and r.get("val_bpb")]
            ax.scatter([r["params"] / 1e6 for r in rs], [r["val_bpb"] for r in rs], marker=marker, label=arch)
        ax.set_xlabel("params (M)")
        ax.set_ylabel("val BPB")
        ax.set_title(f"F_M = {budget:.3g}")
        ax.legend()
    fig.tight_layout()
    atomic_save_figure(fig, out / "bpb_vs_params.png", dpi=120)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 4), squeeze=False)
    # 13 arms outrun the default 10-colour cycle: one colour per arm, one line style per architecture
    arms = list(dict.fromkeys(r.arm for r in runs))
    colors = {arm: plt.get_cmap("tab20")(i % 20) for i, arm in enumerate(arms)}
    styles = {"wide": "-", "loop": "--", "dual": "-"}
    for ax, budget in zip(axes[0], budgets):
        for r in runs:
            if r.budget != budget or r.seed != runs[0].seed:
                continue
            path = Path(r.config.train.out_dir) / "metrics.jsonl"
            if not path.is_file():
                continue
            recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            recs = [x for x in recs if "loss" in x and "flops" in x]
            ax.plot([x["flops"] for x in recs], [x["loss"] for x in recs], label=r.arm, color=colors[r.arm],
                    ls=styles[r.arch], lw=2 if r.arch == "wide" else 1)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on a short range
        ax.set_xlabel("training FLOPs (true)")
        ax.set_ylabel("train loss")
        ax.set_title(f"F_M = {budget:.3g}, seed {runs[0].seed}")
        ax.legend(fontsize=6)
    fig.tight_layout()
    atomic_save_figure(fig, out / "loss_vs_flops.png", dpi=120)
    plt.close(fig)

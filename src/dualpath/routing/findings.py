"""The paper's findings (Alizadeh et al., arXiv 2410.10846) measured over the `duo report` of each training
seed: one number per finding and seed with its bootstrap 95% interval (over sequences), the mean over seeds,
and whether every seed's interval lies on the finding's side of zero. Reads report.json files only.

Each finding is a paired difference a − b in loss (negative: a is better), a statistic of the oracles, or a
correlation; `verdict` compares it with what the paper reports. Findings that only hold under the label-using
per-token oracle say so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import DataError


def load_report(path) -> dict:
    p = Path(path)
    p = p / "report.json" if p.is_dir() else p
    if not p.is_file():
        raise DataError(f"no report.json in {path} (run `dualpath duo report` first)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{p} is not a JSON report ({e.msg})") from None


def _comparison(rep, a: str, b: str, budget: int):
    for c in rep.get("comparisons", []):
        if c["a"] == a and c["b"] == b and int(c["budget"]) == budget:
            return c["delta"], c["ci_low"], c["ci_high"]
    return None


def _early_exit_share(entry: dict) -> float | None:
    """Among the per-token oracle's winning patterns that skip a layer, the share (by tokens won) whose skips
    are a suffix of the layers (an early exit)."""
    won = [(p["pattern"], p["token_wins"]) for p in entry.get("patterns", []) if "X" in p["pattern"]]
    total = sum(w for _, w in won)
    if not total:
        return None
    exits = sum(w for p, w in won if set(p[p.index("X"):]) == {"X"})
    return exits / total


def measure(reps: list[dict], skip_reps: list[dict] | None = None) -> list[dict]:
    """One record per finding: {finding, paper, measure, per_seed: [(value, lo, hi) | None], sign, note}."""
    ks = sorted({int(k) for k in reps[0]["difficulty"]})
    mid = ks[len(ks) // 2]
    out = []

    def paired(finding, paper, measure_, a, b, k, sign=-1, note=""):
        vals = [_comparison(rep, a, b, k) for rep in reps]
        out.append({"finding": finding, "paper": paper, "measure": measure_, "per_seed": vals, "sign": sign,
                    "note": note})

    paired("oracle routing beats random routing", "the oracle's perplexity is far below random routing's",
           f"per-token oracle − random routing, k={mid}", "per-token oracle", "random routing", mid,
           note="label-using oracle")
    paired("per-sequence routing beats random routing", "(not in the paper: the honest-er oracle)",
           f"per-sequence oracle − random routing, k={mid}", "per-sequence oracle", "random routing", mid,
           note="chosen with each sequence's labels")
    k1 = min(ks)
    paired("one big layer, well placed, beats all-big", "activating a big module in one layer outperforms big "
           "modules in all layers", f"per-token oracle at k={k1} − all-big", "per-token oracle", "all-big", k1,
           note="only under the label-using per-token oracle")
    paired("half the big layers beat all-big", "the oracle with 6 of 12 big layers beats all 12",
           f"per-token oracle at k={mid} − all-big", "per-token oracle", "all-big", mid,
           note="label-using oracle")
    paired("a fixed held-out pattern beats random routing", "(context: the best fixed pattern)",
           f"best single pattern (chosen on training windows) − random routing, k={mid}", "best single pattern",
           "random routing", mid)
    routers = sorted({a["router"] for rep in reps for a in rep.get("agreement", []) if int(a["budget"]) == mid})
    for name in routers:
        paired(f"router {name} lands near best-of-N, not the oracle", "trained routers perform like the best of 100 "
               "random trials, far from the oracle", f"router − best of N random patterns, k={mid}",
               f"trained router {name}", "best of N random patterns", mid, sign=0,
               note="verdict: reproduced when the interval holds 0 or is small next to the oracle gap")
        gaps, agree = [], []
        for rep in reps:
            a = next((x for x in rep.get("agreement", []) if x["router"] == name and int(x["budget"]) == mid), None)
            gaps.append((a["loss_gap"], a["gap_ci_low"], a["gap_ci_high"]) if a else None)
            agree.append((a["choice_agreement"], None, None) if a else None)
        out.append({"finding": f"router {name} stays far from the oracle", "paper": "trained routers operate "
                    "differently from oracles and yield suboptimal solutions", "measure": f"router − per-token "
                    f"oracle, k={mid}", "per_seed": gaps, "sign": 1, "note": "label-using oracle"})
        out.append({"finding": f"router {name} chooses differently from the oracle", "paper": "routers operate "
                    "differently from oracles", "measure": f"per-token choice agreement with the oracle, k={mid}",
                    "per_seed": agree, "sign": None, "note": "chance level: the oracle's own big share"})
    out.append({"finding": "some high-loss tokens gain nothing from more compute", "paper": "token difficulty is "
                "not loss: some high-loss tokens do not improve with more compute", "measure": "share of the top-"
                f"decile loss(all-small) tokens the per-token oracle at k={mid} improves by < help threshold",
                "per_seed": [(rep["difficulty"][str(mid)]["share_not_helped_top_decile"], None, None)
                             for rep in reps], "sign": 1, "note": "label-using oracle"})
    def corr(v, key, name):
        c = v.get("ci", {}).get(key)
        return (v[name], c["ci_low"], c["ci_high"]) if c else (v[name], None, None)

    if all(rep.get("variable_budget") for rep in reps):
        out.append({"finding": "early tokens use more big modules", "paper": "early tokens use big modules more, "
                    "later tokens less", "measure": f"Spearman(big layers per token, position), variable-budget "
                    f"oracle, k={mid}", "per_seed": [corr(rep["variable_budget"][str(mid)], "position",
                                                          "spearman_vs_position") for rep in reps], "sign": -1,
                    "note": "label-using oracle with a sequence-level budget"})
        out.append({"finding": "hard tokens get more compute", "paper": "(the notion of difficulty)", "measure":
                    f"Spearman(big layers per token, loss under all-big), variable-budget oracle, k={mid}",
                    "per_seed": [corr(rep["variable_budget"][str(mid)], "big_loss", "spearman_vs_big_loss")
                                 for rep in reps], "sign": 1, "note": "label-using oracle"})
    k_first = min(k for k in ks if k > 0)
    late = [rep.get("layer_preference", {}).get(str(k_first)) for rep in reps]
    out.append({"finding": "big modules go to the later layers", "paper": "later layers need capacity",
                "measure": f"Spearman(layer index, P(big) under the per-sequence oracle), k={k_first}",
                "per_seed": [(v["value"], v["ci_low"], v["ci_high"]) if v else None for v in late], "sign": 1,
                "note": "chosen with each sequence's labels"})
    if skip_reps:
        kx = max(ks)
        out.append({"finding": "skips are not an early exit", "paper": "layer-skipping patterns do not follow "
                    "simple early-exit strategies", "measure": f"share of skipping per-token oracle wins whose skips "
                    f"are a suffix of the layers, k={kx}", "per_seed": [
                        (v, None, None) if (v := _early_exit_share(rep["oracle"]["budgets"][str(kx)])) is not None
                        else None for rep in skip_reps], "sign": -1, "note": "label-using oracle; low = not early exit"})
    return out


def verdict(rec: dict) -> str:
    vals = [v for v in rec["per_seed"] if v is not None]
    if not vals:
        return "untestable (not measured)"
    if rec["sign"] is None:
        return "descriptive"
    have_ci = all(v[1] is not None for v in vals)
    if rec["sign"] == 0:
        return "reproduced" if have_ci and all(v[1] <= 0 <= v[2] for v in vals) else "not reproduced"
    if rec["sign"] < 0:
        ok = all((v[2] if have_ci else v[0]) < 0 for v in vals)
        return "reproduced" if ok else ("not reproduced" if all(v[0] >= 0 for v in vals) else "mixed")
    if rec["finding"].startswith("some high-loss"):
        ok = all(v[0] > 0 for v in vals)
    else:
        ok = all((v[1] if have_ci else v[0]) > 0 for v in vals)
    return "reproduced" if ok else ("not reproduced" if all(v[0] <= 0 for v in vals) else "mixed")


def findings_markdown(records: list[dict], sources: list[str]) -> str:
    def fmt(v):
        if v is None:
            return "–"
        x, lo, hi = v
        if x is None:
            return "–"
        return f"{x:+.4f} [{lo:+.4f}, {hi:+.4f}]" if lo is not None else f"{x:.3f}"

    lines = ["# Duo-LLM findings over seeds", "", f"Reports: {', '.join(sources)}.", "",
             "Per seed: the value and, for loss differences, its bootstrap 95% interval over sequences. A "
             "difference a − b below 0 means a is better.", "",
             "| finding | paper | measure | " + " | ".join(f"seed {i}" for i in range(len(sources))) +
             " | mean | verdict | note |", "|---|---|---|" + "---|" * len(sources) + "---|---|---|"]
    for r in records:
        vals = [v[0] for v in r["per_seed"] if v is not None and v[0] is not None and not math.isnan(v[0])]
        mean = f"{sum(vals) / len(vals):+.4f}" if vals else "–"
        lines.append(f"| {r['finding']} | {r['paper']} | {r['measure']} | " +
                     " | ".join(fmt(v) for v in r["per_seed"]) + f" | {mean} | {verdict(r)} | {r['note']} |")
    return "\n".join(lines) + "\n"


def run_findings(report_dirs, out, skip_dirs=()) -> list[dict]:
    """`dualpath duo findings`: read each seed's report (and with-skip report), write the findings table."""
    from ..fileio import atomic_write_text

    if not report_dirs:
        raise DataError("no report folders given")
    reps = [load_report(p) for p in report_dirs]
    skips = [load_report(p) for p in skip_dirs] if skip_dirs else None
    out = Path(out)
    if out.is_dir():
        raise DataError(f"--out {out} is a folder: give a file name such as findings.md")
    records = measure(reps, skips)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, findings_markdown(records, [str(p) for p in report_dirs]))
    atomic_write_text(out.with_suffix(".json"), json.dumps(
        [dict(r, verdict=verdict(r)) for r in records], indent=1))
    return records

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
        rep = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{p} is not a JSON report ({e.msg})") from None
    missing = [k for k in REPORT_KEYS if not isinstance(rep, dict) or k not in rep]
    if missing:
        raise DataError(f"{p} is not a `duo report` report (no {missing[0]})")
    return rep


REPORT_KEYS = ("rows", "comparisons", "difficulty", "n_layers", "with_skip")


def _check_alike(reps: list[dict], dirs, with_skip: bool | None, what: str) -> None:
    """The seeds' reports must measure the same things: layers, budgets, with or without skip (None: as the
    first one)."""
    first = reps[0]
    with_skip = bool(first["with_skip"]) if with_skip is None else with_skip
    for rep, d in zip(reps, dirs):
        if bool(rep["with_skip"]) != with_skip:
            raise DataError(f"{what} {d} is {'' if rep['with_skip'] else 'not '}a --with-skip report")
        if rep["n_layers"] != first["n_layers"] or set(rep["difficulty"]) != set(first["difficulty"]):
            raise DataError(f"{what} {d} has other layers or budgets than {dirs[0]} "
                            f"({rep['n_layers']} layers, budgets {sorted(map(int, rep['difficulty']))} vs "
                            f"{first['n_layers']}, {sorted(map(int, first['difficulty']))})")


def _comparison(rep, a: str, b: str, budget: int):
    ws = rep.get("within_sequence") or {}
    within = ws.get(str(budget)) or ws.get(budget) or {}
    for c in rep.get("comparisons", []) + [dict(c, budget=budget) for c in within.get("comparisons", [])]:
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
    paired("a per-sequence choice held out within the sequence beats the best fixed pattern",
           "(not in the paper: can a sequence's own context pick its routing?)",
           f"pattern chosen on the sequence's first half − best single pattern, scored on the second half, k={mid}",
           "per-sequence choice from the prefix", "best single pattern", mid,
           note="no label of a scored token is used")
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
               note="a finding of no difference: reproduced when every seed's interval holds 0")
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
    for k in ks:  # every budget, so that none is picked after the fact
        late = [rep.get("layer_preference", {}).get(str(k)) for rep in reps]
        if any(late):
            out.append({"finding": "big modules go to the later layers", "paper": "later layers need capacity",
                        "measure": f"Spearman(layer index, P(big) under the per-sequence oracle), k={k}",
                        "per_seed": [(v["value"], v["ci_low"], v["ci_high"]) if v else None for v in late],
                        "sign": 1, "note": "chosen with each sequence's labels"})
    if skip_reps:
        kx = max(ks)
        out.append({"finding": "skips are not an early exit", "paper": "layer-skipping patterns do not follow "
                    "simple early-exit strategies", "measure": f"share of skipping per-token oracle wins whose skips "
                    f"are a suffix of the layers, k={kx}", "per_seed": [
                        (v, None, None) if (v := _early_exit_share(rep["oracle"]["budgets"][str(kx)])) is not None
                        else None for rep in skip_reps], "sign": -1, "ref": 0.5,
                    "note": "label-using oracle; below one half: mostly not an early exit"})
    return out


def verdict(rec: dict) -> str:
    """reproduced: every seed on the finding's side of the reference (its whole interval, where there is one);
    not reproduced: every seed on the other side; inconclusive otherwise (an interval holds the reference, or
    the seeds disagree). For "no difference" findings (sign 0): reproduced when every interval holds 0."""
    vals = [v for v in rec["per_seed"] if v is not None and v[0] is not None]
    if not vals:
        return "untestable (not measured)"
    if rec["sign"] is None:
        return "descriptive"
    ref = rec.get("ref", 0.0)
    if rec["sign"] == 0:
        if any(v[1] is None for v in vals):
            return "inconclusive (no interval)"
        return "reproduced" if all(v[1] <= ref <= v[2] for v in vals) else "not reproduced"
    lo = [(v[1] if v[1] is not None else v[0]) - ref for v in vals]
    hi = [(v[2] if v[2] is not None else v[0]) - ref for v in vals]
    if rec["sign"] < 0:
        lo, hi = [-h for h in hi], [-x for x in lo]  # now the finding's side is > 0
    if all(x > 0 for x in lo):
        return "reproduced"
    if all(h < 0 for h in hi):
        return "not reproduced"
    return "inconclusive"


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
    """`dualpath duo findings`: read each seed's report (and with-skip report), write OUT/findings.md and
    OUT/findings.json."""
    from ..fileio import atomic_write_text

    if not report_dirs:
        raise DataError("no report folders given")
    reps = [load_report(p) for p in report_dirs]
    _check_alike(reps, list(report_dirs), None, "report")
    skips = [load_report(p) for p in skip_dirs] if skip_dirs else None
    if skips:
        _check_alike(skips, list(skip_dirs), True, "--skip-report")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a folder")
    records = measure(reps, skips)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "findings.md", findings_markdown(records, [str(p) for p in report_dirs]))
    atomic_write_text(out / "findings.json", json.dumps([dict(r, verdict=verdict(r)) for r in records], indent=1))
    return records

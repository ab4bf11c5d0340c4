"""The adaptive-depth Pareto sweep: BPB against realised FLOPs and measured tokens/s (docs/ADAPTIVE.md).

    dualpath eval CKPT --data wikitext-2/test.txt --adaptive-sweep OUT [--sweep-exit ... --sweep-deep ...]

Rows: the full model, the fixed-K curve (forced K = 1..trained K: the baseline adaptive depth must beat) and
one row per policy of the grid (exit × deep × wide × delta, each list with "off" added). Every row's FLOPs are
counted from its executed passes (FlopTally), so full, fixed-K and adaptive rows are measured alike.
"""

from __future__ import annotations

import csv
import io
import itertools
from pathlib import Path

from ..errors import DataError
from ..fileio import atomic_save_figure, atomic_write_text
from ..model import AdaptivePolicy, Overrides
from .evaluate import evaluate_shards, evaluate_text

DEFAULT_EXIT = (0.5, 0.3, 0.2, 0.1, 0.05, 0.02)
DEFAULT_DEEP = (0.1, 0.2)
COLUMNS = ("variant", "kind", "K", "exit", "deep", "wide", "delta", "loss", "bpb", "bpb_increase",
           "flops_per_token", "deep_flops_per_token", "deep_flops_saving", "flops_saving", "tokens_per_s",
           "speedup", "tokens")


def policy_grid(arch: str, exits=DEFAULT_EXIT, deeps=DEFAULT_DEEP, wides=(), deltas=()) -> list[AdaptivePolicy]:
    """Every combination of the thresholds (each list also "off"), without the all-off one; deep and wide
    only for a dual model."""
    if arch != "dual":
        deeps, wides = (), ()
    grid = itertools.product((None, *exits), (None, *deeps), (None, *wides), (None, *deltas))
    return [AdaptivePolicy(exit=e, deep=d, wide=w, delta=dl) for e, d, w, dl in grid
            if (e, d, w, dl) != (None, None, None, None)]


def adaptive_sweep(model, tokenizer, data: str | Path, policies: list[AdaptivePolicy], *, batch_size: int = 8,
                   limit: int | None = None, extra_steps_gain: str = "last", log=None) -> list[dict]:
    """One row per variant (see the module docstring), on one dataset: a prepared folder's val split or a
    text file."""
    cfg = model.cfg
    if cfg.arch not in ("loop", "dual"):
        raise DataError(f"--adaptive-sweep needs a loop or dual model; this one is {cfg.arch}")
    for p in policies:
        p.check(cfg)
    path = Path(data)
    if path.is_dir():
        def run(ov):
            return evaluate_shards(model, path, batch_size=batch_size, max_windows=limit, overrides=ov, realised=True)
    elif path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")

        def run(ov):
            return evaluate_text(model, tokenizer, text, batch_size, ov, max_windows=limit, realised=True)
    else:
        raise DataError(f"evaluation data not found: {path}")
    variants = [("full", "full", cfg.K, Overrides())]
    variants += [(f"K={k}", "fixed_K", k, Overrides(K=k, extra_steps_gain=extra_steps_gain)) for k in range(1, cfg.K)]
    variants += [(f"adaptive {p}", "adaptive", cfg.K, Overrides(adaptive=p)) for p in policies]
    rows = []
    for name, kind, K, ov in variants:
        if log:
            log(f"sweep: {name}")
        r = run(ov)
        pol = ov.adaptive or AdaptivePolicy()
        rows.append({"variant": name, "kind": kind, "K": K, **{k: getattr(pol, k) for k in AdaptivePolicy.KEYS},
                     **{k: r[k] for k in ("loss", "bpb", "flops_per_token", "deep_flops_per_token", "tokens_per_s",
                                          "tokens")}})
    full = rows[0]
    for r in rows:
        r["bpb_increase"] = r["bpb"] / full["bpb"] - 1
        r["flops_saving"] = 1 - r["flops_per_token"] / full["flops_per_token"]
        r["deep_flops_saving"] = 1 - r["deep_flops_per_token"] / full["deep_flops_per_token"]
        r["speedup"] = r["tokens_per_s"] / full["tokens_per_s"]
    return rows


def sweep_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in COLUMNS})
    return buf.getvalue()


def plot_sweep(rows: list[dict], path: str | Path, title: str = "") -> None:
    """BPB against realised FLOPs/token and against tokens/s: adaptive points, the fixed-K curve, the full model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    fixed = sorted([r for r in rows if r["kind"] in ("fixed_K", "full")], key=lambda r: r["K"])
    adaptive = [r for r in rows if r["kind"] == "adaptive"]
    for ax, key, label in ((axes[0], "flops_per_token", "realised forward FLOPs per token"),
                           (axes[1], "tokens_per_s", "measured tokens/s")):
        ax.plot([r[key] for r in fixed], [r["bpb"] for r in fixed], "o-", color="black", label="fixed K = 1..K")
        for r in fixed:
            ax.annotate(f"K={r['K']}", (r[key], r["bpb"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        groups: dict[str, list[dict]] = {}
        for r in adaptive:
            groups.setdefault("exit only" if r["deep"] is None and r["wide"] is None
                              else f"deep={r['deep']}, wide={r['wide']}", []).append(r)
        for g, rs in groups.items():
            ax.scatter([r[key] for r in rs], [r["bpb"] for r in rs], s=18, label=f"adaptive: {g}")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("bits per byte")
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    atomic_save_figure(fig, path)


def write_sweep(rows: list[dict], out_dir: str | Path, title: str = "") -> dict[str, str]:
    """adaptive_sweep.csv and, with matplotlib, adaptive_sweep.png in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": str(out / "adaptive_sweep.csv")}
    atomic_write_text(files["csv"], sweep_csv(rows))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return files
    files["png"] = str(out / "adaptive_sweep.png")
    plot_sweep(rows, files["png"], title)
    return files


def sweep_markdown(rows: list[dict]) -> str:
    lines = ["| variant | BPB | ΔBPB | FLOPs/token | deep FLOPs saved | tokens/s | speedup |", "|---" * 7 + "|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['bpb']:.4f} | {100 * r['bpb_increase']:+.2f}% | {r['flops_per_token']:.4g} "
                     f"| {100 * r['deep_flops_saving']:.1f}% | {r['tokens_per_s']:,.0f} | {r['speedup']:.2f}× |")
    return "\n".join(lines)

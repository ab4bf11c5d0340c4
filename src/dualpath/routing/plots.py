"""PNG plots with matplotlib's Agg backend (through Figure objects: no pyplot, no global backend change)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> str:
    from ..fileio import atomic_save_figure

    atomic_save_figure(fig, path)
    return str(path)


def layer_usage_by_layer(entries: dict, path: Path, choice: str = "big") -> str:
    """entries: budget -> oracle entry with usage[choice]['by_layer_sequence'|'by_layer_token']."""
    fig = _figure(10, 4)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, title in ((axes[0], "by_layer_sequence", "per-sequence oracle"),
                           (axes[1], "by_layer_token", "per-token oracle (uses labels)")):
        for k, e in entries.items():
            u = e["usage"][choice][key]
            ax.plot(range(len(u)), u, marker="o", label=f"k={k}")
        ax.set_title(f"{title}: P({choice}) by layer")
        ax.set_xlabel("layer")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"share of {choice}")
    axes[1].legend(fontsize=8, ncol=2)
    return _save(fig, path)


def layer_usage_by_position(entries: dict, path: Path, choice: str = "big", max_bins: int = 64) -> str:
    """Heatmaps (layer x token position) of P(choice) under the per-token oracle minus its mean over the
    whole map (k/L for big), one per budget: where, along the sequence, the oracle puts its extra compute."""
    ks = list(entries)
    cols = min(3, len(ks))
    rows = (len(ks) + cols - 1) // cols
    fig = _figure(4.2 * cols, 3.0 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
    maps = []
    for k in ks:
        u = np.asarray(entries[k]["usage"][choice]["by_position"], dtype=float)  # (L, T)
        T = u.shape[1]
        bins = min(max_bins, T)
        edges = np.linspace(0, T, bins + 1).astype(int)
        ub = np.stack([u[:, a:b].mean(axis=1) for a, b in zip(edges[:-1], edges[1:])], axis=1)
        maps.append((k, ub - u.mean(), u.mean(), T))
    lim = max([float(np.abs(m).max()) for _, m, _, _ in maps] + [1e-6])
    im = None
    for ax, (k, m, mu, T) in zip(axes, maps):
        im = ax.imshow(m, aspect="auto", origin="lower", vmin=-lim, vmax=lim, cmap="RdBu_r",
                       extent=(0, T, -0.5, m.shape[0] - 0.5))
        ax.set_title(f"k={k}: P({choice}) - {mu:.2f}", fontsize=9)
        ax.set_xlabel("token position")
        ax.set_ylabel("layer")
    for ax in axes[len(maps):]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=list(axes[:len(maps)]), shrink=0.8, label=f"P({choice}) minus its mean (per-token oracle)")
    return _save(fig, path)


def loss_vs_flops(rows: list[dict], path: Path) -> str:
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    by_method: dict[str, list] = {}
    for r in rows:
        if r.get("loss") is not None and r.get("flops_per_token") is not None:
            by_method.setdefault(r["method"], []).append((r["flops_per_token"], r["loss"]))
    markers = "osD^vP*X"
    for j, (m, pts) in enumerate(by_method.items()):
        pts.sort()
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker=markers[j % len(markers)], markersize=5, linestyle="-" if len(pts) > 1 else "none",
                label=m, alpha=0.85)
    ax.set_xlabel("realised forward FLOPs per token")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title("loss at matched big-layer budgets")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def difficulty_hist(diffs: dict, path: Path, threshold: float) -> str:
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    allv = np.concatenate([np.asarray(d) for d in diffs.values()]) if diffs else np.zeros(1)
    lo, hi = np.quantile(allv, 0.001), np.quantile(allv, 0.999)
    bins = np.linspace(min(lo, -threshold), max(hi, threshold), 80)
    for k, d in diffs.items():
        ax.hist(np.clip(d, bins[0], bins[-1]), bins=bins, histtype="step", density=True, label=f"k={k}")
    ax.axvline(threshold, color="k", linestyle="--", linewidth=0.8, label=f"threshold {threshold:g}")
    ax.set_xlabel("difficulty = loss(all-small) - loss(per-token oracle)  [nats]")
    ax.set_ylabel("density")
    ax.set_title("token difficulty (the oracle uses the labels: an upper bound on the gain)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def difficulty_vs_loss(raw: np.ndarray, diff: np.ndarray, k: int, path: Path, threshold: float,
                       max_points: int = 20000, seed: int = 0) -> str:
    fig = _figure(6, 4.5)
    ax = fig.subplots()
    n = raw.shape[0]
    sel = np.random.default_rng(seed).permutation(n)[:max_points] if n > max_points else np.arange(n)
    ax.scatter(raw[sel], diff[sel], s=3, alpha=0.3, linewidths=0)
    q = float(np.quantile(raw, 0.9))
    ax.axvline(q, color="r", linestyle="--", linewidth=0.8, label="top decile of all-small loss")
    ax.axhline(threshold, color="k", linestyle="--", linewidth=0.8, label=f"difficulty {threshold:g}")
    ax.set_xlabel("loss(all-small)  [nats]")
    ax.set_ylabel("difficulty  [nats]")
    ax.set_title(f"difficulty vs raw loss, k={k}")
    ax.legend(fontsize=8)
    return _save(fig, path)


def variable_budget_by_position(variable: dict, path: Path) -> str:
    """Mean big layers per token against token position under the variable-budget oracle, one line per k."""
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    for k, v in variable.items():
        u = np.asarray(v["by_position"], dtype=float)
        ax.plot(range(len(u)), u, label=f"k={k}", linewidth=1)
        ax.axhline(float(k), color=ax.lines[-1].get_color(), linestyle=":", linewidth=0.8)
    ax.set_xlabel("token position")
    ax.set_ylabel("big layers per token")
    ax.set_title("variable-budget oracle: compute by position (dotted: the uniform k)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def variable_budget_by_difficulty(variable: dict, path: Path) -> str:
    """Mean big layers per token by decile of the token's loss under all-small and under all-big."""
    fig = _figure(10, 4)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, what in ((axes[0], "by_small_loss_decile", "all-small"), (axes[1], "by_big_loss_decile", "all-big")):
        for k, v in variable.items():
            u = np.asarray(v[key], dtype=float)
            ax.plot(np.arange(1, len(u) + 1), u, marker="o", label=f"k={k}")
        ax.set_xlabel(f"decile of the token's loss under {what} (1 = easiest)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("big layers per token")
    axes[0].set_title("variable-budget oracle: compute by token difficulty", fontsize=9)
    axes[1].legend(fontsize=8)
    return _save(fig, path)

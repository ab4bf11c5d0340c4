"""The comparison: every routing policy of a Duo-LLM model at matched big-layer budgets, and token difficulty.

Rows (loss, perplexity and realised forward FLOPs per token, `realised_flops`, true convention):

    all-big, all-small          the two fixed extremes (k = L and k = 0)
    random routing              every (layer, token) big with probability k/L, independently (seeded)
    best of N random patterns   N whole-sequence patterns with exactly k big layers drawn uniformly without
                                replacement (all of them if C(L, k) <= N); the best on this data
    best single pattern         the best whole-sequence pattern found by the oracle search (on this data)
    trained router              a router checkpoint trained for target k/L (hard routing); missing unless
                                one is given or router_steps > 0 trains one on the train split
    per-sequence oracle         each sequence's best pattern (uses the labels)
    per-token oracle            each token's best pattern (uses the labels: optimistic, a bound)

Token difficulty at budget k: loss(all-small) − loss(per-token oracle at k) per token: how much the best
allocation of k big layers *could* help the token. A token is "not helped" when its difficulty is below
help_threshold (0.05 nats by default, ~5% perplexity on that token).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..model import BIG, SMALL
from ..errors import ConfigError
from .adapters import DuoSearchModel
from .search import PatternEvaluator
from . import plots
from .oracle import (OPTIMISTIC_NOTE, SEQUENCE_NOTE, check_budgets, check_duo, flops_per_token, oracle_budget,
                     public, write_oracle)

METHODS = ("all-big", "all-small", "random routing", "best of N random patterns", "best single pattern",
           "trained router", "per-sequence oracle", "per-token oracle")


def _ppl(loss):
    return math.exp(min(loss, 50.0)) if loss is not None else None


@torch.inference_mode()
def _routed_losses(model, batches, choice_fn) -> tuple[torch.Tensor, float]:
    """Per-token losses (N, T) under explicit routing tensors choice_fn(B, T) -> (L, B, T), and FLOPs/token."""
    out, flops, n = [], 0.0, 0
    for x, y in batches:
        c = choice_fn(*x.shape).to(x.device)
        r = model(x, y, choices=c, return_per_token_loss=True)
        out.append(r.per_token_loss.float().cpu())
        flops += flops_per_token(model, c, x.shape[1]) * c[0].numel()
        n += c[0].numel()
    return torch.cat(out), flops / max(n, 1)


def random_patterns(L: int, k: int, n: int, seed: int) -> list[tuple]:
    """n distinct patterns with exactly k big layers (the rest small), uniform without replacement; all of
    them when C(L, k) <= n."""
    import itertools

    total = math.comb(L, k)
    if total <= n:
        combos = list(itertools.combinations(range(L), k))
    else:
        rng = np.random.default_rng([seed, L, k])
        seen: set = set()
        combos = []
        while len(combos) < n:
            c = tuple(sorted(rng.choice(L, size=k, replace=False).tolist()))
            if c not in seen:
                seen.add(c)
                combos.append(c)
    return [tuple("big" if i in set(c) else "small" for i in range(L)) for c in combos]


def _rankdata(a: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as scipy.stats.rankdata)."""
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    ranks = np.empty(len(a), dtype=np.float64)
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1
        i = j + 1
    return ranks


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(_rankdata(np.asarray(a)), _rankdata(np.asarray(b)))


def difficulty_stats(small: np.ndarray, oracle_tok: np.ndarray, big: np.ndarray, threshold: float) -> dict:
    d = small - oracle_tok
    q90 = float(np.quantile(small, 0.9))
    top = small >= q90
    return {
        "mean": float(d.mean()), "median": float(np.median(d)),
        "p10": float(np.quantile(d, 0.1)), "p90": float(np.quantile(d, 0.9)),
        "share_negative": float((d < 0).mean()),
        "pearson_vs_small_loss": pearson(d, small), "spearman_vs_small_loss": spearman(d, small),
        "pearson_vs_big_loss": pearson(d, big), "spearman_vs_big_loss": spearman(d, big),
        "threshold": threshold, "top_decile_small_loss": q90, "n_top_decile": int(top.sum()),
        "share_not_helped_top_decile": float((d[top] < threshold).mean()) if top.any() else float("nan"),
        "share_not_helped_all": float((d < threshold).mean()),
        "mean_top_decile": float(d[top].mean()) if top.any() else float("nan"),
    }


def report(model, batches, budgets, *, random_trials: int = 100, routers=(), with_skip: bool = False,
           max_patterns: int = 4096, beam: int = 16, help_threshold: float = 0.05, seed: int = 0, log=None) -> dict:
    """The comparison table and token difficulty (see the module docstring).

    routers: [(router_model, target_fraction), ...] (router-policy models over the same base weights).
    Returns {"rows": [...], "difficulty": {k: stats}, "oracle": oracle result, ...}; "_" keys hold tensors.
    """
    from .router import evaluate_routed

    check_duo(model, "the Duo report")
    L = model.cfg.n_layers
    ks = check_budgets(budgets, L)
    if random_trials < 1:
        raise ConfigError(f"--random-trials must be >= 1, got {random_trials}")
    batches = list(batches)
    T = batches[0][0].shape[1]
    valid = torch.cat([y != -1 for _, y in batches]).cpu()
    n_tok = int(valid.sum())

    def mean(tok):
        return float(tok[valid].double().sum() / n_tok)

    rows = []

    def row(method, k, frac, loss, flops, **extra):
        rows.append({"method": method, "budget": k, "big_fraction": frac, "loss": loss, "ppl": _ppl(loss),
                     "flops_per_token": flops, **extra})

    def const(code):
        return lambda B, T_: torch.full((L, B, T_), code, dtype=torch.long)

    big_tok, big_flops = _routed_losses(model, batches, const(BIG))
    small_tok, small_flops = _routed_losses(model, batches, const(SMALL))
    if log:
        log(f"all-big {mean(big_tok):.4f}, all-small {mean(small_tok):.4f}")

    sm = DuoSearchModel(model)
    oracle_res = {"n_layers": L, "with_skip": with_skip, "skip_whole_layer": model.cfg.skip_whole_layer,
                  "max_patterns": max_patterns, "beam": beam, "note": OPTIMISTIC_NOTE, "sequence_note": SEQUENCE_NOTE,
                  "budgets": {}, "n_sequences": int(valid.shape[0]), "n_tokens": n_tok, "seq_len": T}
    difficulty, diff_arrays = {}, {}
    router_rows = {}
    for rm, target in routers:
        ev = evaluate_routed(rm, batches)
        k_match = min(range(L + 1), key=lambda k: abs(k / L - (target if target is not None else ev["big_fraction"])))
        router_rows.setdefault(k_match, []).append((target, ev))
    for k in ks:
        # random routing: Bernoulli(k/L) per layer and token
        gen = torch.Generator().manual_seed(seed * 1000 + k)

        def rand_fn(B, T_, gen=gen, p=k / L):
            return torch.where(torch.rand((L, B, T_), generator=gen) < p, BIG, SMALL)

        rnd_tok, rnd_flops = _routed_losses(model, batches, rand_fn)
        # best of N random patterns first, so the oracle search includes them
        ev = PatternEvaluator(sm, batches)
        pats = random_patterns(L, k, random_trials, seed)
        losses = ev.evaluate(pats)
        ib = min(range(len(pats)), key=lambda i: (losses[i], i))
        e = oracle_budget(model, batches, k, with_skip=with_skip, max_patterns=max_patterns, beam=beam, evaluator=ev,
                          log=log)
        oracle_res["budgets"][k] = e
        if k == L:
            row("all-big", k, 1.0, mean(big_tok), big_flops)
        if k == 0:
            row("all-small", k, 0.0, mean(small_tok), small_flops)
        row("random routing", k, k / L, mean(rnd_tok), rnd_flops, note="p_big = k/L per layer and token")
        row("best of N random patterns", k, k / L, losses[ib], flops_per_token(
            model, e["_codes"][e["_result"]["patterns"].index(pats[ib])].view(L, 1, 1), T),
            n_patterns=len(pats), pattern="".join(sm.letters[c] for c in pats[ib]))
        row("best single pattern", k, k / L, e["best_single"]["loss"], e["best_single"]["flops_per_token"],
            pattern=e["best_pattern"], search=e["method"])
        if k in router_rows:
            for target, rv in router_rows[k]:
                row("trained router", k, rv["big_fraction"], rv["loss"], rv["flops_per_token"], target=target,
                    note=f"achieved big fraction {rv['big_fraction']:.3f} vs target "
                         f"{target if target is not None else float('nan'):.3f}")
        else:
            row("trained router", k, None, None, None, note="missing (no router checkpoint for this budget)")
        r = e["_result"]
        row("per-sequence oracle", k, k / L, r["per_sequence_oracle"], e["per_sequence_oracle"]["flops_per_token"],
            note="uses the labels")
        row("per-token oracle", k, k / L, r["per_token_oracle"], e["per_token_oracle"]["flops_per_token"],
            note="optimistic: uses each token's label")
        s, o, b = small_tok[valid].numpy(), r["tok_best"][valid].numpy(), big_tok[valid].numpy()
        difficulty[k] = difficulty_stats(s, o, b, help_threshold)
        diff_arrays[k] = s - o
    if L not in ks:
        row("all-big", L, 1.0, mean(big_tok), big_flops)
    if 0 not in ks:
        row("all-small", 0, 0.0, mean(small_tok), small_flops)
    for k, lst in router_rows.items():
        if k not in ks:
            for target, rv in lst:
                row("trained router", k, rv["big_fraction"], rv["loss"], rv["flops_per_token"], target=target,
                    note="budget not among --budgets")
    order = {m: i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda r: (r["budget"], order.get(r["method"], 99)))
    full = big_flops
    for r in rows:
        r["flops_vs_all_big"] = r["flops_per_token"] / full if r["flops_per_token"] is not None else None
    return {"rows": rows, "difficulty": difficulty, "oracle": oracle_res, "n_layers": L,
            "n_sequences": int(valid.shape[0]), "n_tokens": n_tok, "seq_len": T, "random_trials": random_trials,
            "help_threshold": help_threshold,
            "with_skip": with_skip, "note": OPTIMISTIC_NOTE,
            "_small_tok": small_tok[valid].numpy(), "_big_tok": big_tok[valid].numpy(), "_diff": diff_arrays}


def report_markdown(res: dict, title: str = "Duo-LLM routing report") -> str:
    def f(v, fmt):
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    lines = [f"# {title}", ""]
    if res.get("checkpoint"):
        lines += [f"Checkpoint `{res['checkpoint']}`, data `{res.get('data')}`.", ""]
    lines += [f"{res['n_sequences']} sequences of {res['seq_len']} tokens ({res['n_tokens']} target tokens), "
              f"{res['n_layers']} layers; non-big layers are "
              f"{'small or skip' if res['with_skip'] else 'small'}; best of N uses N = {res['random_trials']}.", "",
              "| method | k big | big fraction | loss | ppl | FLOPs/token | vs all-big | notes |",
              "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        notes = "; ".join(str(r[x]) for x in ("pattern", "note") if r.get(x))
        lines.append(f"| {r['method']} | {r['budget']} | {f(r['big_fraction'], '.3f')} | {f(r['loss'], '.4f')} | "
                     f"{f(r['ppl'], '.2f')} | {f(r['flops_per_token'], '.4g')} | {f(r['flops_vs_all_big'], '.3f')} | "
                     f"{notes} |")
    lines += ["", f"**Optimism.** {OPTIMISTIC_NOTE} {SEQUENCE_NOTE} The best-of-N and best-single rows are chosen "
              "on the same data as well.", "",
              "## Token difficulty", "",
              "difficulty = loss(all-small) − loss(per-token oracle at k), per token. \"Not helped\": difficulty < "
              f"{res['help_threshold']:g} nats. High-loss tokens: the top decile of loss(all-small). Note that the "
              "correlation with loss(all-small) is partly mechanical (the same term appears on both sides); the "
              "correlation with loss(all-big) does not share a term.", "",
              "| k | mean | median | p10 | p90 | < 0 | Pearson / Spearman vs all-small loss | vs all-big loss | "
              "top-decile tokens not helped | all tokens not helped |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for k, d in res["difficulty"].items():
        lines.append(f"| {k} | {d['mean']:.4f} | {d['median']:.4f} | {d['p10']:.4f} | {d['p90']:.4f} | "
                     f"{d['share_negative']:.1%} | "
                     f"{d['pearson_vs_small_loss']:.3f} / {d['spearman_vs_small_loss']:.3f} | "
                     f"{d['pearson_vs_big_loss']:.3f} / {d['spearman_vs_big_loss']:.3f} | "
                     f"{d['share_not_helped_top_decile']:.1%} (of {d['n_top_decile']}) | "
                     f"{d['share_not_helped_all']:.1%} |")
    files = res.get("files") or {}
    pngs = [(k, v) for k, v in files.items() if str(v).endswith(".png")]
    if pngs:
        lines += ["", "## Plots", ""] + [f"![{k}]({Path(v).name})" for k, v in pngs]
    return "\n".join(lines) + "\n"


def write_report(res: dict, out_dir: str | Path, log=None) -> dict:
    """report.json, report.csv, summary.md, the oracle files and plots (PNG)."""
    import csv

    from ..checkpoint import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = write_oracle(res["oracle"], out, log)
    with open(out / "report.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        cols = ["method", "budget", "big_fraction", "loss", "ppl", "flops_per_token", "flops_vs_all_big", "pattern",
                "note"]
        w.writerow(cols)
        for r in res["rows"]:
            w.writerow(["" if r.get(c) is None else r.get(c) for c in cols])
    files["csv"] = str(out / "report.csv")
    if plots.available():
        files["loss_vs_flops"] = plots.loss_vs_flops(res["rows"], out / "loss_vs_flops.png")
        if res["_diff"]:
            files["difficulty_hist"] = plots.difficulty_hist(res["_diff"], out / "difficulty_hist.png",
                                                             res["help_threshold"])
            ks = list(res["_diff"])
            mid = ks[len(ks) // 2]
            files["difficulty_vs_loss"] = plots.difficulty_vs_loss(
                res["_small_tok"], res["_diff"][mid], mid, out / "difficulty_vs_loss.png", res["help_threshold"])
    res["files"] = files
    atomic_write_text(out / "summary.md", report_markdown(res))
    files["summary"] = str(out / "summary.md")
    atomic_write_text(out / "report.json", json.dumps(public(res), indent=1))
    files["json"] = str(out / "report.json")
    return files


def run_report(checkpoint, data, budgets, out, *, random_trials: int = 100, routers=(), router_steps: int = 0,
               with_skip: bool = False, max_sequences: int = 64, batch_size: int = 8, seq_len: int | None = None,
               max_patterns: int = 4096, beam: int = 16, help_threshold: float = 0.05, seed: int = 0,
               device: str = "cpu", log=None) -> dict:
    """`dualpath duo report`: load the base model (and router checkpoints), compare, write OUT.

    routers: router checkpoint paths (from `duo train-router`). router_steps > 0 trains a quick router for
    every budget without one (on the train split of the prepared folder `data`); 0 marks them missing.
    """
    from ..checkpoint import load_model
    from ..data.loader import load_windows, make_batches, train_window_fn
    from .router import load_router, train_router

    model, _, ckpt = load_model(checkpoint, device)
    check_duo(model, "`duo report`")
    L = model.cfg.n_layers
    ks = check_budgets(budgets, L)
    x, y = load_windows(data, model, tokenizer_dir=ckpt, max_sequences=max_sequences, seq_len=seq_len)
    batches = make_batches(x, y, batch_size, device)
    loaded = []
    for p in routers or ():
        rm, target, _ = load_router(p, base_model=model, device=device)
        loaded.append((rm, target))
    if router_steps > 0:
        have = {round((t or 0) * L) for _, t in loaded}
        for k in ks:
            if k in have or k in (0, L):
                continue
            if log:
                log(f"training a router for k={k} ({router_steps} steps)")
            fn = train_window_fn(data, model, batch_size=batch_size, seq_len=seq_len, seed=seed, device=device)
            torch.manual_seed(seed)
            rm, _ = train_router(model, fn, k / L, router_steps, log=log)
            loaded.append((rm, k / L))
    res = report(model, batches, ks, random_trials=random_trials, routers=loaded, with_skip=with_skip,
                 max_patterns=max_patterns, beam=beam, help_threshold=help_threshold, seed=seed, log=log)
    res.update(checkpoint=str(ckpt), data=str(data))
    res["oracle"].update(checkpoint=str(ckpt), data=str(data))
    write_report(res, out, log)
    return public(res)

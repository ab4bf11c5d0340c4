"""The comparison: every routing policy of a Duo-LLM model at matched big-layer budgets, agreement of the
trained routers with the oracle, a variable per-token budget, and token difficulty.

Rows (loss with a bootstrap 95% interval over sequences, perplexity, realised forward FLOPs per token,
`realised_flops`, true convention), all scored on the same (validation) windows:

    all-big, all-small          the two fixed extremes (k = L and k = 0)
    random routing              every (layer, token) big with probability k/L, independently (seeded)
    best of N random patterns   N whole-sequence patterns with exactly k big layers drawn uniformly without
                                replacement (all of them if C(L, k) <= N); the best on the selection windows
    best single pattern         the best whole-sequence pattern of the oracle search on the selection windows
                                (training windows: held out; without them the scored windows, marked)
    best single pattern,        the best pattern on the scored windows themselves: an upper bound for fixed
      in-sample                 patterns (only with held-out selection)
    trained router              router checkpoints (hard routing, every kind), matched to k by their target;
                                missing unless given or router_steps > 0 trains one on the train split
    per-sequence oracle         each sequence's best pattern (uses the labels)
    per-token oracle            each token's best pattern (uses the labels: optimistic, a bound)
    variable-budget oracle      the sequence's k·T big-layer uses shared by its tokens (uses the labels)

Agreement of each router with the per-token oracle at its budget: per-token choice agreement, big/not-big
agreement, per-layer usage correlation and the loss gap. Paired differences between rows share one bootstrap
resampling of the sequences.

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
from .oracle import (OPTIMISTIC_NOTE, SEQUENCE_NOTE, VARIABLE_NOTE, check_budgets, check_duo, choice_from_index,
                     flops_per_token, losses_by_count, oracle_budget, pattern_codes, public, variable_budget_oracle,
                     variable_choice, write_oracle)
from .router import evaluate_routed, router_name

METHODS = ("all-big", "all-small", "random routing", "best of N random patterns", "best single pattern",
           "best single pattern, in-sample", "trained router", "per-sequence oracle", "per-token oracle",
           "variable-budget oracle")


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
    a = np.asarray(a)
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    first = np.r_[True, s[1:] != s[:-1]] if len(a) else np.zeros(0, dtype=bool)
    starts = np.flatnonzero(first)
    counts = np.diff(np.r_[starts, len(a)])
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = (starts + 0.5 * (counts - 1) + 1)[np.cumsum(first) - 1]
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


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) indices of sequences drawn with replacement: one resampling shared by every row, so
    differences between rows get paired intervals."""
    return np.random.default_rng([seed, n, 28]).integers(0, n, (n_boot, n))


def bootstrap_ci(seq_sums: np.ndarray, counts: np.ndarray, idx: np.ndarray, level: float = 0.95) -> tuple:
    """Percentile interval of the token-weighted mean loss over resampled sequences."""
    m = seq_sums[idx].sum(1) / np.maximum(counts[idx].sum(1), 1)
    a = (1 - level) / 2
    return float(np.quantile(m, a)), float(np.quantile(m, 1 - a))


def spearman_ci(x: np.ndarray, y: np.ndarray, valid: np.ndarray, idx: np.ndarray, level: float = 0.95) -> dict:
    """Spearman correlation of per-token values x, y (N, T) over the valid tokens, with a percentile interval
    from resampling whole sequences (idx from bootstrap_indices)."""
    r = spearman(x[valid], y[valid])
    boots = [spearman(x[i][valid[i]], y[i][valid[i]]) for i in idx]
    a = (1 - level) / 2
    return {"value": r, "ci_low": float(np.nanquantile(boots, a)), "ci_high": float(np.nanquantile(boots, 1 - a))}


def layer_preference(codes: torch.Tensor, seq_arg: torch.Tensor, idx: np.ndarray, level: float = 0.95) -> dict:
    """Do the per-sequence oracle's big layers sit late? Spearman(layer index, P(big) per layer) with a
    percentile interval over resampled sequences; > 0: later layers big more often."""
    big = (codes[seq_arg.clamp(min=0)] == BIG).double().numpy()  # (N, L)
    layers = np.arange(big.shape[1])
    r = spearman(layers, big.mean(0))
    boots = [spearman(layers, big[i].mean(0)) for i in idx]
    a = (1 - level) / 2
    return {"value": r, "ci_low": float(np.nanquantile(boots, a)), "ci_high": float(np.nanquantile(boots, 1 - a)),
            "big_by_layer": big.mean(0).tolist()}


def agreement(router_choice: torch.Tensor, oracle_choice: torch.Tensor, valid: torch.Tensor) -> dict:
    """A router's hard choices (L, N, T) against the oracle's per token: the share of equal (layer, token)
    choices, of equal big/not-big decisions, and the Pearson correlation of their per-layer big usage."""
    v = valid.unsqueeze(0).expand_as(router_choice)
    same = (router_choice == oracle_choice)[v].double().mean()
    rb, ob = router_choice == BIG, oracle_choice == BIG
    big_same = (rb == ob)[v].double().mean()
    n = valid.sum().clamp(min=1).double()
    ru = ((rb & v).sum((1, 2)) / n).numpy()
    ou = ((ob & v).sum((1, 2)) / n).numpy()
    return {"choice_agreement": float(same), "big_agreement": float(big_same), "usage_correlation": pearson(ru, ou),
            "router_big_by_layer": ru.tolist(), "oracle_big_by_layer": ou.tolist()}


def skip_semantics(model, with_skip: bool) -> str:
    what = ("a skipped layer is bypassed whole (attention and FFN)" if model.cfg.skip_whole_layer else
            "a skip bypasses the FFN only: attention still runs on every token (model.skip_whole_layer false)")
    return f"{what}; the oracles' non-big layers are {'small or skip' if with_skip else 'small only'}."


def _seq(tok: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
    return (tok.double() * valid).sum(1).numpy()


def report(model, batches, budgets, *, random_trials: int = 100, routers=(), with_skip: bool = False,
           max_patterns: int = 4096, beam: int = 16, help_threshold: float = 0.05, seed: int = 0,
           select_batches=None, variable_budget: bool = True, n_boot: int = 1000, log=None) -> dict:
    """The comparison table, agreement with the oracle, the variable-budget oracle and token difficulty
    (see the module docstring).

    routers: [(router_model, target_fraction[, name]), ...] (router-policy models over the same base weights).
    select_batches: windows (of the training data) on which best-of-N and the best single pattern are chosen;
    they are scored on `batches`. None: chosen on `batches` themselves (marked in-sample).
    Returns {"rows": [...], "agreement": [...], "comparisons": [...], "difficulty": {k: stats},
    "variable_budget": {k: ...}, "oracle": ...}; "_" keys hold tensors and arrays.
    """
    check_duo(model, "the Duo report")
    L = model.cfg.n_layers
    ks = check_budgets(budgets, L)
    if random_trials < 1:
        raise ConfigError(f"--random-trials must be >= 1, got {random_trials}")
    if n_boot < 10:
        raise ConfigError(f"--bootstrap must be >= 10 resamplings, got {n_boot}")
    batches = list(batches)
    select_batches = list(select_batches) if select_batches is not None else None
    T = batches[0][0].shape[1]
    valid = torch.cat([y != -1 for _, y in batches]).cpu()
    n_tok = int(valid.sum())
    counts_np = valid.sum(1).numpy().astype(np.float64)
    held_out = select_batches is not None
    chosen_on = "training windows (held out)" if held_out else "the scored data (in-sample, optimistic)"

    def mean(tok):
        return float(tok[valid].double().sum() / n_tok)

    rows = []

    def row(method, k, frac, loss, flops, tok=None, seq=None, **extra):
        r = {"method": method, "budget": k, "big_fraction": frac, "loss": loss, "ppl": _ppl(loss),
             "flops_per_token": flops, **extra}
        if seq is None and tok is not None:
            seq = _seq(tok, valid)
        r["_seq"] = seq
        rows.append(r)
        return r

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
    # the oracles on the scored data; at every budget 0..L for the variable-budget oracle
    entries = {}
    for j in (range(L + 1) if variable_budget else ks):
        ev = PatternEvaluator(sm, batches)
        if j in ks:
            ev.evaluate(random_patterns(L, j, random_trials, seed))  # so the oracles include best-of-N
        entries[j] = oracle_budget(model, batches, j, with_skip=with_skip, max_patterns=max_patterns, beam=beam,
                                   evaluator=ev, log=log)
        if j in ks:
            oracle_res["budgets"][j] = entries[j]
    by_count = losses_by_count(entries, L) if variable_budget else None

    routed = []
    for item in routers:
        rm, target = item[0], item[1]
        name = item[2] if len(item) > 2 else router_name(rm.cfg, None)
        rv = evaluate_routed(rm, batches, keep_token_losses=True)
        frac = target if target is not None else rv["big_fraction"]
        routed.append((min(range(L + 1), key=lambda k: abs(k / L - frac)), target, name, rv))

    difficulty, diff_arrays, variable, agreements, within = {}, {}, {}, [], {}
    for k in ks:
        e = entries[k]
        r = e["_result"]
        gen = torch.Generator().manual_seed(seed * 1000 + k)

        def rand_fn(B, T_, gen=gen, p=k / L):
            return torch.where(torch.rand((L, B, T_), generator=gen) < p, BIG, SMALL)

        rnd_tok, rnd_flops = _routed_losses(model, batches, rand_fn)
        if k == L:
            row("all-big", k, 1.0, mean(big_tok), big_flops, big_tok)
        if k == 0:
            row("all-small", k, 0.0, mean(small_tok), small_flops, small_tok)
        row("random routing", k, k / L, mean(rnd_tok), rnd_flops, rnd_tok, note="p_big = k/L per layer and token")
        # fixed patterns, chosen on the selection windows, scored here
        pats = random_patterns(L, k, random_trials, seed)
        if held_out:
            sel = PatternEvaluator(sm, select_batches)
            sel_losses = sel.evaluate(pats)
            best_n = pats[min(range(len(pats)), key=lambda i: (sel_losses[i], i))]
            se = oracle_budget(model, select_batches, k, with_skip=with_skip, max_patterns=max_patterns, beam=beam,
                               evaluator=sel, log=log)
            best = se["_result"]["best_pattern"]
        else:
            losses = [e["_result"]["pattern_loss"][r["patterns"].index(p)] for p in pats]
            best_n = pats[min(range(len(pats)), key=lambda i: (losses[i], i))]
            best = r["best_pattern"]
        ev_val, pat_tok = r["_evaluator"], {}
        for method, pat, extra in (("best of N random patterns", best_n, {"n_patterns": len(pats)}),
                                   ("best single pattern", best, {"search": e["method"]})):
            tok = pat_tok[method] = ev_val.token_losses(pat)
            code = pattern_codes([pat])[0].view(L, 1, 1)
            row(method, k, k / L, mean(tok), flops_per_token(model, code, T), tok,
                pattern="".join(sm.letters[c] for c in pat), chosen_on=chosen_on,
                note=f"chosen on {chosen_on}", **extra)
        if held_out:
            row("best single pattern, in-sample", k, k / L, e["best_single"]["loss"],
                e["best_single"]["flops_per_token"], ev_val.token_losses(r["best_pattern"]),
                pattern=e["best_pattern"], note="chosen on the scored data: an upper bound for fixed patterns")
        tok_choice = choice_from_index(e["_codes"], r["tok_arg"])
        k_routers = [x for x in routed if x[0] == k]
        for _, target, name, rv in k_routers:
            rr = row("trained router", k, rv["big_fraction"], rv["loss"], rv["flops_per_token"], rv["_token_losses"],
                     router=name, target=target, skip_fraction=rv["skip_fraction"],
                     note=f"{name}: achieved big fraction {rv['big_fraction']:.3f} vs target "
                          f"{target if target is not None else float('nan'):.3f}; trained on training windows")
            ag = agreement(rv["_choices"], tok_choice, valid)
            ag.update(router=name, budget=k, loss=rv["loss"], oracle_loss=r["per_token_oracle"],
                      loss_gap=rv["loss"] - r["per_token_oracle"], big_fraction=rv["big_fraction"])
            ag["_seq"] = rr["_seq"] - _seq(r["tok_best"], valid)
            agreements.append(ag)
        if not k_routers and 0 < k < L:
            row("trained router", k, None, None, None, note="missing (no router checkpoint for this budget)")
        row("per-sequence oracle", k, k / L, r["per_sequence_oracle"], e["per_sequence_oracle"]["flops_per_token"],
            seq=r["seq_best_sum"].numpy(), note="upper bound: each sequence's pattern chosen with its labels")
        row("per-token oracle", k, k / L, r["per_token_oracle"], e["per_token_oracle"]["flops_per_token"],
            r["tok_best"], note="upper bound, optimistic: each token's pattern chosen with its label")
        if variable_budget:
            vb = variable_budget_oracle(by_count, valid, k)
            vchoice = variable_choice(entries, vb["counts"])
            used = float(vb["counts"][valid].double().mean()) / L  # at most k/L: more is not always better
            row("variable-budget oracle", k, used, vb["loss"], flops_per_token(model, vchoice, T),
                vb["tok_loss"].float(), note="upper bound, optimistic: the sequence's k·T big-layer uses shared by "
                "its tokens (at most; it uses what lowers the loss), chosen with the labels")
            c = vb["counts"].double()
            v = valid.double()
            variable[k] = {"by_position": ((c * v).sum(0) / v.sum(0).clamp(min=1)).tolist(),
                           "by_small_loss_decile": _by_decile(small_tok[valid].numpy(), c[valid].numpy()),
                           "by_big_loss_decile": _by_decile(big_tok[valid].numpy(), c[valid].numpy()),
                           "spearman_vs_small_loss": spearman(c[valid].numpy(), small_tok[valid].numpy()),
                           "spearman_vs_big_loss": spearman(c[valid].numpy(), big_tok[valid].numpy()),
                           "spearman_vs_position": spearman(c[valid].numpy(),
                                                            torch.arange(T).expand_as(c)[valid].numpy()),
                           "_counts": c.numpy(),
                           "share_zero": float((c[valid] == 0).double().mean()),
                           "share_all": float((c[valid] == L).double().mean()),
                           "max_over_budget": vb["max_over_budget"]}
        # per-sequence choice held out within the sequence: chosen on the first positions, scored on the rest
        sp = r["prefix_split"]
        v_suf = valid[:, sp:]
        best_tok = [x for x in rows if x["method"] == "best single pattern" and x["budget"] == k][0]
        within[k] = {"split": sp, "n_tokens": int(v_suf.sum()), "_counts": v_suf.sum(1).numpy().astype(np.float64),
                     "_seq": {"random routing": _seq(rnd_tok[:, sp:], v_suf),
                              "best single pattern": _seq(pat_tok["best single pattern"][:, sp:], v_suf),
                              "per-sequence choice from the prefix": r["prefix_choice_suffix_sum"].numpy(),
                              "per-sequence oracle": r["suffix_oracle_sum"].numpy(),
                              "per-token oracle": _seq(r["tok_best"][:, sp:], v_suf)},
                     "best_single_chosen_on": best_tok["chosen_on"]}
        s_, o, b = small_tok[valid].numpy(), r["tok_best"][valid].numpy(), big_tok[valid].numpy()
        difficulty[k] = difficulty_stats(s_, o, b, help_threshold)
        diff_arrays[k] = s_ - o
    if L not in ks:
        row("all-big", L, 1.0, mean(big_tok), big_flops, big_tok)
    if 0 not in ks:
        row("all-small", 0, 0.0, mean(small_tok), small_flops, small_tok)
    for k, target, name, rv in routed:
        if k not in ks:
            row("trained router", k, rv["big_fraction"], rv["loss"], rv["flops_per_token"], rv["_token_losses"],
                router=name, target=target, note=f"{name}: budget not among --budgets")
    order = {m: i for i, m in enumerate(METHODS)}
    rows.sort(key=lambda r: (r["budget"], order.get(r["method"], 99)))
    idx = bootstrap_indices(int(valid.shape[0]), n_boot, seed)
    for r in rows:
        r["flops_vs_all_big"] = r["flops_per_token"] / big_flops if r["flops_per_token"] is not None else None
        r["ci_low"], r["ci_high"] = bootstrap_ci(r["_seq"], counts_np, idx) if r["_seq"] is not None else (None, None)
    for a in agreements:
        a["gap_ci_low"], a["gap_ci_high"] = bootstrap_ci(a["_seq"], counts_np, idx)
    v_np = valid.numpy()
    pos = np.broadcast_to(np.arange(T), v_np.shape)
    for k, v in variable.items():  # intervals of the correlations, over the same resampled sequences
        c = v.pop("_counts")
        v["ci"] = {"position": spearman_ci(c, pos, v_np, idx),
                   "small_loss": spearman_ci(c, small_tok.numpy(), v_np, idx),
                   "big_loss": spearman_ci(c, big_tok.numpy(), v_np, idx)}
    for k, w in within.items():
        w["rows"] = [{"method": m, "loss": float(x.sum() / max(w["n_tokens"], 1)),
                      **dict(zip(("ci_low", "ci_high"), bootstrap_ci(x, w["_counts"], idx)))}
                     for m, x in w["_seq"].items()]
        w["comparisons"] = []
        for a_m, b_m in WITHIN_COMPARISONS:
            d = w["_seq"][a_m] - w["_seq"][b_m]
            lo, hi = bootstrap_ci(d, w["_counts"], idx)
            w["comparisons"].append({"a": a_m, "b": b_m, "delta": float(d.sum() / max(w["n_tokens"], 1)),
                                     "ci_low": lo, "ci_high": hi})
        del w["_seq"], w["_counts"]
    late = {k: layer_preference(entries[k]["_codes"], entries[k]["_result"]["seq_arg"], idx) for k in ks if 0 < k < L}
    return {"rows": rows, "agreement": agreements, "comparisons": comparisons(rows, counts_np, idx),
            "difficulty": difficulty, "variable_budget": variable, "within_sequence": within,
            "layer_preference": late, "oracle": oracle_res,
            "n_layers": L,
            "n_sequences": int(valid.shape[0]), "n_tokens": n_tok, "seq_len": T, "random_trials": random_trials,
            "help_threshold": help_threshold, "with_skip": with_skip, "held_out": held_out,
            "n_select_sequences": sum(x.shape[0] for x, _ in select_batches) if held_out else 0,
            "skip_semantics": skip_semantics(model, with_skip), "n_boot": n_boot, "note": OPTIMISTIC_NOTE,
            "variable_note": VARIABLE_NOTE if variable_budget else None,
            "_small_tok": small_tok[valid].numpy(), "_big_tok": big_tok[valid].numpy(), "_diff": diff_arrays}


def _by_decile(key: np.ndarray, value: np.ndarray, n: int = 10) -> list[float]:
    """Mean of value within each n-tile of key (lowest first)."""
    edges = np.quantile(key, np.linspace(0, 1, n + 1))
    which = np.clip(np.searchsorted(edges, key, side="right") - 1, 0, n - 1)
    return [float(value[which == i].mean()) if (which == i).any() else float("nan") for i in range(n)]


# (a, b): a − b at the same budget (b = all-big: against all-big), with a paired bootstrap interval
COMPARISONS = (("per-token oracle", "random routing"), ("per-sequence oracle", "random routing"),
               ("best single pattern", "random routing"), ("per-sequence oracle", "best single pattern"),
               ("variable-budget oracle", "per-token oracle"), ("per-token oracle", "all-big"),
               ("trained router", "best single pattern"), ("trained router", "best of N random patterns"),
               ("trained router", "random routing"), ("best of N random patterns", "best single pattern"))


# the within-sequence held-out comparison (all scored on the second part of every sequence)
WITHIN_COMPARISONS = (("per-sequence choice from the prefix", "best single pattern"),
                      ("per-sequence oracle", "per-sequence choice from the prefix"),
                      ("per-sequence choice from the prefix", "random routing"))


def comparisons(rows: list[dict], counts: np.ndarray, idx: np.ndarray) -> list[dict]:
    out = []
    for a_m, b_m in COMPARISONS:
        for a in rows:
            if a["method"] != a_m or a["_seq"] is None:
                continue
            for b in rows:
                if b["method"] == b_m and (b_m == "all-big" or b["budget"] == a["budget"]) and b["_seq"] is not None:
                    lo, hi = bootstrap_ci(a["_seq"] - b["_seq"], counts, idx)
                    out.append({"a": a_m + (f" {a['router']}" if a.get("router") else ""), "b": b_m,
                                "budget": a["budget"], "delta": a["loss"] - b["loss"], "ci_low": lo, "ci_high": hi})
    return out


def report_markdown(res: dict, title: str = "Duo-LLM routing report") -> str:
    def f(v, fmt):
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    def ci(r):
        return f"[{f(r.get('ci_low'), '.4f')}, {f(r.get('ci_high'), '.4f')}]" if r.get("ci_low") is not None else ""

    lines = [f"# {title}", ""]
    if res.get("checkpoint"):
        lines += [f"Checkpoint `{res['checkpoint']}`, data `{res.get('data')}`.", ""]
    sel = (f"fixed patterns chosen on {res['n_select_sequences']} training windows, scored here"
           if res.get("held_out") else "fixed patterns chosen on the scored data itself (in-sample, optimistic)")
    lines += [f"{res['n_sequences']} sequences of {res['seq_len']} tokens ({res['n_tokens']} target tokens), "
              f"{res['n_layers']} layers; best of N uses N = {res['random_trials']}; {sel}; 95% intervals: "
              f"bootstrap over sequences ({res['n_boot']} resamplings).", "",
              f"**Skip semantics.** {res['skip_semantics']}", "",
              "| method | k big | big fraction | loss | 95% CI | ppl | FLOPs/token | vs all-big | notes |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        notes = "; ".join(str(r[x]) for x in ("pattern", "note") if r.get(x))
        lines.append(f"| {r['method']} | {r['budget']} | {f(r['big_fraction'], '.3f')} | {f(r['loss'], '.4f')} | "
                     f"{ci(r)} | {f(r['ppl'], '.2f')} | {f(r['flops_per_token'], '.4g')} | "
                     f"{f(r['flops_vs_all_big'], '.3f')} | {notes} |")
    lines += ["", f"**Optimism.** {OPTIMISTIC_NOTE} {SEQUENCE_NOTE}" + (f" {res['variable_note']}"
                                                                      if res.get("variable_note") else ""), ""]
    if res.get("agreement"):
        lines += ["## Agreement with the per-token oracle", "",
                  "Per router, against the per-token oracle at its budget on the scored data: the share of (layer, "
                  "token) choices equal to the oracle's, of equal big/not-big decisions, the Pearson correlation of "
                  "per-layer big usage, and the loss gap (router − oracle) with its interval.", "",
                  "| router | k | big fraction | choice agreement | big agreement | usage correlation | loss gap | 95% CI |",
                  "|---|---|---|---|---|---|---|---|"]
        for a in res["agreement"]:
            lines.append(f"| {a['router']} | {a['budget']} | {a['big_fraction']:.3f} | {a['choice_agreement']:.3f} | "
                         f"{a['big_agreement']:.3f} | {f(a['usage_correlation'], '.3f')} | {a['loss_gap']:.4f} | "
                         f"[{a['gap_ci_low']:.4f}, {a['gap_ci_high']:.4f}] |")
        lines.append("")
    if res.get("comparisons"):
        lines += ["## Paired differences", "", "a − b in loss at the same budget, paired bootstrap over sequences.", "",
                  "| k | a | b | a − b | 95% CI |", "|---|---|---|---|---|"]
        for c in res["comparisons"]:
            lines.append(f"| {c['budget']} | {c['a']} | {c['b']} | {c['delta']:+.4f} | "
                         f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] |")
        lines.append("")
    if res.get("within_sequence"):
        lines += ["## Per-sequence choice, held out within the sequence", "",
                  "A per-sequence choice cannot be selected on other windows, so here each sequence picks the pattern "
                  "with the lowest loss on its first positions and is scored on the rest; every row of this table is "
                  "scored on those same later positions (the best single pattern as chosen above). The per-sequence "
                  "and per-token oracles use the scored tokens' labels.", "",
                  "| k | scored positions | method | loss | 95% CI |", "|---|---|---|---|---|"]
        for k, w in res["within_sequence"].items():
            for r in w["rows"]:
                lines.append(f"| {k} | {w['split']}.. ({w['n_tokens']} tokens) | {r['method']} | {r['loss']:.4f} | "
                             f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}] |")
        lines += ["", "| k | a | b | a − b | 95% CI |", "|---|---|---|---|---|"]
        for k, w in res["within_sequence"].items():
            for c in w["comparisons"]:
                lines.append(f"| {k} | {c['a']} | {c['b']} | {c['delta']:+.4f} | "
                             f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] |")
        lines.append("")
    if res.get("variable_budget"):
        lines += ["## Variable per-token budget", "",
                  "Big layers per token under the variable-budget oracle: Spearman correlation with token position "
                  "and with the token's loss under all-small / all-big, mean big layers in the lowest and highest "
                  "loss(all-small) decile, share of tokens with no big layer and with all.", "",
                  "| k | vs position | vs all-small loss | vs all-big loss | easiest decile | hardest decile | "
                  "none | all | max over budget (≤ 0) |", "|---|---|---|---|---|---|---|---|---|"]
        for k, v in res["variable_budget"].items():
            d = v["by_small_loss_decile"]
            ci_ = v.get("ci", {})

            def sp(key, name):
                c = ci_.get(key)
                return f(v[name], '.3f') + (f" [{c['ci_low']:.3f}, {c['ci_high']:.3f}]" if c else "")

            lines.append(f"| {k} | {sp('position', 'spearman_vs_position')} | {sp('small_loss', 'spearman_vs_small_loss')} | "
                         f"{sp('big_loss', 'spearman_vs_big_loss')} | {f(d[0], '.2f')} | {f(d[-1], '.2f')} | "
                         f"{v['share_zero']:.1%} | {v['share_all']:.1%} | {v['max_over_budget']} |")
        lines.append("")
    if res.get("layer_preference"):
        lines += ["## Where the big layers go", "", "Spearman correlation of layer index and P(big) per layer under the "
                  "per-sequence oracle (> 0: later layers big more often), with its interval over sequences.", "",
                  "| k | Spearman | 95% CI | P(big) by layer |", "|---|---|---|---|"]
        for k, v in res["layer_preference"].items():
            lines.append(f"| {k} | {f(v['value'], '.3f')} | [{f(v['ci_low'], '.3f')}, {f(v['ci_high'], '.3f')}] | "
                         + " ".join(f"{u:.2f}" for u in v["big_by_layer"]) + " |")
        lines.append("")
    lines += ["## Token difficulty", "",
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

    from ..fileio import atomic_open, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = write_oracle(res["oracle"], out, log)
    with atomic_open(out / "report.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        cols = ["method", "budget", "big_fraction", "loss", "ci_low", "ci_high", "ppl", "flops_per_token",
                "flops_vs_all_big", "router", "pattern", "note"]
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
        if res.get("variable_budget"):
            files["variable_by_position"] = plots.variable_budget_by_position(
                res["variable_budget"], out / "variable_budget_by_position.png")
            files["variable_by_difficulty"] = plots.variable_budget_by_difficulty(
                res["variable_budget"], out / "variable_budget_by_difficulty.png")
    elif log:
        log("matplotlib is not installed: plots skipped (pip install matplotlib)")
    res["files"] = files
    atomic_write_text(out / "summary.md", report_markdown(res))
    files["summary"] = str(out / "summary.md")
    atomic_write_text(out / "report.json", json.dumps(public(res), indent=1))
    files["json"] = str(out / "report.json")
    return files


def run_report(checkpoint, data, budgets, out, *, random_trials: int = 100, routers=(), router_steps: int = 0,
               with_skip: bool = False, max_sequences: int = 64, select_sequences: int = 64, batch_size: int = 8,
               seq_len: int | None = None, max_patterns: int = 4096, beam: int = 16, help_threshold: float = 0.05,
               variable_budget: bool = True, n_boot: int = 1000, seed: int = 0, device: str = "cpu",
               log=None) -> dict:
    """`dualpath duo report`: load the base model (and router checkpoints), compare, write OUT.

    Scored on the val windows of `data`; with a prepared folder, fixed patterns are chosen on the first
    select_sequences windows of its train split (0, or a text file: chosen on the scored windows, marked).
    routers: router checkpoint paths (from `duo train-router`). router_steps > 0 trains a quick budget router
    for every budget without one (on the train split); 0 marks them missing.
    """
    from ..checkpoint import load_model
    from ..data.loader import load_windows, make_batches, train_window_fn
    from .router import load_router, train_router

    if select_sequences < 0:
        raise ConfigError(f"--select-sequences must be >= 0, got {select_sequences}")
    if n_boot < 10:
        raise ConfigError(f"--bootstrap must be >= 10 resamplings, got {n_boot}")
    model, _, ckpt = load_model(checkpoint, device)
    check_duo(model, "`duo report`")
    L = model.cfg.n_layers
    ks = check_budgets(budgets, L)
    x, y = load_windows(data, model, tokenizer_dir=ckpt, max_sequences=max_sequences, seq_len=seq_len)
    batches = make_batches(x, y, batch_size, device)
    select = None
    if select_sequences and Path(data).is_dir():
        sx, sy = load_windows(data, model, split="train", max_sequences=select_sequences, seq_len=seq_len)
        select = make_batches(sx, sy, batch_size, device)
    loaded = []
    for p in routers or ():
        rm, info, _ = load_router(p, base_model=model, device=device)
        loaded.append((rm, info.get("router_target"), router_name(rm.cfg, info.get("router_kind"))))
    if router_steps > 0:
        have = {round((t or 0) * L) for _, t, _ in loaded}
        for k in ks:
            if k in have or k in (0, L):
                continue
            if log:
                log(f"training a router for k={k} ({router_steps} steps)")
            fn = train_window_fn(data, model, batch_size=batch_size, seq_len=seq_len, seed=seed, device=device)
            torch.manual_seed(seed)
            rm, _ = train_router(model, fn, k / L, router_steps, log=log)
            loaded.append((rm, k / L, router_name(rm.cfg, "budget")))
    res = report(model, batches, ks, random_trials=random_trials, routers=loaded, with_skip=with_skip,
                 max_patterns=max_patterns, beam=beam, help_threshold=help_threshold, seed=seed,
                 select_batches=select, variable_budget=variable_budget, n_boot=n_boot, log=log)
    res.update(checkpoint=str(ckpt), data=str(data))
    res["oracle"].update(checkpoint=str(ckpt), data=str(data))
    write_report(res, out, log)
    return public(res)

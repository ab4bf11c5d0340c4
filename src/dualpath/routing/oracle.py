"""Stage 2: routing oracles of a Duo-LLM model at fixed big-layer budgets, and the same search on the gates
of a Dual-Path model. The search itself is `dualpath.search`; this module adds budgets, FLOPs, layer
usage, output files and plots."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..model import BIG, NAMES, SKIP, Overrides, realised_flops
from ..errors import CheckpointError, ConfigError
from .adapters import DualSearchModel, DuoSearchModel
from .search import PatternEvaluator, SearchSpace, pattern_to_string, search
from . import plots

OPTIMISTIC_NOTE = ("The per-token oracle picks, for every token, the pattern with the lowest loss on that "
                   "token's own label: it is optimistic (it uses the label) and no router can reach it; "
                   "it bounds what per-token routing among whole-sequence patterns could gain.")
SEQUENCE_NOTE = ("The per-sequence oracle and the best single pattern are also chosen on the evaluated data "
                 "(using the labels), so they are optimistic too, less so.")


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def check_duo(model, what: str = "this command") -> None:
    if model.cfg.arch != "duo":
        raise CheckpointError(f"{what} needs a Duo-LLM checkpoint (model.arch=duo), this one is "
                              f"{model.cfg.arch}")


def check_budgets(budgets, n_layers: int) -> list[int]:
    """Big-layer budgets k: integers in 0..n_layers, deduplicated and sorted."""
    out = []
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, int):
            try:
                f = float(b)
            except (TypeError, ValueError):
                raise ConfigError(f"budget '{b}' is not an integer number of big layers") from None
            if not f.is_integer():
                raise ConfigError(f"budget '{b}' is not an integer number of big layers")
            b = int(f)
        if b < 0:
            raise ConfigError(f"budget {b} is negative")
        if b > n_layers:
            raise ConfigError(f"budget {b} is more than the model's {n_layers} layers")
        out.append(b)
    if not out:
        raise ConfigError("no budgets given (e.g. --budgets 1,2,4)")
    return sorted(set(out))


def duo_space(n_layers: int, k: int, with_skip: bool) -> SearchSpace:
    return SearchSpace(n_layers, ("big", "small", "skip") if with_skip else ("big", "small"), budget_choice="big",
                       budget=k, default="small")


def pattern_codes(patterns) -> torch.Tensor:
    """(P, L) long tensor of 0=big, 1=small, 2=skip."""
    return torch.tensor([[NAMES.index(c) for c in p] for p in patterns], dtype=torch.long)


def choice_from_index(codes: torch.Tensor, arg: torch.Tensor) -> torch.Tensor:
    """Routing tensor (L, N, T) from per-token pattern indices arg (N, T) (or per-sequence (N,) -> T = 1)."""
    arg = arg.clamp(min=0)
    c = codes[arg]  # (N, T, L) or (N, L)
    if c.dim() == 2:
        c = c.unsqueeze(1)
    return c.permute(2, 0, 1).contiguous()


def flops_per_token(model, choice: torch.Tensor, seq_len: int, with_router: bool = False) -> float:
    return realised_flops(model, choice, seq_len, "true", with_router=with_router) / max(choice[0].numel(), 1)


def _usage(codes: torch.Tensor, r: dict, code: int) -> dict:
    mask = (codes == code).float()  # (P, L)
    valid = r["valid"]
    by_seq = mask[r["seq_arg"].clamp(min=0)].mean(0)
    tok = mask[r["tok_arg"].clamp(min=0)]  # (N, T, L)
    v = valid.unsqueeze(-1).float()
    by_tok = (tok * v).sum((0, 1)) / v.sum().clamp(min=1)
    by_pos = ((tok * v).sum(0) / v.sum(0).clamp(min=1)).T  # (L, T)
    return {"by_layer_sequence": by_seq.tolist(), "by_layer_token": by_tok.tolist(), "by_position": by_pos.tolist()}


def oracle_budget(model, batches, k: int, *, with_skip: bool = False, max_patterns: int = 4096, beam: int = 16,
                  share_prefix: bool = True, seed_patterns=(), evaluator: PatternEvaluator | None = None,
                  log=None) -> dict:
    """The oracles at one budget of k big layers. seed_patterns are evaluated first and join the oracles."""
    sm = DuoSearchModel(model)
    L = sm.n_layers
    space = duo_space(L, k, with_skip)
    ev = evaluator or PatternEvaluator(sm, batches, share_prefix=share_prefix)
    if seed_patterns:
        ev.evaluate(seed_patterns)
    t0 = time.perf_counter()
    r = search(sm, batches, space, max_patterns=max_patterns, beam=beam, evaluator=ev, log=log)
    seconds = time.perf_counter() - t0
    T = r["valid"].shape[1]
    codes = pattern_codes(r["patterns"])
    best = r["best_index"]
    n_seq_wins = torch.bincount(r["seq_arg"].clamp(min=0), minlength=len(codes))
    n_tok_wins = torch.bincount(r["tok_arg"][r["valid"]].clamp(min=0), minlength=len(codes))
    order = sorted(range(len(codes)), key=lambda i: (r["pattern_loss"][i], i))
    entry = {
        "budget": k,
        "big_fraction": k / L,
        "method": r["method"],
        "space_size": r["space_size"],
        "n_evaluated": r["n_evaluated"],
        "beam": r["beam"],
        "seconds": seconds,
        "layer_calls": r["layer_calls"],
        "best_pattern": r["best_pattern_string"],
        "best_big_layers": [i for i, c in enumerate(codes[best].tolist()) if c == BIG],
        "best_single": {"loss": r["best_loss"], "ppl": _ppl(r["best_loss"]),
                        "flops_per_token": flops_per_token(model, codes[best].view(L, 1, 1), T)},
        "per_sequence_oracle": {"loss": r["per_sequence_oracle"], "ppl": _ppl(r["per_sequence_oracle"]),
                                "flops_per_token": flops_per_token(model, choice_from_index(codes, r["seq_arg"]), T)},
        "per_token_oracle": {"loss": r["per_token_oracle"], "ppl": _ppl(r["per_token_oracle"]),
                             "flops_per_token": flops_per_token(model, choice_from_index(codes, r["tok_arg"]), T),
                             "optimistic": True, "note": OPTIMISTIC_NOTE},
        "patterns": [{"pattern": r["pattern_strings"][i], "loss": r["pattern_loss"][i],
                      "big_layers": [j for j, c in enumerate(codes[i].tolist()) if c == BIG],
                      "sequence_wins": int(n_seq_wins[i]), "token_wins": int(n_tok_wins[i])} for i in order],
        "usage": {"big": _usage(codes, r, BIG)},
        "_result": r,
        "_codes": codes,
    }
    if with_skip:
        entry["usage"]["skip"] = _usage(codes, r, SKIP)
    if log:
        log(f"k={k}: {r['method']} over {r['n_evaluated']}/{r['space_size']} patterns in {seconds:.1f}s; best "
            f"{entry['best_pattern']} {r['best_loss']:.4f}, per-sequence {r['per_sequence_oracle']:.4f}, "
            f"per-token {r['per_token_oracle']:.4f} (optimistic)")
    return entry


def oracle(model, batches, budgets, with_skip: bool = False, max_patterns: int = 4096, beam: int = 16,
           share_prefix: bool = True, log=None) -> dict:
    """Oracles of a Duo model at each budget of k big layers (the others small, or small/skip with_skip).

    batches: [(inputs (B, T), targets (B, T)), ...] (targets -1 are ignored). Returns {"budgets": {k: entry}}
    where each entry has best_single / per_sequence_oracle / per_token_oracle (loss, ppl, flops_per_token),
    the evaluated patterns with their losses, and layer usage. Keys starting with "_" hold tensors.
    """
    check_duo(model, "the Duo oracle")
    L = model.cfg.n_layers
    ks = check_budgets(budgets, L)
    if max_patterns < 1:
        raise ConfigError(f"--max-patterns must be >= 1, got {max_patterns}")
    batches = list(batches)
    out = {"n_layers": L, "with_skip": with_skip, "skip_whole_layer": model.cfg.skip_whole_layer,
           "max_patterns": max_patterns, "beam": beam, "note": OPTIMISTIC_NOTE, "sequence_note": SEQUENCE_NOTE,
           "budgets": {}}
    for k in ks:
        out["budgets"][k] = oracle_budget(model, batches, k, with_skip=with_skip, max_patterns=max_patterns,
                                          beam=beam, share_prefix=share_prefix, log=log)
    first = next(iter(out["budgets"].values()))["_result"]
    out.update(n_sequences=first["n_sequences"], n_tokens=first["n_tokens"], seq_len=int(first["valid"].shape[1]))
    return out


# ----------------------------------------------------------------------------------------------
# A sequence-level budget shared by its tokens

VARIABLE_NOTE = ("The variable-budget oracle gives each sequence k big-layer uses per token on average, shared by "
                 "its tokens: a token may take any number of big layers (its best pattern with that many, chosen "
                 "with its label), so it is optimistic like the per-token oracle, and at least as good.")


def losses_by_count(entries: dict, n_layers: int) -> torch.Tensor:
    """(L + 1, N, T) per-token best loss with exactly j big layers, from oracle entries at every budget j."""
    missing = [j for j in range(n_layers + 1) if j not in entries]
    if missing:
        raise ConfigError(f"the variable-budget oracle needs the oracle at every budget 0..{n_layers} "
                          f"(missing {missing})")
    return torch.stack([entries[j]["_result"]["tok_best"].double() for j in range(n_layers + 1)])


def allocate_sequence(g: torch.Tensor, budget: int) -> torch.Tensor:
    """Big-layer counts (T,) for the tokens of one sequence minimising their summed loss with at most `budget`
    big-layer uses in all; g (L + 1, T) is each token's best loss per count (inf where none was evaluated).
    Exact: dynamic programming over tokens and budget spent (a multiple-choice knapsack)."""
    G = g.double().numpy()
    J, T = G.shape
    if budget < 0:
        raise ConfigError(f"a budget of {budget} big-layer uses is negative")
    cost = np.zeros(budget + 1)  # best summed loss of the tokens so far with at most b uses
    arg = np.zeros((T, budget + 1), dtype=np.int64)
    for t in range(T):
        cand = np.full((J, budget + 1), np.inf)
        for j in range(min(J, budget + 1)):
            cand[j, j:] = cost[:budget + 1 - j] + G[j, t]
        arg[t] = cand.argmin(0)
        cost = cand[arg[t], np.arange(budget + 1)]
    if not np.isfinite(cost[budget]):
        raise ConfigError(f"no allocation of {budget} big-layer uses covers every token")
    counts, b = np.zeros(T, dtype=np.int64), budget
    for t in range(T - 1, -1, -1):
        counts[t] = arg[t, b]
        b -= counts[t]
    return torch.from_numpy(counts)


def variable_budget_oracle(by_count: torch.Tensor, valid: torch.Tensor, k: int, uniform: bool = False) -> dict:
    """Per-token oracle under a sequence-level budget: each sequence may spend k · (its target tokens)
    big-layer uses, shared by its tokens. by_count: (L + 1, N, T) best loss per token with exactly j big layers
    (`losses_by_count`). uniform=True forces every token to k (the fixed-budget per-token oracle); the
    allocation is exact, so it is never worse than that."""
    J, N, T = by_count.shape
    if not 0 <= k < J:
        raise ConfigError(f"budget {k} is outside 0..{J - 1}")
    counts = torch.zeros(N, T, dtype=torch.long)
    tok = torch.zeros(N, T, dtype=torch.float64)
    used = []
    for n in range(N):
        v = valid[n]
        g = by_count[:, n][:, v]
        budget = k * int(v.sum())
        uni = torch.full((g.shape[1],), k, dtype=torch.long)
        c = uni if uniform else allocate_sequence(g, budget)
        counts[n, v] = c
        tok[n, v] = g.gather(0, c.view(1, -1)).squeeze(0)
        used.append((int(c.sum()), budget))
    n_tok = int(valid.sum())
    loss = float(tok[valid].sum() / max(n_tok, 1))
    return {"loss": loss, "counts": counts, "tok_loss": tok, "uses": used,
            "max_over_budget": max((u - b for u, b in used), default=0)}


def variable_choice(entries: dict, counts: torch.Tensor) -> torch.Tensor:
    """The routing (L, N, T) of a variable-budget allocation: each token's best pattern with its count of big
    layers (from the oracle entry at that budget)."""
    L = entries[0]["_codes"].shape[1]
    out = torch.zeros((L,) + tuple(counts.shape), dtype=torch.long)
    for j in range(L + 1):
        sel = counts == j
        if sel.any():
            c = choice_from_index(entries[j]["_codes"], entries[j]["_result"]["tok_arg"])  # (L, N, T)
            out[:, sel] = c[:, sel]
    return out


def public(obj):
    """A JSON-ready copy without the private ('_'-prefixed) keys."""
    if isinstance(obj, dict):
        return {str(k): public(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [public(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    return obj


def oracle_markdown(res: dict) -> str:
    lines = [f"Duo oracles over {res.get('n_sequences', '?')} sequences ({res.get('n_tokens', '?')} tokens), "
             f"{res['n_layers']} layers, non-big layers {'small or skip' if res['with_skip'] else 'small'}.", "",
             "| k big | search | patterns | best single pattern | loss | per-sequence oracle | per-token oracle* |",
             "|---|---|---|---|---|---|---|"]
    for k, e in res["budgets"].items():
        lines.append(f"| {k} | {e['method']} | {e['n_evaluated']}/{e['space_size']} | `{e['best_pattern']}` | "
                     f"{e['best_single']['loss']:.4f} | {e['per_sequence_oracle']['loss']:.4f} | "
                     f"{e['per_token_oracle']['loss']:.4f} |")
    lines += ["", f"\\* {OPTIMISTIC_NOTE}", "", SEQUENCE_NOTE]
    return "\n".join(lines)


def write_oracle(res: dict, out_dir: str | Path, log=None) -> dict:
    """oracle.json, oracle.md, oracle_patterns.csv (every evaluated pattern per budget, best first: which
    layers go big), oracle_sequences.csv (each sequence's best pattern) and the layer-usage plots."""
    from ..fileio import atomic_open, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / "oracle.json"), "markdown": str(out / "oracle.md"),
             "patterns_csv": str(out / "oracle_patterns.csv"), "sequences_csv": str(out / "oracle_sequences.csv")}
    with atomic_open(out / "oracle_patterns.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["budget", "rank", "pattern", "big_layers", "loss", "ppl", "sequence_wins", "token_wins"])
        for k, e in res["budgets"].items():
            for rank, p in enumerate(e["patterns"]):
                w.writerow([k, rank, p["pattern"], " ".join(map(str, p["big_layers"])), f"{p['loss']:.6f}",
                            f"{_ppl(p['loss']):.4f}", p["sequence_wins"], p["token_wins"]])
    with atomic_open(out / "oracle_sequences.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["budget", "sequence", "pattern", "loss"])
        for k, e in res["budgets"].items():
            r = e.get("_result")
            if r is None:
                continue
            n_valid = r["valid"].sum(1).clamp(min=1)
            for s, (pid, tot) in enumerate(zip(r["seq_arg"].tolist(), r["seq_best_sum"].tolist())):
                w.writerow([k, s, r["pattern_strings"][pid], f"{tot / float(n_valid[s]):.6f}"])
    if plots.available():
        files["usage_by_layer"] = plots.layer_usage_by_layer(res["budgets"], out / "layer_usage_by_layer.png")
        files["usage_by_position"] = plots.layer_usage_by_position(res["budgets"], out / "layer_usage_by_position.png")
        if res["with_skip"]:
            files["skip_usage_by_layer"] = plots.layer_usage_by_layer(res["budgets"], out / "skip_usage_by_layer.png",
                                                                      choice="skip")
    elif log:
        log("matplotlib is not installed: plots skipped (pip install matplotlib)")
    res["files"] = files
    atomic_write_text(out / "oracle.json", json.dumps(public(res), indent=1))
    atomic_write_text(out / "oracle.md", oracle_markdown(res) + "\n")
    return files


def run_oracle(checkpoint, data, budgets, out, *, with_skip: bool = False, max_sequences: int = 64,
               batch_size: int = 8, seq_len: int | None = None, max_patterns: int = 4096, beam: int = 16,
               device: str = "cpu", log=None) -> dict:
    """`dualpath duo oracle`: load, evaluate, write. Returns the JSON-ready result."""
    from ..checkpoint import load_model
    from ..data.loader import load_windows, make_batches

    model, _, ckpt = load_model(checkpoint, device)
    check_duo(model, "`duo oracle`")
    check_budgets(budgets, model.cfg.n_layers)
    x, y = load_windows(data, model, tokenizer_dir=ckpt, max_sequences=max_sequences, seq_len=seq_len)
    res = oracle(model, make_batches(x, y, batch_size, device), budgets, with_skip=with_skip,
                 max_patterns=max_patterns, beam=beam, log=log)
    res.update(checkpoint=str(ckpt), data=str(data))
    write_oracle(res, out, log)
    return public(res)


# ----------------------------------------------------------------------------------------------
# The same search on a Dual-Path model's gates


def pattern_flops(model, pattern, seq_len: int) -> float:
    """Forward FLOPs per token ("true") of a Dual-Path model run with one choice per layer: what deploying the
    pattern costs, a path skipped where the choice gives it a zero gate (deep-favoured: no wide path,
    wide-favoured: no deep path), the LM head included. (The search itself shares work between patterns.)"""
    return model.flops_per_token(seq_len, "true") - sum(
        layer.flops_per_token(seq_len, "true") - layer.flops_per_token(
            seq_len, "true", overrides=Overrides(gates=None if c == "learned" else c))
        for layer, c in zip(model.layers, pattern))


def gate_search(model, batches, *, max_patterns: int = 4096, beam: int = 16, choices=None, log=None) -> dict:
    """Per-layer choices {learned, deep-favoured, wide-favoured} of a Dual-Path model: the learned gates
    (the all-"learned" pattern) against the best single pattern and the per-sequence / per-token oracles.
    The gap between "learned" and the per-token oracle measures how far the learned gates are from a
    per-token optimal allocation between the paths (within these whole-sequence patterns)."""
    sm = DualSearchModel(model)
    space = SearchSpace(sm.n_layers, tuple(choices or sm.choices), default="learned")
    ev = PatternEvaluator(sm, list(batches))
    learned = ("learned",) * sm.n_layers if "learned" in space.choices else None
    if learned:
        ev.evaluate([learned])
    r = search(sm, batches, space, max_patterns=max_patterns, beam=beam, evaluator=ev, log=log)
    T = ev.batches[0][0].shape[1]
    flops = {s: pattern_flops(model, p, T) for s, p in zip(r["pattern_strings"], r["patterns"])}
    res = {
        "n_layers": sm.n_layers, "choices": list(space.choices), "method": r["method"],
        "space_size": r["space_size"], "n_evaluated": r["n_evaluated"],
        "learned_loss": ev.pattern_loss(learned) if learned else None,
        "best_pattern": r["best_pattern_string"], "best_single_loss": r["best_loss"],
        "per_sequence_oracle": r["per_sequence_oracle"], "per_token_oracle": r["per_token_oracle"],
        "note": OPTIMISTIC_NOTE, "letters": dict(sm.letters),
        "learned_flops_per_token": pattern_flops(model, learned, T) if learned else None,
        "best_flops_per_token": flops[r["best_pattern_string"]],
        "patterns": sorted(({"pattern": s, "loss": lo, "flops_per_token": flops[s]}
                            for s, lo in zip(r["pattern_strings"], r["pattern_loss"])), key=lambda d: d["loss"]),
        "_result": r,
    }
    if log:
        log(f"learned gates {res['learned_loss']}, best single {res['best_pattern']} {r['best_loss']:.4f}, "
            f"per-sequence {r['per_sequence_oracle']:.4f}, per-token {r['per_token_oracle']:.4f} (optimistic)")
    return res


def run_gate_search(checkpoint, data, out, *, max_sequences: int = 64, batch_size: int = 8,
                    seq_len: int | None = None, max_patterns: int = 4096, beam: int = 16, device: str = "cpu",
                    log=None) -> dict:
    from ..checkpoint import atomic_write_text, load_model
    from ..data.loader import load_windows, make_batches

    model, _, ckpt = load_model(checkpoint, device)
    if model.cfg.arch != "dual":
        raise CheckpointError(f"the gate search needs a Dual-Path checkpoint (model.arch=dual), this one is "
                              f"{model.cfg.arch}")
    x, y = load_windows(data, model, tokenizer_dir=ckpt, max_sequences=max_sequences, seq_len=seq_len)
    res = gate_search(model, make_batches(x, y, batch_size, device), max_patterns=max_patterns, beam=beam, log=log)
    res.update(checkpoint=str(ckpt), data=str(data))
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out) / "gate_search.json", json.dumps(public(res), indent=1))
    return public(res)


__all__ = ["oracle", "oracle_budget", "write_oracle", "run_oracle", "oracle_markdown", "gate_search",
           "run_gate_search", "check_budgets", "check_duo", "duo_space", "pattern_to_string", "public",
           "OPTIMISTIC_NOTE", "VARIABLE_NOTE", "losses_by_count", "allocate_sequence", "variable_budget_oracle",
           "variable_choice"]

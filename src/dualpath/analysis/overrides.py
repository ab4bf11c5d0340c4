"""Token-class overrides: force the tokens of one tag class onto one path and measure the loss change,
against forcing random token sets of the same size (a permutation test).

For a class C (e.g. ARITH) and a direction ("wide": g_d = 0, g_w = 1; "deep": g_d = 1, g_w = 0, in every
layer, at the positions whose input token is in C):

  delta_all    mean over all scored tokens of (loss forced − loss as trained), nats;
  delta_class  the same over the tokens of C (the loss of predicting a C token);
  delta_next   the same over the tokens that follow a forced token (predictions made at forced positions).

Control: R times, force a random set of tokens of the same size, drawn without replacement from all
non-special tokens (seeded: np.random.default_rng([seed, repeat])). delta_all and delta_class are
measured exactly as above (delta_class on the tokens of C, which the random set mostly leaves alone),
delta_next after the randomly forced tokens. One-sided permutation p-value of each statistic:
p = (1 + #{random >= observed}) / (R + 1), in (0, 1]; 1.0 when R = 0.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError
from .capture import capture_ids, forced_losses

STATS = ("delta_all", "delta_class", "delta_next")


def _mean(x, sel) -> float:
    v = x[sel]
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def _next_of(docs_len: list[int], mask: np.ndarray) -> np.ndarray:
    """Tokens whose previous token (in the same document) is in `mask`."""
    nxt = np.zeros_like(mask)
    nxt[1:] = mask[:-1]
    starts = np.cumsum([0, *docs_len[:-1]]).astype(np.int64)
    nxt[starts[starts < len(mask)]] = False
    return nxt


def p_value(observed: float, random: list[float]) -> float:
    """(1 + #{random >= observed}) / (R + 1); NaN when `observed` is NaN."""
    if not np.isfinite(observed):
        return float("nan")
    r = np.asarray([v for v in random if np.isfinite(v)], dtype=np.float64)
    return float((1 + int((r >= observed).sum())) / (len(random) + 1))


def token_class_override(model, docs, tags, *, cls: str = "ARITH", to: str = "wide", repeats: int = 20,
                         seed: int = 0, bos: int | None = None, special=None, chunk_len: int | None = None,
                         batch_size: int = 8, base_loss=None) -> dict:
    """The override experiment on one dataset (documents as token ids, `tags` one per token, flat).

    Returns the class size, the loss as trained, the observed statistics (see the module docstring), the
    random-control means, standard deviations and raw values, and a p-value per statistic.
    """
    if model.cfg.arch != "dual":
        raise DataError(f"token-class overrides need a dual model, this one is {model.cfg.arch}")
    if to not in ("wide", "deep"):
        raise DataError(f"override direction must be 'wide' or 'deep', got {to!r}")
    if repeats < 0:
        raise DataError(f"repeats must be >= 0, got {repeats}")
    docs = [np.asarray(d, dtype=np.int64) for d in docs]
    lens = [len(d) for d in docs]
    tags = np.asarray(tags).astype(str)
    N = int(sum(lens))
    if tags.size != N:
        raise DataError(f"{tags.size} tags for {N} tokens")
    special = np.zeros(N, bool) if special is None else np.asarray(special, bool)
    kw = dict(bos=bos, chunk_len=chunk_len, batch_size=batch_size)
    if base_loss is None:
        base_loss = capture_ids(model, docs, diagnostics=False, **kw)["loss"]
    base = np.asarray(base_loss, np.float64)
    cls_mask = tags == cls
    n = int(cls_mask.sum())
    scored = np.isfinite(base)
    res = {"class": cls, "to": to, "tokens": N, "class_tokens": n, "repeats": int(repeats), "seed": int(seed),
           "loss": _mean(base, scored), "loss_class": _mean(base, cls_mask & scored)}
    if n == 0:
        res.update({s: float("nan") for s in STATS})
        res.update({f"p_{s}": float("nan") for s in STATS})
        res.update({f"random_{s}_mean": float("nan") for s in STATS})
        res.update({f"random_{s}_std": float("nan") for s in STATS})
        res["random"] = {s: [] for s in STATS}
        res["note"] = f"no {cls} tokens"
        return res

    def stats(forced, mask):
        d = forced - base
        return {"delta_all": _mean(d, scored), "delta_class": _mean(d, cls_mask & scored),
                "delta_next": _mean(d, _next_of(lens, mask) & scored)}

    eligible = np.flatnonzero(~special)
    k = min(n, eligible.size)
    masks = np.zeros((1 + repeats, N), bool)
    masks[0] = cls_mask
    for r in range(repeats):
        rng = np.random.default_rng([int(seed), r])
        masks[1 + r, rng.choice(eligible, size=k, replace=False)] = True
    # the class and its random controls in one stream of batches, over the windows they touch only
    forced = forced_losses(model, docs, masks, to, base_loss, **kw).astype(np.float64)
    obs = stats(forced[0], cls_mask)
    res.update(obs)
    res["loss_forced"] = res["loss"] + obs["delta_all"]
    rand = {s: [] for s in STATS}
    for r in range(repeats):
        st = stats(forced[1 + r], masks[1 + r])
        for s in STATS:
            rand[s].append(st[s])
    for s in STATS:
        vals = np.asarray(rand[s], np.float64)
        fin = vals[np.isfinite(vals)]
        res[f"random_{s}_mean"] = float(fin.mean()) if fin.size else float("nan")
        res[f"random_{s}_std"] = float(fin.std(ddof=1)) if fin.size > 1 else float("nan")
        res[f"p_{s}"] = p_value(obs[s], rand[s]) if repeats else 1.0
    res["random"] = rand
    return res

"""Tables over captured arrays: per-layer means, mean ρ_d per (tag, layer), gate-collapse diagnostics and
the anchor-aligned comparison of two datasets. Every mean skips NaN (values a token does not have)."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..model import binary_entropy as _binary_entropy

GATE_HIGH = 0.95  # a gate above this is saturated open
GATE_LOW = 0.05  # a gate below this is saturated shut
DOMINANCE = 0.9  # dominated by the deep path: ρ_d > DOMINANCE; by the wide path: ρ_d < 1 - DOMINANCE
MIN_TAG_COUNT = 10  # tags with fewer tokens are left out of the tag x layer table
ANCHOR_AFTER = 64  # tokens after the anchor that form the window (0: to the end of the document)
LAYER_MEAN_KEYS = ("gate_deep", "gate_wide", "rho_deep", "cos_deep_wide", "expected_steps", "delta_norm_deep",
                   "delta_norm_wide")


def n_layers(cap: dict) -> int:
    for key in (*LAYER_MEAN_KEYS, "halt_weights"):
        if key in cap:
            return int(cap[key].shape[0])
    return 0


def nanmean(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(x)
    return float(x[ok].mean()) if ok.any() else float("nan")


def nanstd(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(x)
    return float(x[ok].std()) if ok.any() else float("nan")


def layer_means(cap: dict) -> list[dict]:
    """One row per layer: the mean over tokens of each layer value (gates, ρ_d, cos(Δ_d, Δ_w), expected
    steps, Δ-norms), and the standard deviation of ρ_d."""
    rows = []
    for layer in range(n_layers(cap)):
        row: dict = {"layer": layer}
        for key in LAYER_MEAN_KEYS:
            if key in cap:
                row[key] = nanmean(cap[key][layer])
        if "rho_deep" in cap:
            row["rho_deep_std"] = nanstd(cap["rho_deep"][layer])
        row["tokens"] = int(np.isfinite(cap[next(k for k in LAYER_MEAN_KEYS if k in cap)][layer]).sum()) \
            if any(k in cap for k in LAYER_MEAN_KEYS) else 0
        rows.append(row)
    return rows


def tag_layer_table(cap: dict, tags, key: str = "rho_deep", min_count: int = MIN_TAG_COUNT) -> dict:
    """Mean of `key` per (tag, layer), for tags with at least `min_count` tokens that have the value.

    Returns {"key", "min_count", "rows": [{"tag", "count", "values": [per layer]}], "dropped": {tag: count}};
    rows are ordered by count (descending), then tag.
    """
    if key not in cap:
        return {"key": key, "min_count": min_count, "rows": [], "dropped": {}}
    vals = np.asarray(cap[key], dtype=np.float64)
    tags = np.asarray(tags).astype(str)
    has = np.isfinite(vals).any(axis=0)
    rows, dropped = [], {}
    uniq, counts = np.unique(tags[has], return_counts=True)
    for tag, count in sorted(zip(uniq.tolist(), counts.tolist()), key=lambda tc: (-tc[1], tc[0])):
        if count < min_count:
            dropped[tag] = int(count)
            continue
        sel = has & (tags == tag)
        values = [nanmean(vals[layer, sel]) for layer in range(vals.shape[0])]
        rows.append({"tag": tag, "count": int(count), "values": values})
    return {"key": key, "min_count": min_count, "rows": rows, "dropped": dropped}


def binary_entropy(p) -> np.ndarray:
    """H(p) in bits (so in [0, 1]); 0 at p = 0 or 1; NaN stays NaN. `model.binary_entropy` (the one
    definition, which the training log uses too) on NumPy: float64 in, float64 out."""
    return _binary_entropy(torch.from_numpy(np.array(p, dtype=np.float64))).numpy()


def _frac(mask, valid) -> float:
    n = int(valid.sum())
    return float((mask & valid).sum() / n) if n else float("nan")


def collapse_diagnostics(cap: dict, *, high: float = GATE_HIGH, low: float = GATE_LOW,
                         dominance: float = DOMINANCE) -> list[dict]:
    """One row per layer (dual models; empty otherwise):

    gate_entropy_deep / _wide: mean binary entropy (bits) of the gate over tokens (1 = always 0.5, 0 = always
    0 or 1); deep_gate_high / deep_gate_low (and wide_): share of tokens with the gate above `high` / below
    `low`; any_gate_saturated: share with at least one gate above `high` or below `low`;
    polarisation: 2·mean|ρ_d − 0.5| in [0, 1]; deep_dominant / wide_dominant: share with ρ_d > dominance /
    ρ_d < 1 − dominance; path_dominated: their sum (one path carries > dominance of the update).
    """
    if "gate_deep" not in cap or "gate_wide" not in cap:
        return []
    rows = []
    for layer in range(cap["gate_deep"].shape[0]):
        gd = np.asarray(cap["gate_deep"][layer], np.float64)
        gw = np.asarray(cap["gate_wide"][layer], np.float64)
        valid = np.isfinite(gd) & np.isfinite(gw)
        row = {"layer": layer,
               "gate_entropy_deep": nanmean(np.where(valid, binary_entropy(gd), np.nan)),
               "gate_entropy_wide": nanmean(np.where(valid, binary_entropy(gw), np.nan))}
        for name, g in (("deep", gd), ("wide", gw)):
            row[f"{name}_gate_high"] = _frac(g > high, valid)
            row[f"{name}_gate_low"] = _frac(g < low, valid)
        row["any_gate_saturated"] = _frac((gd > high) | (gd < low) | (gw > high) | (gw < low), valid)
        if "rho_deep" in cap:
            rho = np.asarray(cap["rho_deep"][layer], np.float64)
            rv = np.isfinite(rho)
            row["polarisation"] = nanmean(2 * np.abs(rho - 0.5))
            row["deep_dominant"] = _frac(rho > dominance, rv)
            row["wide_dominant"] = _frac(rho < 1 - dominance, rv)
            row["path_dominated"] = row["deep_dominant"] + row["wide_dominant"] if rv.any() else float("nan")
        rows.append(row)
    return rows


def anchor_window(texts: list[str], offsets: list[np.ndarray], anchor: str, after: int = ANCHOR_AFTER
                  ) -> tuple[np.ndarray, np.ndarray, int]:
    """Flat token indices (over all documents) of each document's anchor window, their positions in the
    window (0 = the first token after the anchor), and the number of documents that hold the anchor.

    The window of a document: the first token that starts at or after the end of the first occurrence
    of `anchor` in its text, and the `after` - 1 tokens that follow it in the document (to the end of the
    document when `after` is 0). Documents without the anchor contribute nothing.
    """
    idx, rel, n_docs, base = [], [], 0, 0
    for text, offs in zip(texts, offsets):
        k = text.find(anchor)
        if k >= 0:
            first = int(np.searchsorted(offs[:, 0], k + len(anchor), side="left"))
            stop = len(offs) if after <= 0 else min(len(offs), first + after)
            if first < stop:
                n_docs += 1
                idx.append(base + np.arange(first, stop))
                rel.append(np.arange(stop - first))
        base += len(offs)
    if not idx:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    return np.concatenate(idx).astype(np.int64), np.concatenate(rel).astype(np.int64), n_docs


def anchor_compare(cap_a: dict, idx_a: np.ndarray, cap_b: dict, idx_b: np.ndarray, key: str = "rho_deep") -> list[dict]:
    """Per layer: mean of `key` over dataset A's anchor windows, over B's, the difference A − B, and its
    standard error sqrt(var_A/n_A + var_B/n_B) (tokens treated as independent, so a lower bound)."""
    if key not in cap_a or key not in cap_b:
        return []
    rows = []
    for layer in range(cap_a[key].shape[0]):
        a = np.asarray(cap_a[key][layer, idx_a], np.float64)
        b = np.asarray(cap_b[key][layer, idx_b], np.float64)
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        ma, mb = (a.mean() if a.size else math.nan), (b.mean() if b.size else math.nan)
        se = math.sqrt((a.var(ddof=1) / a.size if a.size > 1 else math.nan)
                       + (b.var(ddof=1) / b.size if b.size > 1 else math.nan))
        rows.append({"layer": layer, "mean_a": float(ma), "mean_b": float(mb), "diff": float(ma - mb), "se": se,
                     "n_a": int(a.size), "n_b": int(b.size)})
    return rows

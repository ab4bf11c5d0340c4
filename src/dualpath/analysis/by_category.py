"""Routing by task category: where a Dual-Path model sends the tokens that produce each kind of answer.

For held-out examples {category, text, answer_start, answer_end} (the synthetic corpus's eval_examples),
each layer's g_d, g_w, deep share ρ_d and expected loop steps are averaged over the positions that
*predict* an answer token (the input position before each answer token: the computation that produces
the answer), per category. Over several seeds, `seed_intervals` gives mean, std and a 95% t-interval.
"""

from __future__ import annotations

import math

import numpy as np

from ..data.tokenizer import eos_id
from ..errors import DataError
from .capture import capture_ids

KEYS = ("gate_deep", "gate_wide", "rho_deep", "expected_steps")


def answer_positions(tokenizer, ex: dict) -> tuple[list[int], np.ndarray]:
    """Token ids of the example's text and, per token, whether it is the input that predicts an answer token."""
    enc = tokenizer.encode(ex["text"])
    is_answer = np.array([e > ex["answer_start"] and s < ex["answer_end"] for s, e in enc.offsets], dtype=bool)
    predicts = np.zeros(len(enc.ids), dtype=bool)
    predicts[:-1] = is_answer[1:]
    return enc.ids, predicts


def routing_by_category(model, tokenizer, examples: list[dict], batch_size: int = 16) -> dict:
    """{category: {"positions": n, "layers": [{key: mean over the category's answer-producing positions}]}}.

    Keys per layer: those of KEYS the architecture reports (a wide model has none)."""
    if not examples:
        raise DataError("no examples to analyse")
    docs, sel = [], []
    for ex in examples:
        ids, predicts = answer_positions(tokenizer, ex)
        docs.append(ids)
        sel.append(predicts)
    cap = capture_ids(model, docs, bos=eos_id(tokenizer), batch_size=batch_size)
    sel = np.concatenate(sel)
    cats = np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)])
    names = [ex["category"] for ex in examples]
    out = {}
    for cat in dict.fromkeys(names):
        rows = np.array([n == cat for n in names])
        m = sel & rows[cats]
        layers = []
        for li in range(len(model.layers)):
            layers.append({k: float(np.nanmean(cap[k][li][m])) for k in KEYS if k in cap and m.any()})
        out[cat] = {"positions": int(m.sum()), "layers": layers}
    return out


def seed_intervals(values: list[float]) -> dict:
    """Mean, sample std and the half-width of a 95% t-interval of per-seed values."""
    v = np.asarray(values, np.float64)
    n = len(v)
    mean = float(v.mean()) if n else math.nan
    if n < 2:
        return {"mean": mean, "std": math.nan, "ci95": math.nan, "n": n}
    std = float(v.std(ddof=1))
    t = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}.get(n, 1.96)
    return {"mean": mean, "std": std, "ci95": t * std / math.sqrt(n), "n": n}

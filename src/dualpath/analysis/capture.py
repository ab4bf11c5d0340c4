"""Capture per-token, per-layer routing values of a model over documents, in context-sized windows.

Alignment (token j of a document, t_j):
  * layer values (gates, Δ-norms, cos, expected steps, ρ_d) are those computed at the position whose
    *input* is t_j;
  * `loss[j]` is the cross-entropy of *predicting* t_j from the tokens before it (nats). With a BOS every
    token has one; without, the first token of a document has none (NaN).

A document longer than the window (`chunk_len`, default the model's context) is cut into consecutive
non-overlapping windows, like `dualpath eval` scores raw text; each window starts with an empty context
(the first token of a later window is still predicted, from the previous window's last position).

Deep share: ρ_d = g_d‖Δ_d‖ / (g_d‖Δ_d‖ + g_w‖Δ_w‖), Δ = h_path − x (the layer's input), from the
diagnostics' Δ-norms; NaN where the denominator is 0. Defined for dual models only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import DataError
from ..model import Overrides, TokenChoice
from ..model import deep_share as _deep_share

LAYER_KEYS = ("gate_deep", "gate_wide", "delta_norm_deep", "delta_norm_wide", "cos_deep_wide", "expected_steps")
TOKEN_KEYS = ("ids", "doc", "loss")


def _windows(docs: list[np.ndarray], bos: int | None, L: int, need_last: bool):
    """(input ids, target ids, token index of each input position, token index of each target) per window.

    Token indices are flat over all documents; -1 marks the BOS or a position without a target.
    """
    base = 0
    off = 1 if bos is not None else 0
    for ids in docs:
        n = len(ids)
        seq = np.concatenate([[bos], ids]).astype(np.int64) if off else np.asarray(ids, dtype=np.int64)
        m = len(seq)
        for a in range(0, m, L):
            b = min(a + L, m)
            pos = np.arange(a, b)
            tgt_pos = pos + 1
            has_t = tgt_pos < m
            if not has_t.any() and not need_last:
                continue
            tgt = np.where(has_t, seq[np.minimum(tgt_pos, m - 1)], -1)
            in_idx = np.where(pos >= off, base + pos - off, -1)
            tgt_idx = np.where(has_t, base + tgt_pos - off, -1)
            yield seq[a:b], tgt, in_idx, tgt_idx
        base += n


def _checked(model, docs, bos, chunk_len, batch_size, to) -> tuple[list[np.ndarray], int, int]:
    """The documents as int64 arrays, the window length and the token count, after checking the arguments."""
    docs = [np.asarray(d, dtype=np.int64).reshape(-1) for d in docs]
    cfg = model.cfg
    L = int(chunk_len or cfg.seq_len)
    if not 1 <= L <= cfg.seq_len:
        raise DataError(f"chunk length {L} is outside 1..{cfg.seq_len} (the model's context)")
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    vocab = cfg.vocab_size
    for d in docs:
        if len(d) and (d.min() < 0 or d.max() >= vocab):
            raise DataError(f"token id {int(d.max())} is outside the model's vocabulary ({vocab})")
    if bos is not None and not 0 <= bos < vocab:
        raise DataError(f"BOS id {bos} is outside the model's vocabulary ({vocab})")
    if to not in ("deep", "wide"):
        raise DataError(f"token_mask_to must be 'deep' or 'wide', got {to!r}")
    return docs, L, int(sum(len(d) for d in docs))


def _window_mask(mask: np.ndarray, in_idx: np.ndarray) -> np.ndarray:
    """A flat per-token mask at a window's input positions (False at the BOS)."""
    sel = in_idx >= 0
    row = np.zeros(len(in_idx), bool)
    row[sel] = mask[in_idx[sel]]
    return row


def _forward(model, inputs, targets, forced, to, overrides, diagnostics):
    """One forward over windows of different lengths, padded after their end (causal: padding changes nothing
    before it); `forced`: None or one bool row per window, where the gates are forced to `to`."""
    device = next(model.parameters()).device
    B, T = len(inputs), max(len(i) for i in inputs)
    x = torch.zeros(B, T, dtype=torch.long)
    y = torch.full((B, T), -1, dtype=torch.long)
    m = torch.zeros(B, T, dtype=torch.bool) if forced is not None else None
    for r, (inp, tgt) in enumerate(zip(inputs, targets)):
        x[r, :len(inp)] = torch.from_numpy(inp)
        y[r, :len(tgt)] = torch.from_numpy(tgt)
        if m is not None:
            m[r, :len(inp)] = torch.from_numpy(forced[r])
    choices = [TokenChoice(m.to(device), to)] * len(model.layers) if m is not None else None
    return model(x.to(device), y.to(device), overrides=overrides, choices=choices, return_per_token_loss=True,
                 return_diagnostics=diagnostics)


@torch.inference_mode()
def capture_ids(model, docs: Sequence, *, bos: int | None = None, chunk_len: int | None = None,
                batch_size: int = 8, token_mask=None, token_mask_to: str = "wide", overrides: Overrides | None = None,
                diagnostics: bool = True) -> dict[str, np.ndarray]:
    """Capture over documents given as token ids (each scored on its own, after `bos` when given).

    token_mask: bool per token (flat over all documents); where True, a dual model's gates are forced to
    `token_mask_to` ("deep" or "wide") in every layer. diagnostics=False gives the losses only (faster).
    Returns `ids`, `doc`, `loss` of shape (n_tokens,), and for every value the model reports, an array of
    shape (n_layers, n_tokens) (`halt_weights`: (n_layers, n_tokens, K)), plus `rho_deep` for dual models.
    Values a model does not have (the gates of a loop model, say) are left out.
    """
    docs, L, N = _checked(model, docs, bos, chunk_len, batch_size, token_mask_to)
    mask = None
    if token_mask is not None:
        mask = np.asarray(token_mask, dtype=bool).reshape(-1)
        if mask.size != N:
            raise DataError(f"token mask has {mask.size} entries for {N} tokens")
    out: dict[str, np.ndarray] = {
        "ids": np.concatenate(docs) if N else np.zeros(0, np.int64),
        "doc": (np.concatenate([np.full(len(d), i, np.int32) for i, d in enumerate(docs)]) if N
                else np.zeros(0, np.int32)),
        "loss": np.full(N, np.nan, np.float32),
    }
    n_layers = len(model.layers)
    layer: dict[str, np.ndarray] = {}

    def run(batch):
        T = max(len(w[0]) for w in batch)
        forced = [_window_mask(mask, w[2]) for w in batch] if mask is not None else None
        res = _forward(model, [w[0] for w in batch], [w[1] for w in batch], forced, token_mask_to, overrides,
                       diagnostics)
        ptl = res.per_token_loss.float().cpu().numpy()
        diags = [{k: v.float().cpu().numpy() for k, v in d.items()
                  if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[:2] == (len(batch), T)}
                 for d in res.diagnostics] if diagnostics else []
        for r, (inp, tgt, in_idx, tgt_idx) in enumerate(batch):
            n = len(inp)
            ok = tgt_idx >= 0
            out["loss"][tgt_idx[ok]] = ptl[r, :n][ok]
            if not diagnostics:
                continue
            sel = in_idx >= 0
            for li, d in enumerate(diags):
                for key in (*LAYER_KEYS, "halt_weights"):
                    if key not in d:
                        continue
                    v = d[key][r, :n]
                    if key not in layer:
                        layer[key] = np.full((n_layers, N, *v.shape[1:]), np.nan, np.float32)
                    if layer[key].shape[2:] != v.shape[1:]:
                        continue  # per-layer K differs (not in this model family): keep the first shape
                    layer[key][li, in_idx[sel]] = v[sel]

    # Windows of similar length share a batch (longest first, stable): padding to the longest window of a
    # batch nearly halves the work on documents of mixed lengths. Each window is computed on its own (causal,
    # padding after it), so its values do not depend on its batch.
    windows = sorted(_windows(docs, bos, L, need_last=diagnostics), key=lambda w: -len(w[0]))
    for a in range(0, len(windows), batch_size):
        run(windows[a:a + batch_size])
    out.update(layer)
    if {"gate_deep", "gate_wide", "delta_norm_deep", "delta_norm_wide"} <= layer.keys():
        out["rho_deep"] = deep_share(layer["gate_deep"], layer["gate_wide"], layer["delta_norm_deep"],
                                     layer["delta_norm_wide"])
    return out


@torch.inference_mode()
def forced_losses(model, docs: Sequence, masks, to: str, base, *, bos: int | None = None,
                  chunk_len: int | None = None, batch_size: int = 8) -> np.ndarray:
    """Per-token losses under several forced-gate masks at once: row i is `capture_ids(model, docs,
    token_mask=masks[i], token_mask_to=to, diagnostics=False)["loss"]` up to float32 rounding.

    masks: bool (n_masks, n_tokens); base: the losses without forcing (n_tokens,), e.g. from `capture_ids`.
    A window is scored on its own and attention is causal, so the loss of a target before the window's first
    forced input (every target of a window without one) cannot change: it is copied from `base`, and only
    windows with a forced input run. The windows to run, of all masks, share batches (longest first).
    Returns float32 (n_masks, n_tokens).
    """
    docs, L, N = _checked(model, docs, bos, chunk_len, batch_size, to)
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 2 or masks.shape[1] != N:
        raise DataError(f"masks of shape {masks.shape} for {N} tokens (expected (n_masks, {N}))")
    base = np.asarray(base, dtype=np.float32).reshape(-1)
    if base.size != N:
        raise DataError(f"{base.size} base losses for {N} tokens")
    out = np.repeat(base[None], len(masks), axis=0)
    windows = list(_windows(docs, bos, L, need_last=False))
    todo = []  # (mask, window, first forced position)
    for w, (inp, _, in_idx, _) in enumerate(windows):
        sel = np.flatnonzero(in_idx >= 0)
        hit = masks[:, in_idx[sel]]  # (n_masks, inputs of the window)
        for i in np.flatnonzero(hit.any(axis=1)):
            todo.append((int(i), w, int(sel[np.argmax(hit[i])])))
    todo.sort(key=lambda t: -len(windows[t[1]][0]))  # stable: padding only within windows of similar length
    for a in range(0, len(todo), batch_size):
        batch = todo[a:a + batch_size]
        wins = [windows[w] for _, w, _ in batch]
        res = _forward(model, [w[0] for w in wins], [w[1] for w in wins],
                       [_window_mask(masks[i], windows[w][2]) for i, w, _ in batch], to, None, False)
        ptl = res.per_token_loss.float().cpu().numpy()
        for r, (i, w, f) in enumerate(batch):
            tgt_idx = windows[w][3]
            p = f + np.flatnonzero(tgt_idx[f:] >= 0)
            out[i, tgt_idx[p]] = ptl[r, p]
    return out


def deep_share(g_d, g_w, norm_d, norm_w) -> np.ndarray:
    """ρ_d = g_d‖Δ_d‖ / (g_d‖Δ_d‖ + g_w‖Δ_w‖), computed in float64, returned as float32; NaN where the
    denominator is 0. `model.deep_share` (the one definition, which the training log uses too) on NumPy."""
    def t(a):
        return torch.from_numpy(np.array(a, dtype=np.float64))  # a copy: writable, positive strides

    return _deep_share(t(g_d), t(g_w), t(norm_d), t(norm_w)).numpy().astype(np.float32)


def _is_int_seq(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.dim() == 1
    if isinstance(x, np.ndarray):
        return x.ndim == 1 and np.issubdtype(x.dtype, np.integer)
    return isinstance(x, (list, tuple)) and all(isinstance(v, (int, np.integer)) for v in x)


def capture(model, ids_or_text, tokenizer=None, *, chunk_len: int | None = None, batch_size: int = 8,
            bos: int | None | str = "auto", token_mask=None, token_mask_to: str = "wide",
            overrides: Overrides | None = None, diagnostics: bool = True) -> dict[str, np.ndarray]:
    """Per-token, per-layer routing values of `model` over text or token ids.

    ids_or_text: a string, a list of strings (documents), a 1-D sequence of token ids, or a list of such
    sequences. Text needs `tokenizer` (a `tokenizers.Tokenizer`); its documents are scored after a BOS
    (the tokenizer's end-of-text token) and the result also holds `start`/`end`, each token's character
    span in its document. Token ids get no BOS unless `bos` is an id.

    Returns a dict of NumPy arrays: `ids`, `doc`, `loss` (n_tokens,); `gate_deep`, `gate_wide`,
    `rho_deep`, `delta_norm_deep`, `delta_norm_wide`, `cos_deep_wide`, `expected_steps`
    (n_layers, n_tokens) where the architecture has them; `halt_weights` (n_layers, n_tokens, K).
    """
    from .corpus import bos_id, encode_with_offsets

    if isinstance(ids_or_text, str) or (isinstance(ids_or_text, (list, tuple)) and ids_or_text
                                        and all(isinstance(t, str) for t in ids_or_text)):
        if tokenizer is None:
            raise DataError("capturing text needs a tokenizer")
        texts = [ids_or_text] if isinstance(ids_or_text, str) else list(ids_or_text)
        encoded = [encode_with_offsets(tokenizer, t) for t in texts]
        docs = [e[0] for e in encoded]
        if bos == "auto":
            bos = bos_id(tokenizer)
        res = capture_ids(model, docs, bos=bos, chunk_len=chunk_len, batch_size=batch_size, token_mask=token_mask,
                          token_mask_to=token_mask_to, overrides=overrides, diagnostics=diagnostics)
        offs = np.concatenate([e[1] for e in encoded]) if res["ids"].size else np.zeros((0, 2), np.int64)
        res["start"], res["end"] = offs[:, 0], offs[:, 1]
        return res
    if _is_int_seq(ids_or_text):
        docs = [np.asarray(ids_or_text.tolist() if isinstance(ids_or_text, torch.Tensor) else ids_or_text)]
    elif isinstance(ids_or_text, (list, tuple)) and all(_is_int_seq(d) for d in ids_or_text):
        docs = [np.asarray(d.tolist() if isinstance(d, torch.Tensor) else d) for d in ids_or_text]
    else:
        raise DataError("capture expects text, a list of texts, token ids, or a list of token-id sequences")
    return capture_ids(model, docs, bos=None if bos == "auto" else bos, chunk_len=chunk_len, batch_size=batch_size,
                       token_mask=token_mask, token_mask_to=token_mask_to, overrides=overrides,
                       diagnostics=diagnostics)

"""Routing search over "a model whose layers each take one of a few named choices".

The engine knows nothing about Duo-LLM or Dual-Path. It needs an object with

    n_layers: int
    choices: Sequence[str]                  every choice a layer can take, e.g. ("big", "small", "skip")
    default_choice: str                     the filler used to complete partial patterns (beam search)
    letters: dict[str, str]                 one letter per choice, for pattern strings ("BBSS")
    embed(idx) -> state                     the state before layer 0
    apply_layer(i, state, choice) -> state  layer i under one choice (for every token of the batch)
    logits_loss(state, targets) -> (B, T)   per-token loss in nats, 0 where targets == -1

and optionally `apply_layer_multi(i, state, choices) -> [state, ...]`, which computes several sibling
choices from the same input at once (a Duo layer computes its attention once for big, small and skip).

A *pattern* is one choice per layer, applied to whole sequences. `PatternEvaluator` runs a set of
patterns over a fixed list of batches with **prefix sharing**: the patterns form a trie (a tree over
layers), which is walked depth first with the hidden state of every node on the stack, so patterns
that agree on their first j layers compute those j layers once. Every evaluated pattern updates:

    pattern loss          mean per-token loss of the pattern over all tokens
    per-sequence oracle   for each sequence its best pattern (lowest summed loss), token-weighted mean
    per-token oracle      for each token its lowest loss over the patterns. Optimistic: it picks the
                          pattern *after seeing the label*, so it is a bound, not an achievable router.

`search` enumerates the `SearchSpace` when it holds at most `max_patterns` patterns, else runs
`beam_search`: a beam over layers that extends every kept prefix by every allowed choice and scores
each extension by the loss of one complete pattern, the prefix *completed* by `SearchSpace.complete`
(the default choice everywhere, except that the budgeted choice still owed is spread evenly over the
remaining layers, so every scored pattern is a feasible one). Every scored completion is a real
pattern, so all of them count towards the oracles; a beam at least as wide as the widest layer of the
trie evaluates every pattern and gives exactly the enumeration's results.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import torch

from ..errors import ConfigError
from ..model import parse_letters

# ----------------------------------------------------------------------------------------------
# The interface


class LayeredModel(Protocol):
    n_layers: int
    choices: Sequence[str]
    default_choice: str
    letters: dict

    def embed(self, idx: torch.Tensor) -> Any: ...

    def apply_layer(self, i: int, state: Any, choice: str) -> Any: ...

    def logits_loss(self, state: Any, targets: torch.Tensor) -> torch.Tensor: ...


# ----------------------------------------------------------------------------------------------
# The space of patterns


@dataclass(frozen=True)
class SearchSpace:
    """Patterns of n_layers choices from `choices`; with a budget, exactly `budget` layers take
    `budget_choice`. `default` fills the layers a partial pattern leaves open (see `complete`)."""

    n_layers: int
    choices: tuple
    budget_choice: str | None = None
    budget: int | None = None
    default: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "choices", tuple(self.choices))
        if not self.choices:
            raise ConfigError("a search space needs at least one choice")
        if self.budget is not None:
            if self.budget_choice not in self.choices:
                raise ConfigError(f"budgeted choice '{self.budget_choice}' is not among {list(self.choices)}")
            if not 0 <= self.budget <= self.n_layers:
                raise ConfigError(f"a budget of {self.budget} '{self.budget_choice}' layers is outside "
                                  f"0..{self.n_layers} (the model has {self.n_layers} layers)")
            if self.budget < self.n_layers and not self.others:
                raise ConfigError(f"budget {self.budget} < {self.n_layers} layers needs a choice besides "
                                  f"'{self.budget_choice}'")
        if self.default is None:
            object.__setattr__(self, "default", self.others[0] if self.others else self.choices[0])
        elif self.default not in self.choices:
            raise ConfigError(f"default choice '{self.default}' is not among {list(self.choices)}")
        if self.budget is not None and self.default == self.budget_choice and self.others:
            raise ConfigError("the default choice must not be the budgeted one")

    @property
    def others(self) -> tuple:
        return tuple(c for c in self.choices if c != self.budget_choice) if self.budget is not None else self.choices

    def count(self) -> int:
        L = self.n_layers
        if self.budget is None:
            return len(self.choices) ** L
        return math.comb(L, self.budget) * len(self.others) ** (L - self.budget)

    def used(self, prefix) -> int:
        return sum(c == self.budget_choice for c in prefix) if self.budget is not None else 0

    def can_extend(self, prefix, choice) -> bool:
        if self.budget is None:
            return True
        used = self.used(prefix) + (choice == self.budget_choice)
        remaining = self.n_layers - len(prefix) - 1
        return used <= self.budget and used + remaining >= self.budget

    def enumerate(self) -> Iterable[tuple]:
        """Every pattern, in lexicographic order of `choices`."""
        if self.budget is None:
            yield from itertools.product(self.choices, repeat=self.n_layers)
            return

        def rec(prefix):
            if len(prefix) == self.n_layers:
                yield prefix
                return
            for c in self.choices:
                if self.can_extend(prefix, c):
                    yield from rec(prefix + (c,))

        yield from rec(())

    def complete(self, prefix) -> tuple:
        """The prefix, then the default choice, with the budgeted choice still owed spread evenly over the
        remaining layers: owed m of r layers go to offsets floor((j + 1/2)·r/m), j = 0..m-1."""
        prefix = tuple(prefix)
        r = self.n_layers - len(prefix)
        rest = [self.default] * r
        if self.budget is not None:
            m = self.budget - self.used(prefix)
            for j in range(m):
                rest[int((j + 0.5) * r / m)] = self.budget_choice
        return prefix + tuple(rest)


# ----------------------------------------------------------------------------------------------
# Evaluation with prefix sharing


class PatternEvaluator:
    """Evaluates patterns on a fixed list of batches [(idx (B, T), targets (B, T)), ...], caching each
    pattern's mean loss and keeping the per-sequence and per-token oracles over everything evaluated.

    share_prefix=False is the naive reference: every pattern runs embed and all layers from scratch with
    `apply_layer` (for a Duo model, exactly the model's forward with an explicit routing mask).

    It also keeps a per-sequence choice that is held out within the sequence: the pattern with the lowest loss
    on positions [0, prefix_split) (default T // 2), scored on [prefix_split, T), beside the label-using
    per-sequence oracle on those same positions.
    """

    def __init__(self, sm: LayeredModel, batches, share_prefix: bool = True, prefix_split: int | None = None):
        self.sm, self.share_prefix = sm, share_prefix
        self.batches = [(x, y) for x, y in batches]
        if not self.batches:
            raise ValueError("no batches to evaluate")
        Ts = {x.shape[1] for x, _ in self.batches}
        if len(Ts) != 1:
            raise ValueError(f"every batch must have the same length, got {sorted(Ts)}")
        self.patterns: list[tuple] = []
        self.index: dict[tuple, int] = {}
        self.loss_sum: list[float] = []
        self.valid = [(y != -1) for _, y in self.batches]
        self.n_tokens = int(sum(int(v.sum()) for v in self.valid))
        if self.n_tokens == 0:
            raise ValueError("the batches hold no target tokens")
        self.tok_best = [torch.full(y.shape, math.inf) for _, y in self.batches]
        self.tok_arg = [torch.full(y.shape, -1, dtype=torch.long) for _, y in self.batches]
        self.seq_best = [torch.full((y.shape[0],), math.inf, dtype=torch.float64) for _, y in self.batches]
        self.seq_arg = [torch.full((y.shape[0],), -1, dtype=torch.long) for _, y in self.batches]
        T = next(iter(Ts))
        self.prefix_split = T // 2 if prefix_split is None else int(prefix_split)
        if T < 2:  # the held-out per-sequence choice needs a first and a second half
            raise ConfigError(f"windows of {T} token(s): the search needs at least 2 (--seq-len)")
        if not 0 < self.prefix_split < T:
            raise ValueError(f"prefix_split must be in [1, {T - 1}], got {self.prefix_split}")

        def per_seq(fill, dtype=torch.float64):
            return [torch.full((y.shape[0],), fill, dtype=dtype) for _, y in self.batches]

        self.pre_best, self.pre_arg, self.pre_suffix = per_seq(math.inf), per_seq(-1, torch.long), per_seq(0.0)
        self.suf_best = per_seq(math.inf)
        self.layer_calls = 0  # layer applications (one per choice per node)
        self.head_calls = 0

    # -- public ----------------------------------------------------------------------------------

    def evaluate(self, patterns) -> list[float]:
        """Mean loss of each pattern (evaluating only the ones not seen before)."""
        patterns = [tuple(p) for p in patterns]
        for p in patterns:
            if len(p) != self.sm.n_layers:
                raise ValueError(f"pattern {p} has {len(p)} choices, the model has {self.sm.n_layers} layers")
            bad = [c for c in p if c not in self.sm.choices]
            if bad:
                raise ConfigError(f"unknown choice '{bad[0]}' (choices: {', '.join(self.sm.choices)})")
        new = []
        for p in patterns:
            if p not in self.index:
                self.index[p] = len(self.patterns)
                self.patterns.append(p)
                self.loss_sum.append(0.0)
                new.append(p)
        if new:
            items = sorted((p, self.index[p]) for p in new)
            with torch.inference_mode():
                for b in range(len(self.batches)):
                    if self.share_prefix:
                        self._walk_shared(b, items)
                    else:
                        self._walk_naive(b, items)
        return [self.loss_sum[self.index[p]] / self.n_tokens for p in patterns]

    def pattern_loss(self, pattern) -> float:
        return self.evaluate([pattern])[0]

    @torch.inference_mode()
    def token_losses(self, pattern) -> torch.Tensor:
        """Per-token losses (N, T) of one pattern over all batches (recomputed, not cached)."""
        out = []
        for idx, tgt in self.batches:
            state = self.sm.embed(idx)
            for i, c in enumerate(pattern):
                state = self.sm.apply_layer(i, state, c)
            out.append(self.sm.logits_loss(state, tgt).float().cpu())
        return torch.cat(out)

    def pattern_strings(self) -> list[str]:
        return [pattern_to_string(self.sm, p) for p in self.patterns]

    def result(self) -> dict:
        """Summary over every pattern evaluated so far (tensors are concatenated over batches)."""
        if not self.patterns:
            raise ValueError("no pattern was evaluated")
        losses = [s / self.n_tokens for s in self.loss_sum]
        best = min(range(len(losses)), key=lambda i: (losses[i], i))
        valid = torch.cat(self.valid).cpu()
        tok_best = torch.cat(self.tok_best)
        seq_best = torch.cat(self.seq_best)
        return {
            "patterns": list(self.patterns),
            "pattern_loss": losses,
            "best_index": best,
            "best_pattern": self.patterns[best],
            "best_loss": losses[best],
            "per_sequence_oracle": float(seq_best.sum() / self.n_tokens),
            "per_token_oracle": float(tok_best[valid].double().sum() / self.n_tokens),
            "n_tokens": self.n_tokens,
            "n_sequences": int(valid.shape[0]),
            "layer_calls": self.layer_calls,
            "head_calls": self.head_calls,
            "valid": valid,
            "tok_best": torch.where(valid, tok_best, torch.zeros_like(tok_best)),
            "tok_arg": torch.cat(self.tok_arg),
            "seq_best_sum": seq_best,
            "seq_arg": torch.cat(self.seq_arg),
            "prefix_split": self.prefix_split,
            "prefix_arg": torch.cat(self.pre_arg),  # per sequence: the pattern best on its prefix
            "prefix_choice_suffix_sum": torch.cat(self.pre_suffix),  # that pattern's loss summed over the suffix
            "suffix_oracle_sum": torch.cat(self.suf_best),  # the best pattern's loss on the suffix (labels)
        }

    # -- internals -------------------------------------------------------------------------------

    def _apply(self, i, state, choices):
        self.layer_calls += len(choices)
        multi = getattr(self.sm, "apply_layer_multi", None)
        if self.share_prefix and multi is not None:
            return multi(i, state, list(choices))
        return [self.sm.apply_layer(i, state, c) for c in choices]

    def _leaf(self, b, pid, loss):
        self.head_calls += 1
        v = self.valid[b]
        loss = torch.where(v, loss.float(), torch.zeros_like(loss, dtype=torch.float32)).cpu()
        v = v.cpu()
        self.loss_sum[pid] += float(loss.double().sum())
        better = (loss < self.tok_best[b]) & v
        self.tok_best[b] = torch.where(better, loss, self.tok_best[b])
        self.tok_arg[b] = torch.where(better, torch.full_like(self.tok_arg[b], pid), self.tok_arg[b])
        s = loss.double().sum(1)
        better = s < self.seq_best[b]
        self.seq_best[b] = torch.where(better, s, self.seq_best[b])
        self.seq_arg[b] = torch.where(better, torch.full_like(self.seq_arg[b], pid), self.seq_arg[b])
        pre, suf = loss[:, :self.prefix_split].double().sum(1), loss[:, self.prefix_split:].double().sum(1)
        better = pre < self.pre_best[b]
        self.pre_best[b] = torch.where(better, pre, self.pre_best[b])
        self.pre_arg[b] = torch.where(better, torch.full_like(self.pre_arg[b], pid), self.pre_arg[b])
        self.pre_suffix[b] = torch.where(better, suf, self.pre_suffix[b])
        self.suf_best[b] = torch.minimum(suf, self.suf_best[b])

    def _walk_shared(self, b, items):
        idx, tgt = self.batches[b]
        L = self.sm.n_layers

        def rec(depth, state, items):
            if depth == L:
                loss = self.sm.logits_loss(state, tgt)
                for _, pid in items:
                    self._leaf(b, pid, loss)
                return
            groups: dict[str, list] = {}
            for it in items:
                groups.setdefault(it[0][depth], []).append(it)
            choices = list(groups)
            children = self._apply(depth, state, choices)
            for c, child in zip(choices, children):
                rec(depth + 1, child, groups[c])
                del child

        rec(0, self.sm.embed(idx), items)

    def _walk_naive(self, b, items):
        idx, tgt = self.batches[b]
        for p, pid in items:
            state = self.sm.embed(idx)
            for i, c in enumerate(p):
                state = self._apply(i, state, [c])[0]
            self._leaf(b, pid, self.sm.logits_loss(state, tgt))


def pattern_to_string(sm, pattern) -> str:
    letters = getattr(sm, "letters", None) or {c: c[0].upper() for c in sm.choices}
    return "".join(letters[c] for c in pattern)


def pattern_from_string(sm, text: str) -> tuple:
    letters = getattr(sm, "letters", None) or {c: c[0].upper() for c in sm.choices}
    return tuple(parse_letters(text, sm.n_layers, {v: k for k, v in letters.items()}))


# ----------------------------------------------------------------------------------------------
# Search


def beam_search(ev: PatternEvaluator, space: SearchSpace, beam: int, log=None) -> list[tuple]:
    """Beam over layers. Depth d: extend each kept prefix by every allowed choice, score each extension by
    the mean loss of `space.complete(extension)`, keep the `beam` best (ties: lexicographic). Returns the
    final beam (complete patterns, best first)."""
    if beam < 1:
        raise ConfigError(f"beam width must be >= 1, got {beam}")
    prefixes = [()]
    for d in range(space.n_layers):
        cands = [p + (c,) for p in prefixes for c in space.choices if space.can_extend(p, c)]
        full = [space.complete(c) for c in cands]
        losses = ev.evaluate(full)
        order = sorted(range(len(cands)), key=lambda i: (losses[i], cands[i]))
        prefixes = [cands[i] for i in order[:beam]]
        if log:
            log(f"beam depth {d + 1}/{space.n_layers}: {len(cands)} candidates, best {losses[order[0]]:.4f}, "
                f"{len(ev.patterns)} patterns evaluated")
    return prefixes


def search(sm: LayeredModel, batches, space: SearchSpace, *, max_patterns: int = 4096, beam: int = 16,
           share_prefix: bool = True, evaluator: PatternEvaluator | None = None, log=None) -> dict:
    """Enumerate the space (at most max_patterns patterns) or beam-search it; see the module docstring."""
    for c in space.choices:
        if c not in sm.choices:
            raise ConfigError(f"unknown choice '{c}' (choices: {', '.join(sm.choices)})")
    if space.n_layers != sm.n_layers:
        raise ConfigError(f"search space has {space.n_layers} layers, the model {sm.n_layers}")
    ev = evaluator or PatternEvaluator(sm, batches, share_prefix=share_prefix)
    n = space.count()
    if n <= max_patterns:
        method = "enumerate"
        ev.evaluate(list(space.enumerate()))
    else:
        method = "beam"
        beam_search(ev, space, beam, log)
    res = ev.result()
    res.update(method=method, space_size=n, n_evaluated=len(ev.patterns), beam=beam if method == "beam" else None,
               pattern_strings=ev.pattern_strings(), best_pattern_string=pattern_to_string(sm, res["best_pattern"]))
    res["_evaluator"] = ev
    return res

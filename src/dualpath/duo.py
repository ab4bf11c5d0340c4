"""Duo-LLM (Alizadeh et al., arXiv 2410.10846) on dualpath's backbone.

Every layer has attention, then one of three FFN choices per token: 0 = big (d_ffn_big), 1 = small
(d_ffn_small, default big/16), 2 = skip (identity; with skip_whole_layer the attention is bypassed too).
A routing decision is a tensor choice[layer, batch, position], supplied by a policy:

    random   per token or per sequence, with probabilities p_big, p_small, p_skip (training, stage 1)
    pattern  a string such as "BBSSBSBS", one letter per layer (B big, S small, X skip), for every token
    mask     an explicit tensor, passed as Overrides(duo_choice=...) (oracles, stage 2)
    router   a learned linear router per layer on the layer input (stage 3): P_big = σ(logit / τ)

Routing gathers the tokens of each choice and runs each module only on its own tokens, then scatters
them back, so a small or skipped token really costs less; `realised_flops` counts what a batch spent.
The learned router is trained soft (a P_big-weighted mixture of both FFNs, with τ annealed towards 0 so
the mixture approaches hard decisions) and evaluated hard (big where P_big > 0.5).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import ModelConfig
from .errors import ConfigError

BIG, SMALL, SKIP = 0, 1, 2
LETTERS = {"B": BIG, "S": SMALL, "X": SKIP}
NAMES = ("big", "small", "skip")


def parse_pattern(pattern: str, n_layers: int) -> list[int]:
    """'BBSX' -> [0, 0, 1, 2]. One letter per layer: B big, S small, X skip."""
    p = pattern.strip().upper()
    if len(p) != n_layers:
        raise ConfigError(f"routing pattern '{pattern}' has {len(p)} letters but the model has {n_layers} layers")
    bad = sorted({c for c in p if c not in LETTERS})
    if bad:
        raise ConfigError(f"routing pattern '{pattern}' has unknown choice letter(s) {', '.join(bad)} "
                          "(use B for big, S for small, X for skip)")
    return [LETTERS[c] for c in p]


def pattern_string(choices) -> str:
    inv = {v: k for k, v in LETTERS.items()}
    return "".join(inv[int(c)] for c in choices)


class DuoLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        from .model import Attention, RMSNorm, SwiGLU

        super().__init__()
        self.cfg, self.index = cfg, index
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn_big = SwiGLU(cfg.d_model, cfg.d_ffn_big, cfg.ffn_multiple)
        self.ffn_small = SwiGLU(cfg.d_model, cfg.small_width(), cfg.ffn_multiple)
        self.router = nn.Linear(cfg.d_model, 1, bias=True)
        self.router_temperature = cfg.router_temperature  # annealed by the router trainer
        self.router_hard = cfg.router_hard
        self._pattern = parse_pattern(cfg.duo_pattern, cfg.n_layers) if cfg.duo_policy == "pattern" else None

    @torch.no_grad()
    def reset_routing_parameters(self):
        nn.init.zeros_(self.router.weight)
        nn.init.zeros_(self.router.bias)

    # -- routing -------------------------------------------------------------------------------

    def p_big(self, x):
        return torch.sigmoid(self.router(x).squeeze(-1) / self.router_temperature)

    def choose(self, x, ov) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(choice (B, T) long, or None for a soft mixture; P_big (B, T) for the router policy)."""
        B, T, _ = x.shape
        if ov.duo_choice is not None:
            return ov.duo_choice[self.index].to(x.device), None
        cfg = self.cfg
        if cfg.duo_policy == "pattern":
            return torch.full((B, T), self._pattern[self.index], dtype=torch.long, device=x.device), None
        if cfg.duo_policy == "router":
            p = self.p_big(x)
            if self.router_hard:
                return torch.where(p > 0.5, BIG, SMALL), p
            return None, p
        shape = (B, T) if cfg.duo_granularity == "token" else (B, 1)
        u = torch.rand(shape, device=x.device)
        choice = torch.where(u < cfg.p_big, BIG, torch.where(u < cfg.p_big + cfg.p_small, SMALL, SKIP))
        return choice.expand(B, T), None

    def forward(self, x, rope, ov, cache=None, diag=None):
        choice, p = self.choose(x, ov)
        key = (self.index, "duo", 0)
        h = x + self.attn(self.attn_norm(x), rope, cache, key)
        if choice is not None and self.cfg.skip_whole_layer:
            h = torch.where((choice == SKIP).unsqueeze(-1), x, h)
        z = self.ffn_norm(h)
        if choice is None:  # soft router: both FFNs on every token, mixed by P_big
            y = h + p.unsqueeze(-1) * self.ffn_big(z) + (1 - p).unsqueeze(-1) * self.ffn_small(z)
        else:
            y = h.reshape(-1, h.shape[-1]).clone()
            flat_z, flat_c = z.reshape(-1, z.shape[-1]), choice.reshape(-1)
            for module, c in ((self.ffn_big, BIG), (self.ffn_small, SMALL)):
                rows = (flat_c == c).nonzero().squeeze(1)
                if rows.numel():
                    y = y.index_add(0, rows, module(flat_z.index_select(0, rows)))
            y = y.view_as(h)
        if diag is not None:
            if choice is not None:
                diag["duo_choice"] = choice
            if p is not None:
                diag["p_big"] = p
        return y

    # -- accounting ----------------------------------------------------------------------------

    def module_flops(self, seq_len: int, convention: str = "true") -> dict[str, float]:
        """FLOPs per token of each part, from the modules' own accounting."""
        return {"attn": self.attn.flops_per_token(seq_len, convention),
                "big": self.ffn_big.flops_per_token(seq_len, convention),
                "small": self.ffn_small.flops_per_token(seq_len, convention),
                "router": 0.0 if convention == "paper" else 2.0 * self.cfg.d_model}

    def flops_per_token(self, seq_len: int, convention: str = "true", K=None) -> float:
        """Expected FLOPs per token under the configured policy (realised_flops counts a real batch)."""
        f = self.module_flops(seq_len, convention)
        cfg = self.cfg
        if cfg.duo_policy == "pattern":
            c = self._pattern[self.index]
            probs = [float(c == BIG), float(c == SMALL), float(c == SKIP)]
        elif cfg.duo_policy == "router":
            probs = [1.0, 1.0, 0.0] if not self.router_hard else [0.5, 0.5, 0.0]
        else:
            probs = [cfg.p_big, cfg.p_small, cfg.p_skip]
        attn = f["attn"] * (1 - probs[SKIP] if cfg.skip_whole_layer else 1.0)
        router = f["router"] if cfg.duo_policy == "router" else 0.0
        return attn + probs[BIG] * f["big"] + probs[SMALL] * f["small"] + router


def realised_flops(model, choice: torch.Tensor, seq_len: int, convention: str = "true",
                   with_router: bool = False) -> float:
    """Forward FLOPs a batch routed by choice (L, B, T) really spends, including the LM head (true)."""
    total = 0.0
    n_tokens = choice[0].numel()
    for layer, c in zip(model.layers, choice):
        f = layer.module_flops(seq_len, convention)
        n_big, n_small, n_skip = (int((c == k).sum()) for k in (BIG, SMALL, SKIP))
        attn_tokens = n_tokens - n_skip if layer.cfg.skip_whole_layer else n_tokens
        total += attn_tokens * f["attn"] + n_big * f["big"] + n_small * f["small"]
        total += n_tokens * f["router"] if with_router else 0.0
    if convention == "true":
        total += n_tokens * 2.0 * model.cfg.d_model * model.cfg.vocab_size
    return total

"""The Dual-Path language model (Frey, Shomali, Koehler, Ali; arXiv 2605.30202), its baselines, and Duo-LLM.

Read top to bottom against the paper:

    Φ(x; s)      base block        u = x + s·Attn(RMSNorm(x));  Φ = u + s·FFN(RMSNorm(u))
    wide         PureWide layer    y = Φ_wide(x; softplus(β))
    loop         PureLoop layer    hᵏ = Φ_deep(hᵏ⁻¹; softplus(a_k)), ACT halting mixture over the K steps
    dual         Dual-Path layer   y = g_d ⊙ h_deep + g_w ⊙ h_wide,  (g_d, g_w) = σ(x·W_g + b_g)
    duo          Duo-LLM layer     attention, then a per-token choice of big FFN, small FFN or skip

Every module reports its own FLOPs per token (`flops_per_token(seq_len, convention)`) and the model sums
them. Conventions:
  * "paper": per layer, projections only (attention 4d² + 4d²/n_rep, SwiGLU 6·d·hidden, gate 4d); the
    model's number is the sum over layers, without the LM head.
  * "true":  every matmul of the forward pass: projections, attention scores and values over the full T×T
    score matrix (no causal halving, as FlopCounterMode and the PaLM MFU convention count it), halting
    routers, gates, and the LM head. Training costs 3× forward.

The model code is written for one device and knows nothing of training, files or the CLI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig

CONVENTIONS = ("paper", "true")


def swiglu_hidden(d_ffn: int, multiple: int) -> int:
    """The SwiGLU hidden width actually built for a configured width d_ffn."""
    return multiple * math.ceil((2 * d_ffn // 3) / multiple)


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown FLOP convention '{convention}', expected one of {CONVENTIONS}")


# ----------------------------------------------------------------------------------------------
# Inference-time overrides (the paper's ablations). The default instance changes nothing.


@dataclass
class Overrides:
    """Inference overrides. All None means the model as trained, at no extra cost.

    K:            run the deep path for this many steps (<= max_loops).
    gates:        "deep-only" (1, 0), "wide-only" (0, 1), "both=C" (C, C) or "shuffled" (gates permuted
                  across all tokens of the batch, per layer).
    token_mask:   bool (B, T); where True, the gates are forced to `token_mask_to`.
    token_mask_to "deep" or "wide".
    layer_choice: per-layer list of None | "learned" | "deep-favoured" | "wide-favoured"; the favoured
                  choices keep g_d + g_w and move all of it to one path (used by the routing search).
    duo_choice:   Duo-LLM routing, long tensor (n_layers, B, T) of 0=big, 1=small, 2=skip.
    seed:         seed of the gate shuffle.
    """

    K: int | None = None
    gates: str | None = None
    token_mask: torch.Tensor | None = None
    token_mask_to: str = "wide"
    layer_choice: list | None = None
    duo_choice: torch.Tensor | None = None
    seed: int = 0

    def gate_constants(self) -> tuple[float, float] | None:
        if self.gates in (None, "shuffled"):
            return None
        if self.gates == "deep-only":
            return (1.0, 0.0)
        if self.gates == "wide-only":
            return (0.0, 1.0)
        if self.gates.startswith("both="):
            c = float(self.gates.split("=", 1)[1])
            return (c, c)
        raise ValueError(f"unknown gate override '{self.gates}' (deep-only, wide-only, both=C, shuffled)")


NO_OVERRIDES = Overrides()


# ----------------------------------------------------------------------------------------------
# KV cache: one (k, v) buffer per attention call site (per layer, per path, per loop step).


class KVCache:
    """Preallocated key/value buffers, addressed by a call-site key such as (layer, "deep", step)."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.pos = 0  # tokens already in the cache
        self.buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key: tuple, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, T, D = k.shape
        if key not in self.buffers:
            shape = (B, H, self.max_len, D)
            self.buffers[key] = (k.new_zeros(shape), v.new_zeros(shape))
        kb, vb = self.buffers[key]
        kb[:, :, self.pos:self.pos + T] = k
        vb[:, :, self.pos:self.pos + T] = v
        return kb[:, :, :self.pos + T], vb[:, :, :self.pos + T]


# ----------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.RMSNorm):
    def flops_per_token(self, seq_len: int, convention: str = "true") -> float:
        return 0.0  # elementwise, not a matmul


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]); x is (B, H, T, D), cos/sin are (T, D/2)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    """Causal GQA attention with RoPE and optional QK-norm (RMSNorm over the head dim, after RoPE)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.d_model, self.n_heads, self.n_kv_heads = cfg.d_model, cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.n_rep = cfg.n_heads // cfg.n_kv_heads
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x, rope, cache: KVCache | None = None, cache_key: tuple | None = None):
        B, T, _ = x.shape
        cos, sin = rope
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.update(cache_key, k, v)
        if self.n_rep > 1:
            k = k.repeat_interleave(self.n_rep, dim=1)
            v = v.repeat_interleave(self.n_rep, dim=1)
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # a chunk after a prefix: query i sees keys up to past + i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def flops_per_token(self, seq_len: int, convention: str = "true") -> float:
        _check_convention(convention)
        d, kv = self.d_model, self.n_kv_heads * self.head_dim
        proj = 2 * d * d * 2 + 2 * d * kv * 2  # = 4d² + 4d²/n_rep
        if convention == "paper":
            return float(proj)
        # QKᵀ and AV over all seq_len keys (no causal halving).
        return float(proj + 2 * 2 * self.n_heads * self.head_dim * seq_len)


class SwiGLU(nn.Module):
    """FFN(x) = W2(silu(W1 x) ⊙ W3 x), hidden = m·ceil(floor(2·d_ffn/3)/m)."""

    def __init__(self, d_model: int, d_ffn: int, multiple: int):
        super().__init__()
        self.d_model, self.d_ffn = d_model, d_ffn
        self.hidden = swiglu_hidden(d_ffn, multiple)
        self.w1 = nn.Linear(d_model, self.hidden, bias=False)
        self.w3 = nn.Linear(d_model, self.hidden, bias=False)
        self.w2 = nn.Linear(self.hidden, d_model, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    @staticmethod
    def flops(d_model: int, hidden: int) -> float:
        return 6.0 * d_model * hidden

    def flops_per_token(self, seq_len: int, convention: str = "true") -> float:
        _check_convention(convention)
        return self.flops(self.d_model, self.hidden)


def _residual(x, s, f):
    """x + s·f in one kernel (addcmul) when the gain is a tensor; eager CPU mode fuses nothing itself."""
    return torch.addcmul(x, f, s) if torch.is_tensor(s) else torch.add(x, f, alpha=s)


class Block(nn.Module):
    """Φ(x; s): u = x + s·Attn(RMSNorm(x)); Φ = u + s·FFN(RMSNorm(u)). The gain s is passed in."""

    def __init__(self, cfg: ModelConfig, d_ffn: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, d_ffn, cfg.ffn_multiple)

    def forward(self, x, s, rope, cache=None, cache_key=None):
        u = _residual(x, s, self.attn(self.attn_norm(x), rope, cache, cache_key))
        return _residual(u, s, self.ffn(self.ffn_norm(u)))

    def flops_per_token(self, seq_len: int, convention: str = "true") -> float:
        return self.attn.flops_per_token(seq_len, convention) + self.ffn.flops_per_token(seq_len, convention)


class HaltingRouter(nn.Module):
    """q_k = σ(Linear_{d+1→1}([hᵏ ; k'/(K−1)])), one router shared by the steps of a layer.

    The time feature enters through the last weight column, which avoids concatenating a feature
    onto every hidden state while computing exactly the same linear map.
    """

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model
        self.weight = nn.Parameter(torch.empty(1, d_model + 1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, h, t: float):
        w = self.weight[0]
        return torch.sigmoid(h @ w[:-1] + t * w[-1] + self.bias)

    def flops_per_token(self, seq_len: int, convention: str = "true") -> float:
        _check_convention(convention)
        return 0.0 if convention == "paper" else 2.0 * (self.d_model + 1)


class LoopPath(nn.Module):
    """The deep sublayer: one block Φ_deep re-applied K times with shared weights, mixed by ACT halting.

    h⁰ = x,  hᵏ = Φ_deep(hᵏ⁻¹; softplus(a_k)),  π_k = Π_{j<k}(1 − q_j),
    h_deep = Σ_{k<K} π_k q_k hᵏ + π_K h^K.   (The last step takes the remaining mass, so q_K is not needed.)
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.K, self.max_loops = cfg.K, cfg.max_loops
        self.block = Block(cfg, cfg.d_ffn_deep)
        self.step_gain = nn.Parameter(torch.full((cfg.max_loops,), float(cfg.branch_scale_init)))  # a_k
        self.halt = HaltingRouter(cfg.d_model)

    def forward(self, x, rope, K=None, cache=None, layer=0, diag: dict | None = None):
        K = K or self.K
        gains = F.softplus(self.step_gain[:K])
        h, remaining = x, None  # remaining = π_k, the mass not yet halted
        out = None
        halt_weights, halt_probs = [], []
        for k in range(K):
            h = self.block(h, gains[k], rope, cache, (layer, "deep", k))
            if k == K - 1:
                w = remaining if remaining is not None else torch.ones_like(h[..., 0])
            else:
                q = self.halt(h, k / (K - 1))
                if diag is not None:
                    halt_probs.append(q)
                w = q if remaining is None else remaining * q
                remaining = (1 - q) if remaining is None else remaining * (1 - q)
            out = w.unsqueeze(-1) * h if out is None else torch.addcmul(out, w.unsqueeze(-1), h)
            if diag is not None:
                halt_weights.append(w)
        if diag is not None:
            hw = torch.stack(halt_weights, dim=-1)  # (B, T, K)
            diag["halt_weights"] = hw
            diag["halt_probs"] = torch.stack(halt_probs, dim=-1) if halt_probs else hw[..., :0]
            diag["expected_steps"] = (hw * torch.arange(1, K + 1, device=hw.device, dtype=hw.dtype)).sum(-1)
            diag["step_gains"] = gains.detach()
        return out

    def expected_steps(self, x, rope, K=None):
        diag = {}
        self.forward(x, rope, K=K, diag=diag)
        return diag["expected_steps"]

    def flops_per_token(self, seq_len: int, convention: str = "true", K: int | None = None) -> float:
        K = K or self.K
        return K * self.block.flops_per_token(seq_len, convention) + (K - 1) * self.halt.flops_per_token(
            seq_len, convention)


class WidePath(nn.Module):
    """The wide sublayer: its own attention and an enlarged SwiGLU, applied once with gain softplus(β)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.block = Block(cfg, cfg.d_ffn_wide)
        self.beta = nn.Parameter(torch.full((1,), float(cfg.branch_scale_init))) if cfg.wide_gain else None  # 1-D for FSDP2

    def gain(self):
        return F.softplus(self.beta) if self.beta is not None else 1.0

    def forward(self, x, rope, cache=None, layer=0):
        return self.block(x, self.gain(), rope, cache, (layer, "wide", 0))

    def flops_per_token(self, seq_len: int, convention: str = "true") -> float:
        return self.block.flops_per_token(seq_len, convention)


class Gate(nn.Module):
    """(ℓ_d, ℓ_w) = x·W_g + b_g on the raw layer input; two_gates: g = σ(ℓ) independently.

    convex: one logit, g_w = 1 − g_d.  softmax: softmax over the two logits.  fixed: constants.
    W_g and b_g start at zero, so every gate starts at 0.5.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mode, self.d_model = cfg.gate_mode, cfg.d_model
        n_logits = {"two_gates": 2, "softmax": 2, "convex": 1, "fixed": 0}[self.mode]
        self.fixed = (cfg.fixed_gate_deep, cfg.fixed_gate_wide)
        if n_logits:
            self.W_g = nn.Parameter(torch.zeros(cfg.d_model, n_logits))
            self.b_g = nn.Parameter(torch.zeros(n_logits))

    def forward(self, x):
        if self.mode == "fixed":
            ones = torch.ones_like(x[..., 0])
            return ones * self.fixed[0], ones * self.fixed[1]
        logits = x @ self.W_g + self.b_g
        if self.mode == "two_gates":
            g = torch.sigmoid(logits)
            return g[..., 0], g[..., 1]
        if self.mode == "softmax":
            g = torch.softmax(logits, dim=-1)
            return g[..., 0], g[..., 1]
        g_d = torch.sigmoid(logits[..., 0])
        return g_d, 1 - g_d

    def flops_per_token(self, seq_len: int, convention: str = "true") -> float:
        _check_convention(convention)
        return 2.0 * self.d_model * (self.W_g.shape[1] if self.mode != "fixed" else 0)


# ----------------------------------------------------------------------------------------------
# Layers: one per architecture. Each takes (x, rope, overrides, cache, diag) and returns y.


class WideLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.wide = WidePath(cfg)

    def forward(self, x, rope, ov: Overrides, cache=None, diag=None):
        y = self.wide(x, rope, cache, self.index)
        if diag is not None:
            diag["delta_norm_wide"] = (y - x).norm(dim=-1)
        return y

    def flops_per_token(self, seq_len, convention="true", K=None):
        return self.wide.flops_per_token(seq_len, convention)


class LoopLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.deep = LoopPath(cfg)

    def forward(self, x, rope, ov: Overrides, cache=None, diag=None):
        y = self.deep(x, rope, ov.K, cache, self.index, diag)
        if diag is not None:
            diag["delta_norm_deep"] = (y - x).norm(dim=-1)
        return y

    def flops_per_token(self, seq_len, convention="true", K=None):
        return self.deep.flops_per_token(seq_len, convention, K)


class DualLayer(nn.Module):
    """y = g_d ⊙ h_deep + g_w ⊙ h_wide. Both paths are full residual states, so at init y ≈ x."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.deep = LoopPath(cfg)
        self.wide = WidePath(cfg)
        self.gate = Gate(cfg)

    def gates(self, x, ov: Overrides):
        g_d, g_w = self.gate(x)
        const = ov.gate_constants()
        if const is not None:
            g_d, g_w = torch.full_like(g_d, const[0]), torch.full_like(g_w, const[1])
        elif ov.gates == "shuffled":
            gen = torch.Generator(device="cpu").manual_seed(ov.seed * 1000003 + self.index)
            perm = torch.randperm(g_d.numel(), generator=gen).to(g_d.device)
            g_d = g_d.reshape(-1)[perm].view_as(g_d)
            g_w = g_w.reshape(-1)[perm].view_as(g_w)
        choice = ov.layer_choice[self.index] if ov.layer_choice is not None else None
        if choice in ("deep-favoured", "wide-favoured"):
            total = g_d + g_w
            zero = torch.zeros_like(total)
            g_d, g_w = (total, zero) if choice == "deep-favoured" else (zero, total)
        elif choice not in (None, "learned"):
            raise ValueError(f"unknown layer choice '{choice}'")
        if ov.token_mask is not None:
            m = ov.token_mask.to(device=g_d.device, dtype=torch.bool)
            to_deep = ov.token_mask_to == "deep"
            g_d = torch.where(m, torch.full_like(g_d, 1.0 if to_deep else 0.0), g_d)
            g_w = torch.where(m, torch.full_like(g_w, 0.0 if to_deep else 1.0), g_w)
        return g_d, g_w

    def forward(self, x, rope, ov: Overrides, cache=None, diag=None):
        g_d, g_w = self.gates(x, ov)
        # A path whose gate is a constant zero is skipped, unless a cache or diagnostics need it.
        const = ov.gate_constants()
        need_all = diag is not None or cache is not None
        h_deep = self.deep(x, rope, ov.K, cache, self.index, diag) if need_all or not const or const[0] else None
        h_wide = self.wide(x, rope, cache, self.index) if need_all or not const or const[1] else None
        y = g_d.unsqueeze(-1) * h_deep if h_deep is not None else torch.zeros_like(x)
        if h_wide is not None:
            y = torch.addcmul(y, g_w.unsqueeze(-1), h_wide)
        if diag is not None:
            dd, dw = h_deep - x, h_wide - x
            diag["gate_deep"], diag["gate_wide"] = g_d, g_w
            diag["delta_norm_deep"], diag["delta_norm_wide"] = dd.norm(dim=-1), dw.norm(dim=-1)
            diag["cos_deep_wide"] = F.cosine_similarity(dd, dw, dim=-1)
            diag["wide_gain"] = torch.as_tensor(self.wide.gain()).detach()
        return y

    def flops_per_token(self, seq_len, convention="true", K=None):
        return (self.deep.flops_per_token(seq_len, convention, K) + self.wide.flops_per_token(seq_len, convention)
                + self.gate.flops_per_token(seq_len, convention))


LAYERS = {"wide": WideLayer, "loop": LoopLayer, "dual": DualLayer}


@torch.no_grad()
def init_module(m: nn.Module, std: float, branch_scale_init: float) -> None:
    """The initial values of one module's own parameters (the paper's: gates 0.5, gains softplus(-7))."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=std)
    elif isinstance(m, nn.RMSNorm):
        nn.init.ones_(m.weight)
    elif isinstance(m, HaltingRouter):
        nn.init.normal_(m.weight, std=std)
        nn.init.zeros_(m.bias)
    elif isinstance(m, Gate) and m.mode != "fixed":
        nn.init.zeros_(m.W_g)
        nn.init.zeros_(m.b_g)
    elif isinstance(m, LoopPath):
        nn.init.constant_(m.step_gain, branch_scale_init)
    elif isinstance(m, WidePath) and m.beta is not None:
        nn.init.constant_(m.beta, branch_scale_init)
    elif hasattr(m, "reset_routing_parameters"):
        m.reset_routing_parameters()


# ----------------------------------------------------------------------------------------------
# The language model


@dataclass
class LMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    per_token_loss: torch.Tensor | None = None  # (B, T), 0 where the target is ignored
    aux_loss: torch.Tensor | None = None  # ponder penalty (already included in loss)
    diagnostics: list[dict] = field(default_factory=list)  # one dict of (B, T) tensors per layer


class DualPathLM(nn.Module):
    """Embedding → n_layers layers of one kind → RMSNorm → LM head (untied unless tie_embeddings)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.arch == "duo":
            from .duo import DuoLayer  # Duo-LLM lives in its own module

            self.layers = nn.ModuleList(DuoLayer(cfg, i) for i in range(cfg.n_layers))
        else:
            self.layers = nn.ModuleList(LAYERS[cfg.arch](cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = self._rope_tables(cfg.seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def _rope_tables(self, n: int):
        hd = self.cfg.head_dim
        inv_freq = 1.0 / (self.cfg.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        t = torch.arange(n, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        return freqs.cos(), freqs.sin()

    @torch.no_grad()
    def reset_parameters(self):
        if self.embed.weight.is_meta:
            return
        cos, sin = self._rope_tables(self.cfg.seq_len)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        # post-order (children first), so a layer can override the default init of its own router
        self.apply(lambda m: init_module(m, self.cfg.init_std, self.cfg.branch_scale_init))

    def forward(self, idx, targets=None, *, overrides: Overrides | None = None, return_per_token_loss=False,
                return_diagnostics=False, cache: KVCache | None = None) -> LMOutput:
        B, T = idx.shape
        ov = overrides or NO_OVERRIDES
        if ov.K is not None and not 1 <= ov.K <= self.cfg.max_loops:
            raise ValueError(f"forced K={ov.K} is outside 1..max_loops={self.cfg.max_loops}")
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.seq_len:
            raise ValueError(f"sequence of {start + T} tokens is longer than the context ({self.cfg.seq_len})")
        rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        x = self.embed(idx)
        diagnostics = []
        ponder = []
        for layer in self.layers:
            diag = {} if (return_diagnostics or self._wants_ponder(targets)) else None
            x = layer(x, rope, ov, cache, diag)
            if diag is not None:
                if "expected_steps" in diag:
                    ponder.append(diag["expected_steps"])
                if return_diagnostics:
                    diagnostics.append(diag)
        if cache is not None:
            cache.pos += T
        logits = self.lm_head(self.norm(x))
        out = LMOutput(logits=logits, diagnostics=diagnostics)
        if targets is not None:
            per_tok = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                      ignore_index=-1, reduction="none").view(B, T)
            n = (targets != -1).sum().clamp(min=1)
            out.loss = per_tok.sum() / n
            if self._wants_ponder(targets) and ponder:
                out.aux_loss = self.cfg.ponder_weight * torch.stack([p.mean() for p in ponder]).mean()
                out.loss = out.loss + out.aux_loss
            if return_per_token_loss:
                out.per_token_loss = per_tok
        return out

    def _wants_ponder(self, targets) -> bool:
        return targets is not None and self.cfg.ponder_weight > 0 and self.cfg.arch in ("loop", "dual")

    @torch.no_grad()
    def summary_metrics(self, idx) -> dict[str, float]:
        """Per-layer means of the gates and expected loop steps on a batch, for the training log."""
        out = self(idx, return_diagnostics=True)
        rec = {}
        for i, diag in enumerate(out.diagnostics):
            for key in ("gate_deep", "gate_wide", "expected_steps"):
                if key in diag:
                    rec[f"{key}/{i}"] = diag[key].float().mean().item()
        return rec

    # -- accounting ------------------------------------------------------------------------------

    def flops_per_token(self, seq_len: int | None = None, convention: str = "true", K: int | None = None) -> float:
        """Forward FLOPs per token. paper: sum over layers of projections; true: all matmuls incl. head."""
        _check_convention(convention)
        T = seq_len or self.cfg.seq_len
        total = sum(layer.flops_per_token(T, convention, K) for layer in self.layers)
        if convention == "true":
            total += 2.0 * self.cfg.d_model * self.cfg.vocab_size
        return float(total)

    def train_flops_per_token(self, seq_len: int | None = None) -> float:
        return 3.0 * self.flops_per_token(seq_len, "true")

    def param_counts(self) -> dict[str, int]:
        """Total, non-embedding and per-part parameter counts (shared tensors counted once)."""
        parts = {"embeddings": 0, "deep": 0, "wide": 0, "gates": 0, "routers": 0, "duo": 0, "other": 0}
        seen = set()
        for name, p in self.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel()
            if name.startswith(("embed.", "lm_head.")):
                parts["embeddings"] += n
            elif ".deep.halt." in name or ".router." in name:
                parts["routers"] += n
            elif ".deep." in name:
                parts["deep"] += n
            elif ".wide." in name:
                parts["wide"] += n
            elif ".gate." in name:
                parts["gates"] += n
            elif name.startswith("layers.") and self.cfg.arch == "duo":
                parts["duo"] += n
            else:
                parts["other"] += n
        total = sum(parts.values())
        return {"total": total, "non_embedding": total - parts["embeddings"], **parts}

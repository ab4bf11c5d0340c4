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

from .errors import ConfigError, check_one_of as _one_of

CONVENTIONS = ("paper", "true")
ARCHS = ("wide", "loop", "dual", "duo")
GATE_MODES = ("two_gates", "convex", "softmax", "fixed")
INITS = ("scaled", "plain")


@dataclass
class ModelConfig:
    """The backbone and the architecture. Names follow the Dual-Path paper (arXiv 2605.30202)."""

    arch: str = "dual"  # wide | loop | dual | duo
    vocab_size: int = 50304
    d_model: int = 768
    n_layers: int = 16
    n_heads: int = 12
    n_kv_heads: int = 12
    seq_len: int = 4096  # longest context; RoPE tables are built for it
    rope_base: float = 500000.0
    qk_norm: bool = True
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # scaled (the authors' reference): residual output projections (attention out, SwiGLU down, in every
    # block: deep, wide, duo) start at init_std / sqrt(2 * n_layers); plain: init_std everywhere.
    init: str = "scaled"
    # Configured SwiGLU widths (before the 2/3 reduction); the built hidden width is
    # ffn_multiple * ceil(floor(2*d_ffn/3) / ffn_multiple).
    d_ffn_deep: int = 0  # loop and dual
    d_ffn_wide: int = 0  # wide and dual
    ffn_multiple: int = 256
    # Branch gains s = softplus(beta) (wide) and softplus(a_k) (per loop step).
    branch_scale_init: float = -7.0
    wide_gain: bool = True  # False: plain transformer block, s = 1
    K: int = 4  # loop steps of the deep path
    max_loops: int = 16  # step gains kept, so K can be raised at inference
    ponder_weight: float = 0.0  # weight of the expected-steps penalty
    gate_mode: str = "two_gates"  # two_gates | convex | softmax | fixed
    fixed_gate_deep: float = 0.5  # gate_mode=fixed
    fixed_gate_wide: float = 0.5
    # Duo-LLM (arch=duo): big/small FFN per layer, or skip.
    d_ffn_big: int = 0
    d_ffn_small: int = 0  # 0: d_ffn_big // 16
    skip_whole_layer: bool = False  # skip bypasses attention too
    duo_policy: str = "random"  # random | pattern | router (a mask is passed at call time)
    duo_granularity: str = "token"  # random policy: token | sequence
    p_big: float = 0.5
    p_small: float = 0.5
    p_skip: float = 0.0
    duo_pattern: str = ""  # pattern policy: one letter per layer, B(ig) S(mall) X (skip)
    router_temperature: float = 1.0  # router policy: P_big = σ(logit / τ); hard decisions when router_hard
    router_hard: bool = True
    router_choices: str = "bs"  # what a router may choose: bs (big | small) or bsx (big | small | skip)
    router_input: str = "pre"  # pre: attn_norm(layer input); post: ffn_norm(after attention), what the FFN sees
    router_hidden: int = 0  # 0: a linear router; > 0: an MLP d_model -> router_hidden -> choices (GELU)

    def validate(self) -> "ModelConfig":
        _one_of("model.arch", self.arch, ARCHS)
        _one_of("model.gate_mode", self.gate_mode, GATE_MODES)
        _one_of("model.init", self.init, INITS)
        if not self.init_std > 0:
            raise ConfigError(f"model.init_std must be > 0, got {self.init_std}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "seq_len", "ffn_multiple"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"head dim d_model/n_heads={self.d_model // self.n_heads} must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_kv_heads={self.n_kv_heads} does not divide model.n_heads={self.n_heads}")
        if self.K < 1:
            raise ConfigError(f"model.K must be >= 1, got {self.K}")
        if self.max_loops < self.K:
            raise ConfigError(f"model.max_loops={self.max_loops} must be >= model.K={self.K}")
        if self.rope_base <= 0:
            raise ConfigError(f"model.rope_base must be > 0, got {self.rope_base}")
        if self.ponder_weight < 0:
            raise ConfigError(f"model.ponder_weight must be >= 0, got {self.ponder_weight}")
        need = {"wide": ("d_ffn_wide",), "loop": ("d_ffn_deep",), "dual": ("d_ffn_deep", "d_ffn_wide"),
                "duo": ("d_ffn_big",)}[self.arch]
        for name in need:
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1 for arch={self.arch}, got {getattr(self, name)}")
        if self.arch == "duo":
            if self.small_width() < 1:
                raise ConfigError(f"model.d_ffn_small must be >= 1, got {self.small_width()}")
            _one_of("model.duo_policy", self.duo_policy, ("random", "pattern", "router"))
            _one_of("model.duo_granularity", self.duo_granularity, ("token", "sequence"))
            probs = (self.p_big, self.p_small, self.p_skip)
            if min(probs) < 0 or abs(sum(probs) - 1) > 1e-6:
                raise ConfigError(f"model.p_big + p_small + p_skip must be 1 with each >= 0, got {probs}")
            if self.duo_policy == "pattern":
                parse_pattern(self.duo_pattern, self.n_layers)
            if self.router_temperature <= 0:
                raise ConfigError(f"model.router_temperature must be > 0, got {self.router_temperature}")
            _one_of("model.router_choices", self.router_choices, tuple(ROUTER_CHOICES))
            _one_of("model.router_input", self.router_input, ("pre", "post"))
            if self.router_hidden < 0:
                raise ConfigError(f"model.router_hidden must be >= 0, got {self.router_hidden}")
            if (self.duo_policy == "router" and self.router_input == "post" and self.skip_whole_layer
                    and self.router_choices == "bsx"):
                raise ConfigError("model.router_input=post decides after attention, so its skip cannot bypass "
                                  "attention (model.skip_whole_layer): use router_input=pre")
        return self

    def small_width(self) -> int:
        return self.d_ffn_small or self.d_ffn_big // 16

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def build(self, device: str | torch.device | None = None) -> "DualPathLM":
        """The model this config describes (OLMo-core style `Config.build()`)."""
        if device is None:
            return DualPathLM(self)
        with torch.device(device):
            return DualPathLM(self)

    # torchtitan-style: the config answers parameter and FLOP questions without allocating weights.
    def meta_model(self) -> "DualPathLM":
        return self.build("meta")

    def num_params(self) -> dict[str, int]:
        return self.meta_model().param_counts()

    def flops_per_token(self, seq_len: int | None = None, convention: str = "true") -> float:
        return self.meta_model().flops_per_token(seq_len or self.seq_len, convention=convention)


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
    """The paper's inference ablations. All None means the model as trained, at no extra cost.

    K:      run the deep path for this many steps (<= max_loops).
    extra_steps_gain: steps beyond the trained K use "last", the last trained step's gain (default: those
            steps' own gains were never trained and stay at softplus(-7), so they would do almost nothing),
            or "own", their own gains.
    gates:  the raw modes rescale the residual (both paths contain x, so g_d + g_w changes):
              "deep-only" (1, 0), "wide-only" (0, 1), "both=C" (C, C);
              "shuffled" (the (g_d, g_w) pairs permuted across all tokens of the batch, per layer, with
              `seed`: each token gets another token's sum, the paper's shuffle);
            the modes that hold g_d + g_w per token:
              "deep-favoured" (g_d + g_w, 0), "wide-favoured" (0, g_d + g_w), "swapped" (g_w, g_d),
              "share-shuffled" (each token keeps its g_d + g_w and takes the deep share g_d / (g_d + g_w)
              of a token drawn by a permutation of all tokens of the batch), "share-shuffled-seq" (of a
              token of the same sequence).

    adaptive: an AdaptivePolicy (early exit from the deep loop, gate-driven path skipping); None runs every
            step and both paths for every token.

    Per-layer choices (routing search, Duo masks, analysis hooks) are not overrides: they reach a layer
    through the `choices` argument of `DualPathLM.forward` (see "Layer choices" below).
    """

    K: int | None = None
    gates: str | None = None
    seed: int = 0
    extra_steps_gain: str = "last"
    adaptive: "AdaptivePolicy | None" = None  # adaptive depth at inference (see AdaptivePolicy)

    def gate_constants(self) -> tuple[float, float] | None:
        return None if self.gates is None or self.gates in GATE_MIXES else parse_gate_override(self.gates)

    def paths_off(self) -> tuple[bool, bool]:
        """(deep, wide): whether a gate mode gives that path a zero gate for every token."""
        const = self.gate_constants()
        if const is not None:
            return const[0] == 0, const[1] == 0
        return self.gates == "wide-favoured", self.gates == "deep-favoured"


# Gate modes that move, swap or permute the learned gates, keeping g_d + g_w per token (see Overrides).
GATE_MIXES = ("deep-favoured", "wide-favoured", "swapped", "share-shuffled", "share-shuffled-seq", "shuffled")


def parse_gate_override(text: str) -> tuple[float, float]:
    """(g_d, g_w) of a constant gate override: deep-only, wide-only or both=C with C in [0, 1]."""
    if text == "deep-only":
        return (1.0, 0.0)
    if text == "wide-only":
        return (0.0, 1.0)
    if text.startswith("both="):
        raw = text.split("=", 1)[1]
        try:
            c = float(raw)
        except ValueError:
            raise ConfigError(f"gate override '{text}': '{raw}' is not a number") from None
        if not 0 <= c <= 1:  # a gate is a sigmoid's value; C outside [0, 1] is not a gate setting
            raise ConfigError(f"gate override '{text}': C must be in [0, 1], got {raw}")
        return (c, c)
    raise ConfigError(f"unknown gate override '{text}' (deep-only, wide-only, both=C, {', '.join(GATE_MIXES)})")


def check_gate_override(text: str) -> str:
    """The override itself if valid (a constant mode or one of GATE_MIXES), else a ConfigError naming it."""
    if text not in GATE_MIXES:
        parse_gate_override(text)
    return text


def check_overrides(cfg: "ModelConfig", *, K: int | list[int] | None = None, gates: str | list[str] | None = None,
                    K_flag: str = "K", gates_flag: str = "gates") -> None:
    """The one check of inference overrides against a model's architecture (eval, generate, lm-eval, export
    tools): forced K needs a loop or dual model and lies in 1..max_loops; gate modes need a dual model and
    must parse. ConfigError naming the flag (`K_flag` / `gates_flag`, as the caller spells it)."""
    ks = [] if K is None else [K] if isinstance(K, int) else list(K)
    modes = [] if gates is None else [gates] if isinstance(gates, str) else list(gates)
    if ks and cfg.arch not in ("loop", "dual"):
        raise ConfigError(f"{K_flag} needs a loop or dual model; this one is {cfg.arch}")
    for k in ks:
        if not 1 <= k <= cfg.max_loops:
            raise ConfigError(f"{K_flag}={k} is outside 1..max_loops={cfg.max_loops} of this model")
    if modes and cfg.arch != "dual":
        raise ConfigError(f"{gates_flag} needs a dual model; this one is {cfg.arch}")
    for g in modes:
        try:
            check_gate_override(g)
        except ConfigError as e:
            raise ConfigError(f"{gates_flag}: {e}") from None


# ----------------------------------------------------------------------------------------------
# Layer choices: the one interface through which per-layer routing reaches a layer.
#
# `DualPathLM.forward(..., choices=[c_0, ..., c_{L-1}])` hands c_i to layer i; None is the layer as
# trained. What a layer accepts:
#   dual   "learned" | "deep-favoured" | "wide-favoured" (keep g_d + g_w per token, move it all to one
#          path) | TokenChoice(mask, "deep" | "wide") (force the gates of the masked tokens to (1, 0) / (0, 1))
#   duo    "big" | "small" | "skip", or a long tensor (B, T) of BIG / SMALL / SKIP codes
#   wide, loop: no choices.
# `layer.step_many(x, rope, choices)` returns the layer's output under several whole-batch choices from
# one input, computing what the siblings share once (the routing search's prefix sharing relies on it).


@dataclass
class TokenChoice:
    """A per-token choice: where `mask` (bool, B×T) is True the layer takes `choice`."""

    mask: torch.Tensor
    choice: str


DUAL_CHOICES = ("learned", "deep-favoured", "wide-favoured")


NO_OVERRIDES = Overrides()


# ----------------------------------------------------------------------------------------------
# Adaptive depth at inference (docs/ADAPTIVE.md)


@dataclass(frozen=True)
class AdaptivePolicy:
    """Per-token compute at inference. Every threshold None (or one that never triggers) is the full model.

    exit   ε: a token leaves the deep loop after step k < K once its remaining ACT halting mass
           π_{k+1} = Π_{j<=k}(1 − q_j) is below ε; step k then counts as its last step, so its deep output is
           the mixture so far plus all of π_k on hᵏ (the ACT mixture with the remaining mass on the current
           state). ε = 0 never exits; ε >= 1 always exits after the first step (forced K = 1).
    delta  δ (Huginn-style): a token also leaves once ‖hᵏ − hᵏ⁻¹‖ / ‖hᵏ⁻¹‖ < δ.
    deep   τ_d: a token with g_d < τ_d skips the deep path (h_deep = x: its update is zero).   (dual only)
    wide   τ_w: a token with g_w < τ_w skips the wide path (h_wide = x).                      (dual only)

    What attention sees: a token that does not run a step of a path (it exited the loop, or skipped the path)
    issues no query and runs no FFN there, but still offers that step's attention the keys and values of its
    last state (its exit state hᵏ, or the layer input x if it skipped), computed once. Every step's keys then
    exist at every position and depend only on that token, so a KV cache holds exactly what a full forward
    computes and cached generation equals uncached generation under the same policy.
    """

    exit: float | None = None
    deep: float | None = None
    wide: float | None = None
    delta: float | None = None

    KEYS = ("exit", "deep", "wide", "delta")

    def __post_init__(self):
        for key in self.KEYS:
            v = getattr(self, key)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"adaptive {key}={v!r} must be a number >= 0")

    @classmethod
    def parse(cls, text: str) -> "AdaptivePolicy":
        """'exit=0.1,deep=0.05,wide=0.05[,delta=0.01]' (',' ';' or '/' between the keys; 'none' or '' is the
        inert policy)."""
        values: dict[str, float] = {}
        for part in text.replace(";", ",").replace("/", ",").split(","):
            part = part.strip()
            if not part or part.lower() == "none":
                continue
            key, sep, raw = part.partition("=")
            key = key.strip()
            if not sep or key not in cls.KEYS:
                raise ConfigError(f"adaptive policy '{text}': '{part}' is not KEY=VALUE with KEY one of "
                                  f"{', '.join(cls.KEYS)}")
            if key in values:
                raise ConfigError(f"adaptive policy '{text}' sets {key} twice")
            try:
                values[key] = float(raw)
            except ValueError:
                raise ConfigError(f"adaptive policy '{text}': {key}='{raw.strip()}' is not a number") from None
        return cls(**values)

    def __str__(self) -> str:
        return ",".join(f"{k}={getattr(self, k):g}" for k in self.KEYS if getattr(self, k) is not None) or "none"

    def skips(self) -> bool:
        return self.deep is not None or self.wide is not None

    def check(self, cfg: "ModelConfig") -> "AdaptivePolicy":
        """ConfigError unless the architecture has what the policy acts on (a deep loop; gates for skipping)."""
        if cfg.arch not in ("loop", "dual"):
            raise ConfigError(f"an adaptive policy needs a loop or dual model; this one is {cfg.arch}")
        if self.skips() and cfg.arch != "dual":
            raise ConfigError(f"adaptive deep=/wide= skip by the Dual-Path gates; this model is {cfg.arch}")
        return self


class FlopTally:
    """The forward FLOPs a pass really executed ("true" convention: every matmul, attention over the keys each
    query was given), from the executed shapes, per (layer, part, step). Parts: deep (the loop's block), halt
    (its halting router: a vector product FlopCounterMode does not see), wide, gate, head (layer -1).
    Pass one as `DualPathLM.forward(..., flops=tally)`; it adds up over calls."""

    PARTS = ("deep", "halt", "wide", "gate", "head")

    def __init__(self):
        self.counts: dict[tuple[int, str, int], float] = {}
        self.tokens = 0  # positions run through the model

    def add(self, layer: int, part: str, step: int, flops: float) -> None:
        key = (layer, part, step)
        self.counts[key] = self.counts.get(key, 0.0) + float(flops)

    def total(self, parts: tuple[str, ...] | None = None) -> float:
        return sum(v for (_, part, _), v in self.counts.items() if parts is None or part in parts)

    def by_part(self) -> dict[str, float]:
        return {p: self.total((p,)) for p in self.PARTS}

    def per_token(self) -> dict[str, float]:
        """FLOPs per position: total, deep path (block and halting routers), and each part."""
        n = max(self.tokens, 1)
        return {"flops_per_token": self.total() / n, "deep_flops_per_token": self.total(("deep", "halt")) / n,
                **{f"{p}_flops_per_token": v / n for p, v in self.by_part().items()}}


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
    param_roles = {"weight": "norm"}

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
        self.wo.residual_projection = True  # writes into the residual stream: scaled init
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

    # -- a subset of the tokens (adaptive depth): flat token indices, rows = index // T, positions = index % T

    def kv_rows(self, xn, rows, pos, rope, kv) -> None:
        """Write the keys and values of normed states xn (F, d) of the tokens at (rows, pos) into
        kv = (k, v), each (B, n_kv_heads, T, head_dim), in place."""
        n = xn.shape[0]
        cos, sin = rope[0][pos].unsqueeze(1), rope[1][pos].unsqueeze(1)
        k = apply_rope(self.wk(xn).view(n, self.n_kv_heads, self.head_dim), cos, sin)
        if self.k_norm is not None:
            k = self.k_norm(k)
        kv[0][rows, :, pos] = k
        kv[1][rows, :, pos] = self.wv(xn).view(n, self.n_kv_heads, self.head_dim)

    def attend_rows(self, xn, rows, pos, rope, k, v, past: int = 0):
        """Attention output (A, d) of the queries of normed states xn (A, d) at (rows, pos), rows ascending,
        over k, v (B, n_kv_heads, past + T, head_dim): the query at pos sees the keys up to past + pos."""
        n = xn.shape[0]
        cos, sin = rope[0][pos].unsqueeze(1), rope[1][pos].unsqueeze(1)
        q = apply_rope(self.wq(xn).view(n, self.n_heads, self.head_dim), cos, sin)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.n_rep > 1:
            k = k.repeat_interleave(self.n_rep, dim=1)
            v = v.repeat_interleave(self.n_rep, dim=1)
        keys = torch.arange(k.shape[2], device=xn.device)
        out, start = [], 0
        for b, m in enumerate(torch.bincount(rows, minlength=k.shape[0]).tolist()):
            if m:  # one row at a time: exactly its queries against its keys, nothing padded
                qb = q[start:start + m].transpose(0, 1).unsqueeze(0)
                mask = keys.unsqueeze(0) <= (past + pos[start:start + m]).unsqueeze(1)
                out.append(F.scaled_dot_product_attention(qb, k[b:b + 1], v[b:b + 1], attn_mask=mask)[0].transpose(0, 1))
                start += m
        return self.wo(torch.cat(out).reshape(n, self.n_heads * self.head_dim))

    def flops(self, n_q: int, n_kv: int, n_scores: int) -> float:
        """True FLOPs of n_q queries (q and output projections), n_kv key/value projections and n_scores
        query-key pairs (QKᵀ and AV)."""
        d, kv = self.d_model, self.n_kv_heads * self.head_dim
        return float(2 * d * d * 2 * n_q + 2 * d * kv * 2 * n_kv + 2 * 2 * self.n_heads * self.head_dim * n_scores)

    def flops_per_token(self, seq_len: int, convention: str = "true") -> float:
        _check_convention(convention)
        # projections = 4d² + 4d²/n_rep; true: QKᵀ and AV over all seq_len keys (no causal halving)
        return self.flops(1, 1, 0 if convention == "paper" else seq_len)


def attend_fused(blocks, x, rope) -> list[torch.Tensor]:
    """[b.attn(b.attn_norm(x), rope) for b in blocks] without a cache, computed together: one normalisation
    (each norm's weight folded into its q/k/v rows), one q/k/v GEMM, one RoPE and one QK-norm pass, and one
    attention call over every block's heads side by side. The blocks' attentions share their shapes."""
    B, T, _ = x.shape
    attns = [b.attn for b in blocks]
    a, n = attns[0], len(blocks)
    H, Hkv, D = n * a.n_heads, n * a.n_kv_heads, a.head_dim
    norms = [b.attn_norm.weight for b in blocks]
    w = torch.cat([getattr(t, name).weight * g for name in ("wq", "wk", "wv") for t, g in zip(attns, norms)])
    qkv = F.linear(F.rms_norm(x, (x.shape[-1],), eps=blocks[0].attn_norm.eps), w)
    qk = qkv[..., :(H + Hkv) * D].view(B, T, H + Hkv, D)  # rows per head: every q head, then every k head
    qk = apply_rope(qk, rope[0].unsqueeze(1), rope[1].unsqueeze(1))
    if a.q_norm is not None:
        g = torch.cat([t.q_norm.weight.expand(a.n_heads, D) for t in attns]
                      + [t.k_norm.weight.expand(a.n_kv_heads, D) for t in attns])
        qk = F.rms_norm(qk, (D,), eps=a.q_norm.eps) * g
    q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)
    v = qkv[..., (H + Hkv) * D:].view(B, T, Hkv, D).transpose(1, 2)
    if a.n_rep > 1:  # query head j of block j // n_heads reads kv head j // n_rep of the same block
        k, v = k.repeat_interleave(a.n_rep, dim=1), v.repeat_interleave(a.n_rep, dim=1)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, H * D)
    width = a.n_heads * D
    return [t.wo(y[..., i * width:(i + 1) * width]) for i, t in enumerate(attns)]


class SwiGLU(nn.Module):
    """FFN(x) = W2(silu(W1 x) ⊙ W3 x), hidden = m·ceil(floor(2·d_ffn/3)/m)."""

    def __init__(self, d_model: int, d_ffn: int, multiple: int):
        super().__init__()
        self.d_model, self.d_ffn = d_model, d_ffn
        self.hidden = swiglu_hidden(d_ffn, multiple)
        self.w1 = nn.Linear(d_model, self.hidden, bias=False)
        self.w3 = nn.Linear(d_model, self.hidden, bias=False)
        self.w2 = nn.Linear(self.hidden, d_model, bias=False)
        self.w2.residual_projection = True

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

    fast = True  # False: the reference path (separate q/k/v, norm, RoPE), which equivalence tests compare to

    def forward(self, x, s, rope, cache=None, cache_key=None, attn=None):
        """attn: Attn(RMSNorm(x)) if already computed (attend_fused over several blocks reading x)."""
        if attn is None:
            attn = (attend_fused([self], x, rope)[0] if self.fast and cache is None
                    else self.attn(self.attn_norm(x), rope, cache, cache_key))
        u = _residual(x, s, attn)
        return _residual(u, s, self.ffn(self.ffn_norm(u)))

    def step_rows(self, h, s, run, run_mask, fresh, rope, T: int, kv, cache=None, cache_key=None):
        """Φ(·; s) of the tokens `run` (ascending flat indices into h, (N, d)) only: Φ's rows, (A, d). First the
        tokens `fresh` (⊇ run; run_mask marks run over all N) write the keys and values of their state into
        kv; every other position keeps the ones it holds (see AdaptivePolicy). With a cache, kv is this
        step's chunk and the queries also see the cached prefix."""
        xn = self.attn_norm(h[fresh])
        self.attn.kv_rows(xn, fresh // T, fresh % T, rope, kv)
        k, v = cache.update(cache_key, *kv) if cache is not None else kv
        if run.numel() == 0:
            return h[:0]
        x = h[run]
        a = self.attn.attend_rows(xn[run_mask[fresh]], run // T, run % T, rope, k, v, cache.pos if cache else 0)
        u = _residual(x, s, a)
        return _residual(u, s, self.ffn(self.ffn_norm(u)))

    def flops(self, n_q: int, n_kv: int, n_scores: int) -> float:
        """True FLOPs of n_q tokens through Φ, n_kv key/value projections and n_scores query-key pairs."""
        return self.attn.flops(n_q, n_kv, n_scores) + n_q * self.ffn.flops_per_token(0)

    def flops_per_token(self, seq_len: int, convention: str = "true") -> float:
        return self.attn.flops_per_token(seq_len, convention) + self.ffn.flops_per_token(seq_len, convention)


class HaltingRouter(nn.Module):
    """q_k = σ(Linear_{d+1→1}([hᵏ ; k'/(K−1)])), one router shared by the steps of a layer.

    The time feature enters through the last weight column, which avoids concatenating a feature
    onto every hidden state while computing exactly the same linear map.
    """

    param_roles = {"weight": "router", "bias": "router_bias"}

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

    param_part = "deep"
    param_roles = {"step_gain": "gain"}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.K, self.max_loops = cfg.K, cfg.max_loops
        self.block = Block(cfg, cfg.d_ffn_deep)
        self.step_gain = nn.Parameter(torch.full((cfg.max_loops,), float(cfg.branch_scale_init)))  # a_k
        self.halt = HaltingRouter(cfg.d_model)

    def step_gains(self, K: int, extra_steps_gain: str = "last") -> torch.Tensor:
        """softplus(a_k) for k < K; beyond the trained K, the last trained step's gain ("last") or their own."""
        gains = F.softplus(self.step_gain[:K])
        if K > self.K and extra_steps_gain == "last":
            gains = torch.cat([gains[:self.K], gains[self.K - 1:self.K].expand(K - self.K)])
        elif extra_steps_gain not in ("last", "own"):
            raise ValueError(f"extra_steps_gain must be last or own, got '{extra_steps_gain}'")
        return gains

    def forward(self, x, rope, K=None, cache=None, layer=0, diag: dict | None = None, extra_steps_gain="last",
                tally: FlopTally | None = None, attn0=None):
        """attn0: the first step's attention output, if computed with the wide path's (attend_fused)."""
        K = K or self.K
        gains = self.step_gains(K, extra_steps_gain)
        if tally is not None:
            n, keys = x.shape[0] * x.shape[1], x.shape[1] + (cache.pos if cache is not None else 0)
            for k in range(K):
                tally.add(layer, "deep", k, self.block.flops(n, n, n * keys))
                if k < K - 1:
                    tally.add(layer, "halt", k, n * self.halt.flops_per_token(0))
        h, remaining = x, None  # remaining = π_k, the mass not yet halted
        out = None
        halt_weights, halt_probs = [], []
        for k in range(K):
            h = self.block(h, gains[k], rope, cache, (layer, "deep", k), attn0 if k == 0 else None)
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

    def forward_adaptive(self, x, rope, policy: AdaptivePolicy, run=None, K=None, cache=None, layer=0,
                         diag: dict | None = None, extra_steps_gain="last", tally: FlopTally | None = None):
        """The loop under an adaptive policy (early exit; see AdaptivePolicy). run: (B, T) bool, the tokens that
        take the path (None: all); the others get h_deep = x. Only running tokens go through the block
        (gather, scatter). While every token runs, each step is exactly `forward`'s."""
        K = K or self.K
        B, T, d = x.shape
        N = B * T
        gains = self.step_gains(K, extra_steps_gain)
        past = cache.pos if cache is not None else 0
        active = torch.ones(N, dtype=torch.bool, device=x.device) if run is None else run.reshape(N).clone()
        newly = ~active  # tokens whose last state's keys/values the next step must write
        h, out, remaining, kv = x, None, None, None  # dense (B, T, ...) until a token leaves, then flat (N, ...)
        steps = torch.zeros(N, dtype=torch.long, device=x.device)
        weights = x.new_zeros(N, K) if diag is not None else None
        probs = x.new_full((N, max(K - 1, 0)), math.nan) if diag is not None else None
        k = 0
        for k in range(K):
            if not bool(active.any()):
                break
            if kv is None and not bool(newly.any()):  # every token runs: the full step
                idx, prev = None, h
                cur = self.block(h, gains[k], rope, cache, (layer, "deep", k))
                n_run = n_fresh = N
            else:
                if kv is None:
                    h = h.reshape(N, d)
                    out = out.reshape(N, d) if out is not None else x.reshape(N, d).clone()
                    remaining = remaining.reshape(N) if remaining is not None else x.new_ones(N)
                    kv = tuple(x.new_zeros(B, self.block.attn.n_kv_heads, T, self.block.attn.head_dim) for _ in "kv")
                idx = active.nonzero().squeeze(1)
                fresh = (active | newly).nonzero().squeeze(1)
                prev = h[idx]
                cur = self.block.step_rows(h, gains[k], idx, active, fresh, rope, T, kv, cache, (layer, "deep", k))
                n_run, n_fresh = idx.numel(), fresh.numel()
            if tally is not None:
                tally.add(layer, "deep", k, self.block.flops(n_run, n_fresh, n_run * (past + T)))
            rem = remaining if idx is None or remaining is None else remaining[idx]
            if k == K - 1:
                w = rem if rem is not None else torch.ones_like(cur[..., 0])
                leaving = torch.ones_like(w, dtype=torch.bool)
            else:
                q = self.halt(cur, k / (K - 1))
                if tally is not None:
                    tally.add(layer, "halt", k, n_run * self.halt.flops_per_token(0))
                left = (1 - q) if rem is None else rem * (1 - q)
                w = q if rem is None else rem * q
                leaving = left < policy.exit if policy.exit is not None else torch.zeros_like(q, dtype=torch.bool)
                if policy.delta is not None:
                    change = (cur - prev).norm(dim=-1) / prev.norm(dim=-1).clamp_min(torch.finfo(cur.dtype).tiny)
                    leaving = leaving | (change < policy.delta)
                if bool(leaving.any()):  # this step is their last: it takes all of their remaining mass
                    w = torch.where(leaving, rem if rem is not None else torch.ones_like(w), w)
                if probs is not None:
                    probs[idx if idx is not None else slice(None), k] = q.reshape(-1)
                remaining = left if idx is None else remaining.index_copy(0, idx, left)
            if idx is None:
                out = w.unsqueeze(-1) * cur if out is None else torch.addcmul(out, w.unsqueeze(-1), cur)
                h = cur
                sel = slice(None)
            else:
                first = steps[idx] == 0
                term = torch.addcmul(torch.where(first.unsqueeze(-1), torch.zeros_like(cur), out[idx]),
                                     w.unsqueeze(-1), cur)
                out = out.index_copy(0, idx, term)
                h = h.index_copy(0, idx, cur)
                sel = idx
            steps[sel] += 1
            if weights is not None:
                weights[sel, k] = w.reshape(-1)
            gone = leaving.reshape(-1)
            gone = gone.nonzero().squeeze(1) if idx is None else idx[gone]
            newly = torch.zeros_like(active)
            newly[gone] = True
            active[gone] = False
        else:
            k = K
        if cache is not None and k < K:  # nobody runs steps k..K-1: they still hold every token's keys/values
            if kv is None:
                h = h.reshape(N, d)
                kv = tuple(x.new_zeros(B, self.block.attn.n_kv_heads, T, self.block.attn.head_dim) for _ in "kv")
            fresh = newly.nonzero().squeeze(1)
            none = fresh[:0]
            for j in range(k, K):
                self.block.step_rows(h, gains[j], none, active, fresh, rope, T, kv, cache, (layer, "deep", j))
                if tally is not None:
                    tally.add(layer, "deep", j, self.block.flops(0, fresh.numel(), 0))
                fresh = none
        if out is None:
            out = x
        if diag is not None:
            hw = weights.view(B, T, K)
            diag["halt_weights"] = hw
            diag["halt_probs"] = probs.view(B, T, -1)
            diag["expected_steps"] = (hw * torch.arange(1, K + 1, device=hw.device, dtype=hw.dtype)).sum(-1)
            diag["steps_run"] = steps.view(B, T)
            diag["step_gains"] = gains.detach()
        return out.view(B, T, d)

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

    param_part = "wide"
    param_roles = {"beta": "gain"}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.block = Block(cfg, cfg.d_ffn_wide)
        self.beta = nn.Parameter(torch.full((1,), float(cfg.branch_scale_init))) if cfg.wide_gain else None  # 1-D for FSDP2

    def gain(self):
        return F.softplus(self.beta) if self.beta is not None else 1.0

    def forward(self, x, rope, cache=None, layer=0, tally: FlopTally | None = None, attn=None):
        if tally is not None:
            n = x.shape[0] * x.shape[1]
            tally.add(layer, "wide", 0, self.block.flops(n, n, n * (x.shape[1] + (cache.pos if cache else 0))))
        return self.block(x, self.gain(), rope, cache, (layer, "wide", 0), attn)

    def forward_adaptive(self, x, rope, run=None, cache=None, layer=0, tally: FlopTally | None = None):
        """The wide block for the tokens in run ((B, T) bool; None: all) only; the others get x. Every token
        offers the block's attention the keys and values of x, its state (see AdaptivePolicy)."""
        if run is None or bool(run.all()):
            return self.forward(x, rope, cache, layer, tally)
        if cache is None and not bool(run.any()):
            return x  # no query needs a key
        B, T, d = x.shape
        N = B * T
        h, flat = x.reshape(N, d), run.reshape(N)
        idx, fresh = flat.nonzero().squeeze(1), torch.arange(N, device=x.device)
        kv = tuple(x.new_zeros(B, self.block.attn.n_kv_heads, T, self.block.attn.head_dim) for _ in "kv")
        cur = self.block.step_rows(h, self.gain(), idx, flat, fresh, rope, T, kv, cache, (layer, "wide", 0))
        if tally is not None:
            tally.add(layer, "wide", 0, self.block.flops(idx.numel(), N, idx.numel() * (T + (cache.pos if cache else 0))))
        return h.index_copy(0, idx, cur).view(B, T, d)

    def flops_per_token(self, seq_len: int, convention: str = "true") -> float:
        return self.block.flops_per_token(seq_len, convention)


class Gate(nn.Module):
    """(ℓ_d, ℓ_w) = x·W_g + b_g on the raw layer input; two_gates: g = σ(ℓ) independently.

    convex: one logit, g_w = 1 − g_d.  softmax: softmax over the two logits.  fixed: constants.
    W_g and b_g start at zero, so every gate starts at 0.5.
    """

    param_roles = {"W_g": "gate", "b_g": "gate"}

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
# Layers: one per architecture. Each takes (x, rope, overrides, cache, diag, choice) and returns y.


def _no_choices(layer, choice):
    if choice is not None:
        raise ValueError(f"a {type(layer).__name__} takes no layer choice, got {choice!r}")


class WideLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.wide = WidePath(cfg)

    def forward(self, x, rope, ov: Overrides, cache=None, diag=None, choice=None, tally=None):
        _no_choices(self, choice)
        y = self.wide(x, rope, cache, self.index, tally)
        if diag is not None:
            diag["delta_norm_wide"] = (y - x).norm(dim=-1)
        return y

    def flops_per_token(self, seq_len, convention="true", K=None, overrides=None):
        return self.wide.flops_per_token(seq_len, convention)


class LoopLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.deep = LoopPath(cfg)

    def forward(self, x, rope, ov: Overrides, cache=None, diag=None, choice=None, tally=None):
        _no_choices(self, choice)
        if ov.adaptive is not None:
            y = self.deep.forward_adaptive(x, rope, ov.adaptive, None, ov.K, cache, self.index, diag,
                                           ov.extra_steps_gain, tally)
        else:
            y = self.deep(x, rope, ov.K, cache, self.index, diag, ov.extra_steps_gain, tally)
        if diag is not None:
            diag["delta_norm_deep"] = (y - x).norm(dim=-1)
        return y

    def flops_per_token(self, seq_len, convention="true", K=None, overrides=None):
        return self.deep.flops_per_token(seq_len, convention, K)


class DualLayer(nn.Module):
    """y = g_d ⊙ h_deep + g_w ⊙ h_wide. Both paths are full residual states, so at init y ≈ x."""

    choices = DUAL_CHOICES

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.deep = LoopPath(cfg)
        self.wide = WidePath(cfg)
        self.gate = Gate(cfg)

    def gates(self, x, ov: Overrides, choice=None):
        """(g_d, g_w) per token: the learned gates, then the override, then the layer choice."""
        g_d, g_w = self.gate(x)
        const = ov.gate_constants()
        if const is not None:
            g_d, g_w = torch.full_like(g_d, const[0]), torch.full_like(g_w, const[1])
        elif ov.gates == "shuffled":
            gen = torch.Generator(device="cpu").manual_seed(ov.seed * 1000003 + self.index)
            perm = torch.randperm(g_d.numel(), generator=gen).to(g_d.device)
            g_d = g_d.reshape(-1)[perm].view_as(g_d)
            g_w = g_w.reshape(-1)[perm].view_as(g_w)
        elif ov.gates in ("share-shuffled", "share-shuffled-seq"):
            gen = torch.Generator(device="cpu").manual_seed(ov.seed * 1000003 + self.index)
            total = g_d + g_w
            share = g_d / total.clamp_min(torch.finfo(total.dtype).tiny)
            if ov.gates == "share-shuffled":
                perm = torch.randperm(share.numel(), generator=gen).to(share.device)
                share = share.reshape(-1)[perm].view_as(share)
            else:
                perm = torch.stack([torch.randperm(share.shape[1], generator=gen) for _ in range(share.shape[0])])
                share = share.gather(1, perm.to(share.device))
            g_d, g_w = share * total, (1 - share) * total
        elif ov.gates == "swapped":
            g_d, g_w = g_w, g_d
        elif ov.gates in DUAL_CHOICES:
            g_d, g_w = self.apply_choice(g_d, g_w, ov.gates)
        return self.apply_choice(g_d, g_w, choice)

    @staticmethod
    def apply_choice(g_d, g_w, choice):
        """The gates under a layer choice (see "Layer choices" above)."""
        if choice is None or choice == "learned":
            return g_d, g_w
        if isinstance(choice, TokenChoice):
            if choice.choice not in ("deep", "wide"):
                raise ValueError(f"unknown per-token gate choice '{choice.choice}' (deep, wide)")
            m = choice.mask.to(device=g_d.device, dtype=torch.bool)
            to_deep = choice.choice == "deep"
            g_d = torch.where(m, torch.full_like(g_d, 1.0 if to_deep else 0.0), g_d)
            g_w = torch.where(m, torch.full_like(g_w, 0.0 if to_deep else 1.0), g_w)
            return g_d, g_w
        if choice in ("deep-favoured", "wide-favoured"):
            total = g_d + g_w
            zero = torch.zeros_like(total)
            return (total, zero) if choice == "deep-favoured" else (zero, total)
        raise ValueError(f"unknown layer choice '{choice}' ({', '.join(DUAL_CHOICES)})")

    @staticmethod
    def mix(x, g_d, h_deep, g_w, h_wide):
        """g_d ⊙ h_deep + g_w ⊙ h_wide, where a path that was not computed (None) counts as zero."""
        y = g_d.unsqueeze(-1) * h_deep if h_deep is not None else torch.zeros_like(x)
        if h_wide is not None:
            y = torch.addcmul(y, g_w.unsqueeze(-1), h_wide)
        return y

    def forward(self, x, rope, ov: Overrides, cache=None, diag=None, choice=None, tally=None):
        g_d, g_w = self.gates(x, ov, choice)
        if tally is not None:
            tally.add(self.index, "gate", 0, x.shape[0] * x.shape[1] * self.gate.flops_per_token(0))
        # A path whose gate is zero for every token is skipped, unless a cache or diagnostics need it.
        deep_off, wide_off = ov.paths_off() if diag is None and cache is None else (False, False)
        pol = ov.adaptive
        if pol is None:
            a_d = a_w = None
            if self.deep.block.fast and cache is None and not (deep_off or wide_off):  # both read x
                a_d, a_w = attend_fused([self.deep.block, self.wide.block], x, rope)
            h_deep = None if deep_off else self.deep(x, rope, ov.K, cache, self.index, diag, ov.extra_steps_gain,
                                                     tally, a_d)
            h_wide = None if wide_off else self.wide(x, rope, cache, self.index, tally, a_w)
        else:  # gates first: they decide which tokens take which path
            run_d = g_d >= pol.deep if pol.deep is not None else None
            run_w = g_w >= pol.wide if pol.wide is not None else None
            h_deep = None if deep_off else self.deep.forward_adaptive(x, rope, pol, run_d, ov.K, cache, self.index,
                                                                      diag, ov.extra_steps_gain, tally)
            h_wide = None if wide_off else self.wide.forward_adaptive(x, rope, run_w, cache, self.index, tally)
            if diag is not None:
                diag["wide_run"] = run_w if run_w is not None else torch.ones_like(g_w, dtype=torch.bool)
        y = self.mix(x, g_d, h_deep, g_w, h_wide)
        if diag is not None:
            dd, dw = h_deep - x, h_wide - x
            diag["gate_deep"], diag["gate_wide"] = g_d, g_w
            diag["delta_norm_deep"], diag["delta_norm_wide"] = dd.norm(dim=-1), dw.norm(dim=-1)
            diag["cos_deep_wide"] = F.cosine_similarity(dd, dw, dim=-1)
            diag["wide_gain"] = torch.as_tensor(self.wide.gain()).detach()
        return y

    def step_many(self, x, rope, choices) -> list[torch.Tensor]:
        """The layer under each whole-batch choice; the gates and each path are computed at most once."""
        g_d, g_w = self.gate(x)
        for c in choices:
            if c not in DUAL_CHOICES:
                raise ConfigError(f"unknown Dual-Path layer choice '{c}' ({', '.join(DUAL_CHOICES)})")
        h_deep = self.deep(x, rope, None, None, self.index) if set(choices) - {"wide-favoured"} else None
        h_wide = self.wide(x, rope, None, self.index) if set(choices) - {"deep-favoured"} else None
        out = []
        for c in choices:
            gd, gw = self.apply_choice(g_d, g_w, c)
            out.append(self.mix(x, gd, h_deep, gw, h_wide))
        return out

    def flops_per_token(self, seq_len, convention="true", K=None, overrides: Overrides | None = None):
        deep_off, wide_off = overrides.paths_off() if overrides is not None else (False, False)
        return ((0.0 if deep_off else self.deep.flops_per_token(seq_len, convention, K))
                + (0.0 if wide_off else self.wide.flops_per_token(seq_len, convention))
                + self.gate.flops_per_token(seq_len, convention))


# The one definition of each routing statistic over a Dual-Path layer's diagnostics; the training log
# (DualPathLM.summary_sums) and the analysis (analysis/capture.py, analysis/aggregate.py) both call these.


def deep_share(g_d, g_w, norm_d, norm_w) -> torch.Tensor:
    """ρ_d = g_d‖Δ_d‖ / (g_d‖Δ_d‖ + g_w‖Δ_w‖), Δ = h_path − x (the layer's input): the deep path's share of
    the layer's update. Computed in float64; NaN where the denominator is 0 (or an input is NaN)."""
    num = torch.as_tensor(g_d).double() * torch.as_tensor(norm_d).double()
    den = num + torch.as_tensor(g_w).double() * torch.as_tensor(norm_w).double()
    pos = den > 0
    return torch.where(pos, num / torch.where(pos, den, torch.ones_like(den)), torch.full_like(den, math.nan))


def binary_entropy(p) -> torch.Tensor:
    """H(p) = −p·log₂p − (1 − p)·log₂(1 − p), in bits (so in [0, 1]; 0 at p = 0 or 1), of a gate value p
    (clipped to [0, 1]). Computed in float64; NaN stays NaN."""
    p = torch.as_tensor(p).double().clamp(0.0, 1.0)
    return 0.0 - (torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p)) / math.log(2.0)  # 0, not -0


BIG, SMALL, SKIP = 0, 1, 2
LETTERS = {"B": BIG, "S": SMALL, "X": SKIP}
NAMES = ("big", "small", "skip")
# a router's outputs, in code order (output j chooses code j)
ROUTER_CHOICES = {"bs": (BIG, SMALL), "bsx": (BIG, SMALL, SKIP)}


def parse_letters(pattern: str, n_layers: int, letters: dict[str, str]) -> list[str]:
    """One choice name per layer from a pattern string, e.g. 'BBSX' with {"B": "big", ...}."""
    p = pattern.strip().upper()
    if len(p) != n_layers:
        raise ConfigError(f"routing pattern '{pattern}' has {len(p)} letters but the model has {n_layers} layers")
    bad = sorted({c for c in p if c not in letters})
    if bad:
        raise ConfigError(f"routing pattern '{pattern}' has unknown choice letter(s) {', '.join(bad)} "
                          f"(use {', '.join(f'{k} for {v}' for k, v in letters.items())})")
    return [letters[c] for c in p]


def parse_pattern(pattern: str, n_layers: int) -> list[int]:
    """'BBSX' -> [0, 0, 1, 2]. One letter per layer: B big, S small, X skip."""
    return [NAMES.index(n) for n in parse_letters(pattern, n_layers, {k: NAMES[v] for k, v in LETTERS.items()})]


def _duo_code(name: str) -> int:
    if name not in NAMES:
        raise ConfigError(f"unknown Duo choice '{name}' ({', '.join(NAMES)})")
    return NAMES.index(name)


def pattern_string(choices) -> str:
    inv = {v: k for k, v in LETTERS.items()}
    return "".join(inv[int(c)] for c in choices)


class RouterMLP(nn.Module):
    """A small MLP router: Linear(d_model -> hidden), GELU, Linear(hidden -> outputs)."""

    param_roles = {"inp.weight": "router", "inp.bias": "router_bias", "out.weight": "router", "out.bias": "router_bias"}

    def __init__(self, d_model: int, hidden: int, n_out: int):
        super().__init__()
        self.inp = nn.Linear(d_model, hidden)
        self.out = nn.Linear(hidden, n_out)

    def forward(self, u):
        return self.out(F.gelu(self.inp(u)))


_M31 = 0x7FFFFFFF


def _mix31(x: torch.Tensor) -> torch.Tensor:
    """An integer hash of 31-bit values (int64 tensors; products stay below 2^58, so nothing overflows)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M31
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M31
    return (x >> 16) ^ x


def keyed_uniform(keys: torch.Tensor, salt: int, n: int) -> torch.Tensor:
    """(B, n) uniform numbers in [0, 1) (24 bits), row b a pure function of (keys[b], salt, position): a
    counter-based draw, the same on any device and for any batch split. keys: (B, k) int64."""
    h = torch.full((keys.shape[0],), salt & _M31, dtype=torch.long, device=keys.device)
    for col in keys.long().unbind(-1):
        for part in (col & _M31, (col >> 31) & _M31):
            h = _mix31(h ^ _mix31(part))
    pos = _mix31(torch.arange(n, device=keys.device, dtype=torch.long) + 0x3C6EF372 & _M31)
    return (_mix31(h[:, None] ^ pos[None, :]) >> 7).float() / float(1 << 24)


class DuoLayer(nn.Module):
    """Duo-LLM (Alizadeh et al., arXiv 2410.10846): attention, then per token a big FFN (d_ffn_big), a small
    FFN (d_ffn_small, default big/16) or skip (identity; with skip_whole_layer attention is bypassed too).

    The choice comes from the `choice` argument (a name or a (B, T) code tensor: oracles, search) or else
    from the configured policy: random (per token or sequence, p_big/p_small/p_skip: training), pattern
    (one letter per layer, B/S/X) or router: a linear map or a small MLP (router_hidden) of the normalised
    layer input (router_input=pre) or of what the FFN sees after attention (post), choosing big | small
    (router_choices=bs: P_big = σ(logit / τ)) or big | small | skip (bsx: softmax(logits / τ)); trained soft,
    a probability-weighted mixture of the choices, evaluated hard (the most probable choice). Each FFN runs
    only on its own tokens (gather, then scatter back), so a small or skipped token really costs less;
    `realised_flops` counts a batch.
    """

    choices = NAMES
    param_part = "duo"
    param_roles = {"router.weight": "router", "router.bias": "router_bias"}

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.cfg, self.index = cfg, index
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn_big = SwiGLU(cfg.d_model, cfg.d_ffn_big, cfg.ffn_multiple)
        self.ffn_small = SwiGLU(cfg.d_model, cfg.small_width(), cfg.ffn_multiple)
        n_out = 1 if cfg.router_choices == "bs" else len(ROUTER_CHOICES[cfg.router_choices])
        # a linear router keeps the name router.weight / router.bias of older checkpoints
        self.router = (nn.Linear(cfg.d_model, n_out, bias=True) if not cfg.router_hidden
                       else RouterMLP(cfg.d_model, cfg.router_hidden, n_out))
        self.router_temperature = cfg.router_temperature  # annealed by the router trainer
        self.router_hard = cfg.router_hard
        self._pattern = parse_pattern(cfg.duo_pattern, cfg.n_layers) if cfg.duo_policy == "pattern" else None

    @torch.no_grad()
    def reset_routing_parameters(self):
        # the output layer starts at zero, so every choice starts equally likely
        out = self.router if isinstance(self.router, nn.Linear) else self.router.out
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)

    # -- routing -------------------------------------------------------------------------------

    def router_logits(self, x, h) -> torch.Tensor:
        """(B, T, outputs) logits of the router from the layer input x or the post-attention h."""
        u = self.attn_norm(x) if self.cfg.router_input == "pre" else self.ffn_norm(h)
        return self.router(u)

    def router_probs(self, logits) -> torch.Tensor:
        """(B, T, C) probabilities over ROUTER_CHOICES[router_choices] at the current temperature."""
        if logits.shape[-1] == 1:
            p = torch.sigmoid(logits / self.router_temperature)
            return torch.cat([p, 1 - p], -1)
        return torch.softmax(logits / self.router_temperature, -1)

    def choose(self, x, choice=None, h=None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(choice (B, T) long, or None for a soft mixture; router probabilities (B, T, C) for the router
        policy). h: the post-attention state, for a router_input=post router."""
        B, T, _ = x.shape
        if isinstance(choice, str):
            return torch.full((B, T), _duo_code(choice), dtype=torch.long, device=x.device), None
        if choice is not None:
            return choice.to(x.device).expand(B, T), None
        cfg = self.cfg
        if cfg.duo_policy == "pattern":
            return torch.full((B, T), self._pattern[self.index], dtype=torch.long, device=x.device), None
        if cfg.duo_policy == "router":
            logits = self.router_logits(x, h)
            p = self.router_probs(logits)
            if not self.router_hard:
                return None, p
            if logits.shape[-1] == 1:  # P_big > 0.5, ties small
                return torch.where(logits.squeeze(-1) > 0, BIG, SMALL), p
            return logits.argmax(-1), p  # output j is code j
        shape = (B, T) if cfg.duo_granularity == "token" else (B, 1)
        return self._random_codes(torch.rand(shape, device=x.device)).expand(B, T), None

    def _random_codes(self, u):
        cfg = self.cfg
        return torch.where(u < cfg.p_big, BIG, torch.where(u < cfg.p_big + cfg.p_small, SMALL, SKIP))

    def keyed_choice(self, keys: torch.Tensor, T: int) -> torch.Tensor | None:
        """The random policy's choice (B, T) drawn from per-sample keys (B, n) (see keyed_uniform): a sample's
        routing depends on its key alone, not on how samples are split into ranks or micro-batches. None
        for the other policies."""
        if self.cfg.duo_policy != "random":
            return None
        u = keyed_uniform(keys, self.index, T if self.cfg.duo_granularity == "token" else 1)
        return self._random_codes(u).expand(keys.shape[0], T)

    def attend(self, x, rope, cache=None):
        return x + self.attn(self.attn_norm(x), rope, cache, (self.index, "duo", 0))

    def forward(self, x, rope, ov, cache=None, diag=None, choice=None):
        h = self.attend(x, rope, cache)
        given = choice is not None
        choice, p = self.choose(x, choice, h)
        if given and diag is not None and self.cfg.duo_policy == "router":
            # the router's view of given choices (its supervision on oracle choices)
            diag["router_logits"] = self.router_logits(x, h)
        if choice is not None and self.cfg.skip_whole_layer:
            h = torch.where((choice == SKIP).unsqueeze(-1), x, h)
        z = self.ffn_norm(h)
        if choice is None:  # soft router: every choice on every token, mixed by its probability
            y = h + p[..., 0:1] * self.ffn_big(z) + p[..., 1:2] * self.ffn_small(z)
            if p.shape[-1] == 3 and self.cfg.skip_whole_layer:  # a skip also drops the attention output
                y = y + p[..., 2:3] * (x - h)
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
                diag["p_big"] = p[..., 0]
                diag["router_probs"] = p
        return y

    def step_many(self, x, rope, choices) -> list[torch.Tensor]:
        """The layer under each whole-batch choice; siblings share the attention and the norm."""
        codes = [_duo_code(c) for c in choices]
        h = self.attend(x, rope)
        z = self.ffn_norm(h) if any(c != SKIP for c in codes) else None
        ffn = {BIG: self.ffn_big, SMALL: self.ffn_small}
        return [(x if self.cfg.skip_whole_layer else h) if c == SKIP else h + ffn[c](z) for c in codes]

    # -- accounting ----------------------------------------------------------------------------

    def module_flops(self, seq_len: int, convention: str = "true") -> dict[str, float]:
        """FLOPs per token of each part, from the modules' own accounting."""
        router = sum(2.0 * m.in_features * m.out_features for m in self.router.modules() if isinstance(m, nn.Linear))
        return {"attn": self.attn.flops_per_token(seq_len, convention),
                "big": self.ffn_big.flops_per_token(seq_len, convention),
                "small": self.ffn_small.flops_per_token(seq_len, convention),
                "router": 0.0 if convention == "paper" else router}

    def flops_per_token(self, seq_len: int, convention: str = "true", K=None, overrides=None) -> float:
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


LAYERS = {"wide": WideLayer, "loop": LoopLayer, "dual": DualLayer, "duo": DuoLayer}


@torch.no_grad()
def init_module(m: nn.Module, cfg) -> None:
    """The initial values of one module's own parameters (the paper's: gates 0.5, gains softplus(-7)).

    `cfg` is a ModelConfig (or anything with its init fields: init, init_std, n_layers, branch_scale_init).
    """
    if isinstance(m, (nn.Linear, nn.Embedding)):
        scaled = cfg.init == "scaled" and getattr(m, "residual_projection", False)
        nn.init.normal_(m.weight, std=cfg.init_std / math.sqrt(2 * cfg.n_layers) if scaled else cfg.init_std)
    elif isinstance(m, nn.RMSNorm):
        nn.init.ones_(m.weight)
    elif isinstance(m, HaltingRouter):
        nn.init.normal_(m.weight, std=cfg.init_std)
        nn.init.zeros_(m.bias)
    elif isinstance(m, Gate) and m.mode != "fixed":
        nn.init.zeros_(m.W_g)
        nn.init.zeros_(m.b_g)
    elif isinstance(m, LoopPath):
        nn.init.constant_(m.step_gain, cfg.branch_scale_init)
    elif isinstance(m, WidePath) and m.beta is not None:
        nn.init.constant_(m.beta, cfg.branch_scale_init)
    elif hasattr(m, "reset_routing_parameters"):
        m.reset_routing_parameters()


class _TokenCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of (N, V) logits, row chunk by row chunk: the fp32 log-probabilities of one chunk
    exist at a time (the backward recomputes the softmax), never the whole batch's."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index: int, chunk: int):
        out = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
        keep = targets != ignore_index
        safe = torch.where(keep, targets, 0).unsqueeze(1)
        for s in range(0, logits.shape[0], chunk):
            logp = torch.log_softmax(logits[s:s + chunk].float(), dim=-1)
            out[s:s + chunk] = -logp.gather(1, safe[s:s + chunk]).squeeze(1)
        ctx.save_for_backward(logits, safe, keep)
        ctx.chunk = chunk
        return torch.where(keep, out, 0.0)

    @staticmethod
    def backward(ctx, grad):
        logits, safe, keep = ctx.saved_tensors
        g = torch.where(keep, grad, 0.0).unsqueeze(1)
        out = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk):
            p = torch.softmax(logits[s:s + ctx.chunk].float(), dim=-1)
            p.scatter_add_(1, safe[s:s + ctx.chunk], torch.full_like(safe[s:s + ctx.chunk], -1, dtype=p.dtype))
            out[s:s + ctx.chunk] = p.mul_(g[s:s + ctx.chunk])
        return out, None, None, None


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1,
                        chunk: int = 128) -> torch.Tensor:
    """F.cross_entropy(logits.float(), targets, ignore_index, reduction="none") over (N, V) logits (0 where the
    target is ignored), without the full fp32 log-probabilities the fused kernel keeps for its backward."""
    return _TokenCrossEntropy.apply(logits, targets, ignore_index, chunk)


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

    param_roles = {"embed.weight": "embedding", "lm_head.weight": "head"}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
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
        self.apply(lambda m: init_module(m, self.cfg))

    fast = True

    def set_fast(self, enabled: bool = True) -> "DualPathLM":
        """Fused attention paths and the chunked loss on (the default) or off (the reference path); both compute
        the same function."""
        self.fast = enabled
        for m in self.modules():
            if isinstance(m, Block):
                m.fast = enabled
        return self

    def forward(self, idx, targets=None, *, overrides: Overrides | None = None, return_per_token_loss=False,
                return_diagnostics=False, cache: KVCache | None = None, choices=None,
                sample_keys: torch.Tensor | None = None, flops: FlopTally | None = None) -> LMOutput:
        """choices: None, or one layer choice per layer (see "Layer choices"); a Duo routing tensor
        (n_layers, B, T) of codes counts as one (B, T) choice per layer.
        sample_keys: (B, k) int64, one key per sample; a layer that draws random choices (Duo's random
        policy) then draws them from the key, so a sample is routed alike however a batch is split.
        flops: a FlopTally that receives the FLOPs this pass really executes (wide, loop and dual models)."""
        B, T = idx.shape
        ov = overrides or NO_OVERRIDES
        if ov.adaptive is not None:
            ov.adaptive.check(self.cfg)
        if flops is not None and self.cfg.arch == "duo":
            raise ValueError("a FlopTally counts wide, loop and dual models; Duo-LLM has realised_flops")
        if choices is not None and len(choices) != len(self.layers):
            raise ValueError(f"{len(choices)} layer choices for {len(self.layers)} layers")
        if ov.K is not None and not 1 <= ov.K <= self.cfg.max_loops:
            raise ValueError(f"forced K={ov.K} is outside 1..max_loops={self.cfg.max_loops}")
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.seq_len:
            raise ValueError(f"sequence of {start + T} tokens is longer than the context ({self.cfg.seq_len})")
        rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        x = self.embed(idx)
        diagnostics = []
        ponder = []
        for i, layer in enumerate(self.layers):
            diag = {} if (return_diagnostics or self._wants_ponder(targets)) else None
            choice = None if choices is None else choices[i]
            if choice is None and sample_keys is not None and hasattr(layer, "keyed_choice"):
                choice = layer.keyed_choice(sample_keys, T)
            x = layer(x, rope, ov, cache, diag, choice) if flops is None else layer(x, rope, ov, cache, diag,
                                                                                     choice, tally=flops)
            if diag is not None:
                if "expected_steps" in diag:
                    ponder.append(diag["expected_steps"])
                if return_diagnostics:
                    diagnostics.append(diag)
        if cache is not None:
            cache.pos += T
        logits = self.lm_head(self.norm(x))
        if flops is not None:
            flops.add(-1, "head", 0, B * T * 2.0 * self.cfg.d_model * self.cfg.vocab_size)
            flops.tokens += B * T
        out = LMOutput(logits=logits, diagnostics=diagnostics)
        if targets is not None:
            flat, tgt = logits.view(-1, logits.size(-1)), targets.reshape(-1)
            per_tok = (token_cross_entropy(flat, tgt) if self.fast else
                       F.cross_entropy(flat.float(), tgt, ignore_index=-1, reduction="none")).view(B, T)
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

    @torch.no_grad()
    def summary_sums(self, out: LMOutput) -> dict[str, torch.Tensor]:
        """Exact float64 sums and counts (0-d tensors) of the per-layer routing statistics of one forward made
        with return_diagnostics=True. Added key by key over batches (and ranks), they give, through
        `summary_from_sums`, the statistics over all of them. The keys depend on the architecture only.

        Every position of the batch counts (as in the analysis, which keeps positions without a target); NaN
        values are skipped (as the analysis's means skip them). Statistics, per layer i:
          gates/{i}/deep_mean, deep_std, wide_mean, wide_std   g_d, g_w: mean and standard deviation (ddof 0)
          gates/{i}/entropy_deep, entropy_wide                  mean binary_entropy of the gate, bits
          gates/{i}/rho_deep                                    mean deep share ρ_d (deep_share)
                                                                (these: Dual-Path layers)
          gates/{i}/expected_steps                              mean ACT-expected loop steps (loop and Dual-Path)
        """
        sums: dict[str, torch.Tensor] = {}

        def add(name: str, v: torch.Tensor, ok: torch.Tensor | None = None, square: bool = False):
            v = v.detach().double()
            ok = torch.isfinite(v) if ok is None else ok & torch.isfinite(v)
            v = torch.where(ok, v, torch.zeros_like(v))
            sums[f"{name}:n"] = ok.sum().double()
            sums[f"{name}:sum"] = v.sum()
            if square:
                sums[f"{name}:sq"] = (v * v).sum()

        for i, diag in enumerate(out.diagnostics):
            p = f"gates/{i}/"
            if "gate_deep" in diag and "gate_wide" in diag:
                g_d, g_w = diag["gate_deep"].double(), diag["gate_wide"].double()
                add(p + "deep", g_d, square=True)
                add(p + "wide", g_w, square=True)
                both = torch.isfinite(g_d) & torch.isfinite(g_w)
                add(p + "entropy_deep", binary_entropy(g_d), both)
                add(p + "entropy_wide", binary_entropy(g_w), both)
                add(p + "rho_deep", deep_share(g_d, g_w, diag["delta_norm_deep"], diag["delta_norm_wide"]))
            if "expected_steps" in diag:
                add(p + "expected_steps", diag["expected_steps"])
        return sums

    @staticmethod
    def summary_from_sums(sums: dict) -> dict[str, float]:
        """The statistics (see `summary_sums`) from its sums, added over any number of batches; values are
        floats or 0-d tensors. NaN where nothing was counted."""
        vals = {k: float(v) for k, v in sums.items()}
        stats: dict[str, float] = {}
        for key, n in vals.items():
            name, part = key.rsplit(":", 1)
            if part != "n":
                continue
            mean = vals[f"{name}:sum"] / n if n > 0 else math.nan
            if f"{name}:sq" in vals:
                var = vals[f"{name}:sq"] / n - mean * mean if n > 0 else math.nan
                stats[f"{name}_mean"] = mean
                stats[f"{name}_std"] = math.sqrt(max(var, 0.0)) if n > 0 else math.nan
            else:
                stats[name] = mean
        return stats

    # -- accounting ------------------------------------------------------------------------------

    def flops_per_token(self, seq_len: int | None = None, convention: str = "true", K: int | None = None,
                        overrides: Overrides | None = None) -> float:
        """Forward FLOPs per token. paper: sum over layers of projections; true: all matmuls incl. head.

        With `overrides`, the FLOPs the forward under them really spends: its forced K, and no FLOPs for a
        path that a gate mode switches off for every token."""
        _check_convention(convention)
        T = seq_len or self.cfg.seq_len
        K = overrides.K if overrides is not None and overrides.K is not None else K
        total = sum(layer.flops_per_token(T, convention, K, overrides) for layer in self.layers)
        if convention == "true":
            total += 2.0 * self.cfg.d_model * self.cfg.vocab_size
        return float(total)

    def train_flops_per_token(self, seq_len: int | None = None) -> float:
        return 3.0 * self.flops_per_token(seq_len, "true")

    def named_param_roles(self):
        """(name, parameter, role) for every parameter once (tied ones under their first name).

        Each module declares the roles of its own parameters in `param_roles` (keys relative to the
        module); anything undeclared is a "matrix". Roles: matrix, embedding, head (the LM head), norm,
        gain, gate, router, router_bias. The optimiser chooses weight decay by role; `param_counts` counts
        by it.
        """
        roles = {}
        for mname, m in self.named_modules():
            for key, role in getattr(m, "param_roles", {}).items():
                roles[f"{mname}.{key}" if mname else key] = role
        for name, p in self.named_parameters():
            yield name, p, roles.get(name, "matrix")

    def param_counts(self) -> dict[str, int]:
        """Total, non-embedding and per-part parameter counts (shared tensors counted once).

        The part is the role where it names one (embeddings, gates, routers), else the path or layer
        that owns the parameter (a module's `param_part`: deep, wide, duo), else "other"."""
        part_of = {}
        for mname, m in self.named_modules():
            part = getattr(m, "param_part", None)
            if part is not None:
                for pname, _ in m.named_parameters():
                    part_of.setdefault(f"{mname}.{pname}", part)
        by_role = {"embedding": "embeddings", "head": "embeddings", "gate": "gates", "router": "routers", "router_bias": "routers"}
        parts = {"embeddings": 0, "deep": 0, "wide": 0, "gates": 0, "routers": 0, "duo": 0, "other": 0}
        for name, p, role in self.named_param_roles():
            parts[by_role.get(role) or part_of.get(name, "other")] += p.numel()
        total = sum(parts.values())
        return {"total": total, "non_embedding": total - parts["embeddings"], **parts}

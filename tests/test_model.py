"""Model behaviour: causality, exact equivalences between architectures, ACT halting, gates and their
inference overrides, losses and the KV cache.

Tiny models (d_model 32, 2 layers, vocab 128, T <= 32), CPU, fp32, fixed seeds. Most tests first perturb
every parameter (branch gains ~softplus(N(0, 0.5)), gate and router weights O(1)) so that the branches
actually contribute: at initialisation the branch gains are softplus(-7) ~ 1e-3 and every layer is
nearly the identity, which would let a broken branch hide under any tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dualpath import DualPathLM, KVCache, ModelConfig, Overrides, TokenChoice

from helpers import perturb_

ARCHS = ("wide", "loop", "dual")
VOCAB = 128
TIGHT = dict(rtol=0.0, atol=1e-6)  # two computations of the same float32 quantity


def make_cfg(arch: str = "dual", **kw) -> ModelConfig:
    base = dict(arch=arch, vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, seq_len=32,
                d_ffn_deep=96, d_ffn_wide=192, ffn_multiple=16, K=3, max_loops=6)
    base.update(kw)
    return ModelConfig(**base)


def make_model(arch: str = "dual", seed: int = 0, perturb: bool = True, **kw) -> DualPathLM:
    torch.manual_seed(seed)
    model = DualPathLM(make_cfg(arch, **kw)).eval()
    if perturb:
        perturb_(model, seed + 1000)
    return model


def tokens(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def copy_into(src: DualPathLM, dst: DualPathLM, drop: tuple[str, ...]) -> DualPathLM:
    """Load src's weights into dst, leaving out parameters whose name contains one of `drop`."""
    sd = {k: v for k, v in src.state_dict().items() if not any(s in k for s in drop)}
    dst.load_state_dict(sd, strict=True)
    return dst


# ----------------------------------------------------------------------------------------------
# Causality


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_changing_future_tokens_never_changes_past_logits(arch, n_kv_heads):
    model = make_model(arch, n_kv_heads=n_kv_heads)
    idx = tokens(2, 24, seed=1)
    cut = 11
    idx2 = idx.clone()
    idx2[:, cut:] = (idx2[:, cut:] + 1 + tokens(2, 24 - cut, seed=2) % (VOCAB - 1)) % VOCAB
    assert (idx2[:, cut:] != idx[:, cut:]).all()
    with torch.no_grad():
        a, b = model(idx).logits, model(idx2).logits
    torch.testing.assert_close(a[:, :cut], b[:, :cut], **TIGHT)
    # and the future does change (the check above is not vacuous)
    assert (a[:, cut:] - b[:, cut:]).abs().amax() > 1e-2


def test_causality_of_gradients_dual():
    """The loss at position t gets no gradient from the embeddings of tokens after t."""
    model = make_model("dual", n_kv_heads=2)
    idx = tokens(1, 16, seed=3)
    emb = model.embed.weight
    t = 6
    out = model(idx)
    out.logits[0, t].sum().backward()
    grad = emb.grad
    future = set(idx[0, t + 1:].tolist()) - set(idx[0, :t + 1].tolist())
    assert future, "need a token that occurs only in the future"
    for tok in future:
        assert torch.count_nonzero(grad[tok]) == 0
    assert grad[idx[0, t]].abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# Exact equivalences between architectures


@pytest.mark.parametrize("diagnostics", [False, True])
def test_dual_deep_only_equals_loop_with_same_deep_weights(diagnostics):
    dual = make_model("dual", n_kv_heads=2)
    loop = copy_into(dual, DualPathLM(make_cfg("loop", n_kv_heads=2)).eval(), drop=(".wide.", ".gate."))
    idx = tokens(2, 20, seed=4)
    with torch.no_grad():
        got = dual(idx, overrides=Overrides(gates="deep-only"), return_diagnostics=diagnostics).logits
        ref = loop(idx).logits
        # also with a forced K on both
        got5 = dual(idx, overrides=Overrides(gates="deep-only", K=5), return_diagnostics=diagnostics).logits
        ref5 = loop(idx, overrides=Overrides(K=5)).logits
    torch.testing.assert_close(got, ref, **TIGHT)
    torch.testing.assert_close(got5, ref5, **TIGHT)
    assert (got - got5).abs().amax() > 1e-3


@pytest.mark.parametrize("diagnostics", [False, True])
def test_dual_wide_only_equals_wide_with_same_wide_weights(diagnostics):
    dual = make_model("dual", n_kv_heads=2)
    wide = copy_into(dual, DualPathLM(make_cfg("wide", n_kv_heads=2)).eval(), drop=(".deep.", ".gate."))
    idx = tokens(2, 20, seed=5)
    with torch.no_grad():
        got = dual(idx, overrides=Overrides(gates="wide-only"), return_diagnostics=diagnostics).logits
        ref = wide(idx).logits
    torch.testing.assert_close(got, ref, **TIGHT)


def test_deep_only_and_wide_only_differ_from_default():
    dual = make_model("dual")
    idx = tokens(2, 16, seed=6)
    with torch.no_grad():
        d = dual(idx).logits
        a = dual(idx, overrides=Overrides(gates="deep-only")).logits
        b = dual(idx, overrides=Overrides(gates="wide-only")).logits
    assert (d - a).abs().amax() > 1e-2 and (d - b).abs().amax() > 1e-2 and (a - b).abs().amax() > 1e-2


# ----------------------------------------------------------------------------------------------
# Reference implementation of the block Φ(x; s), written from the paper's equations


def ref_rmsnorm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def ref_rope(x, pos, base):
    """Rotate (x[..., i], x[..., i + D/2]) by angle pos * base^(-2i/D), as complex multiplication."""
    D = x.shape[-1]
    theta = pos[:, None].double() * base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    z = torch.complex(x[..., :D // 2].double(), x[..., D // 2:].double()) * torch.polar(torch.ones_like(theta), theta)
    return torch.cat((z.real, z.imag), dim=-1).to(x.dtype)


def ref_attention(attn, x, cfg):
    B, T, d = x.shape
    H, Hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.d_model // cfg.n_heads
    q = (x @ attn.wq.weight.T).view(B, T, H, hd).transpose(1, 2)
    k = (x @ attn.wk.weight.T).view(B, T, Hkv, hd).transpose(1, 2)
    v = (x @ attn.wv.weight.T).view(B, T, Hkv, hd).transpose(1, 2)
    pos = torch.arange(T)
    q, k = ref_rope(q, pos, cfg.rope_base), ref_rope(k, pos, cfg.rope_base)
    if cfg.qk_norm:
        q = ref_rmsnorm(q, attn.q_norm.weight, cfg.norm_eps)
        k = ref_rmsnorm(k, attn.k_norm.weight, cfg.norm_eps)
    # query head h reads kv head h // (H / Hkv)
    k = k[:, torch.arange(H) // (H // Hkv)]
    v = v[:, torch.arange(H) // (H // Hkv)]
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    y = scores.softmax(-1) @ v
    return y.transpose(1, 2).reshape(B, T, d) @ attn.wo.weight.T


def ref_block(block, x, s, cfg):
    u = x + s * ref_attention(block.attn, ref_rmsnorm(x, block.attn_norm.weight, cfg.norm_eps), cfg)
    h = ref_rmsnorm(u, block.ffn_norm.weight, cfg.norm_eps)
    f = block.ffn
    return u + s * ((F.silu(h @ f.w1.weight.T) * (h @ f.w3.weight.T)) @ f.w2.weight.T)


def rope_for(model, T):
    return model.rope_cos[:T], model.rope_sin[:T]


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_block_matches_reference_equations(qk_norm, n_kv_heads):
    model = make_model("wide", n_kv_heads=n_kv_heads, qk_norm=qk_norm)
    cfg = model.cfg
    block = model.layers[0].wide.block
    x = torch.randn(2, 17, cfg.d_model, generator=torch.Generator().manual_seed(7))
    s = torch.tensor(0.8)
    with torch.no_grad():
        got = block(x, s, rope_for(model, 17))
        ref = ref_block(block, x, s, cfg)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    # the SwiGLU hidden width follows m * ceil(floor(2 d_ffn / 3) / m): 16 * ceil(128 / 16) = 128
    assert model.layers[0].wide.block.ffn.hidden == 16 * math.ceil((2 * 192 // 3) / 16) == 128


# ----------------------------------------------------------------------------------------------
# ACT halting


def hand_halt_weights(q: torch.Tensor, K: int) -> torch.Tensor:
    """w_k = π_k q_k for k < K, w_K = π_K, with π_k = Π_{j<k} (1 − q_j)."""
    ws, pi = [], torch.ones(q.shape[:-1])
    for k in range(K - 1):
        ws.append(pi * q[..., k])
        pi = pi * (1 - q[..., k])
    ws.append(pi)
    return torch.stack(ws, dim=-1)


def check_halting(diags, K, B, T):
    for diag in diags:
        hw, hp = diag["halt_weights"], diag["halt_probs"]
        assert hw.shape == (B, T, K) and hp.shape == (B, T, K - 1)
        assert (hw >= 0).all()
        torch.testing.assert_close(hw.sum(-1), torch.ones(B, T), **TIGHT)
        torch.testing.assert_close(hw, hand_halt_weights(hp, K), **TIGHT)
        steps = (hw * torch.arange(1, K + 1, dtype=hw.dtype)).sum(-1)
        torch.testing.assert_close(diag["expected_steps"], steps, **TIGHT)


@pytest.mark.parametrize("arch", ["loop", "dual"])
@pytest.mark.parametrize("K", [1, 2, 3, 4, 5])
def test_halt_weights_sum_to_one_and_match_hand_computation(arch, K):
    model = make_model(arch, K=K, max_loops=6)
    idx = tokens(2, 12, seed=8)
    with torch.no_grad():
        out = model(idx, return_diagnostics=True)
    assert len(out.diagnostics) == model.cfg.n_layers
    check_halting(out.diagnostics, K, 2, 12)
    if K == 1:
        assert torch.equal(out.diagnostics[0]["halt_weights"], torch.ones(2, 12, 1))
    if K >= 3:  # the halting mass is spread over several steps, not trivially on one
        hw = out.diagnostics[0]["halt_weights"]
        assert (hw.amax(-1) < 0.99).any()


@pytest.mark.parametrize("arch", ["loop", "dual"])
@pytest.mark.parametrize("K", [1, 2, 3, 4, 5])
def test_forced_K_halt_weights_sum_to_one(arch, K):
    model = make_model(arch, K=3, max_loops=5)
    idx = tokens(2, 12, seed=9)
    with torch.no_grad():
        out = model(idx, overrides=Overrides(K=K), return_diagnostics=True)
    check_halting(out.diagnostics, K, 2, 12)
    assert out.diagnostics[0]["step_gains"].shape == (K,)


@pytest.mark.parametrize("K", [1, 2, 4])
def test_loop_layer_equals_independent_act_implementation(K):
    model = make_model("loop", K=K, n_kv_heads=2)
    cfg = model.cfg
    layer = model.layers[1]
    T = 14
    x = torch.randn(2, T, cfg.d_model, generator=torch.Generator().manual_seed(10))
    rope = rope_for(model, T)
    deep = layer.deep
    gains = torch.log1p(torch.exp(deep.step_gain.detach()))  # softplus
    assert gains.min() > 0.05  # the perturbation made the gains O(1)
    with torch.no_grad():
        got = layer(x, rope, Overrides())
        h, pi, ref = x, torch.ones(2, T, 1), torch.zeros_like(x)
        for k in range(K):
            h = ref_block(deep.block, h, gains[k], cfg)
            if k < K - 1:
                feat = torch.cat([h, torch.full((2, T, 1), k / (K - 1))], dim=-1)  # [hᵏ ; k/(K−1)]
                q = torch.sigmoid(F.linear(feat, deep.halt.weight, deep.halt.bias))
                ref = ref + pi * q * h
                pi = pi * (1 - q)
            else:
                ref = ref + pi * h
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert (got - x).abs().amax() > 0.1


def test_dual_layer_equals_independent_implementation():
    model = make_model("dual", K=3, n_kv_heads=2)
    cfg = model.cfg
    layer = model.layers[0]
    T = 10
    x = torch.randn(2, T, cfg.d_model, generator=torch.Generator().manual_seed(11))
    rope = rope_for(model, T)
    with torch.no_grad():
        got = layer(x, rope, Overrides())
        h_deep = layer.deep(x, rope)
        h_wide = ref_block(layer.wide.block, x, F.softplus(layer.wide.beta), cfg)
        g = torch.sigmoid(x @ layer.gate.W_g + layer.gate.b_g)
        ref = g[..., :1] * h_deep + g[..., 1:] * h_wide
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Initialisation


@pytest.mark.parametrize("arch", ARCHS)
def test_initial_gates_and_branch_gains(arch):
    model = make_model(arch, perturb=False, K=3, max_loops=6)
    s0 = F.softplus(torch.tensor(-7.0))
    with torch.no_grad():
        out = model(tokens(2, 10, seed=12), return_diagnostics=True)
    for layer, diag in zip(model.layers, out.diagnostics):
        if arch in ("loop", "dual"):
            assert torch.equal(layer.deep.step_gain.detach(), torch.full((6,), -7.0))
            assert torch.equal(diag["step_gains"], s0.expand(3))
        if arch in ("wide", "dual"):
            assert layer.wide.beta.numel() == 1 and layer.wide.beta.item() == -7.0
            assert F.softplus(layer.wide.beta.detach()).item() == s0.item()
        if arch == "dual":
            assert diag["wide_gain"].numel() == 1 and diag["wide_gain"].item() == s0.item()
            assert torch.equal(diag["gate_deep"], torch.full((2, 10), 0.5))
            assert torch.equal(diag["gate_wide"], torch.full((2, 10), 0.5))
    assert abs(s0.item() - math.log1p(math.exp(-7.0))) < 1e-9


def test_wide_gain_disabled_is_plain_block():
    model = make_model("wide", wide_gain=False)
    assert model.layers[0].wide.beta is None
    x = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        got = model.layers[0](x, rope_for(model, 8), Overrides())
        ref = ref_block(model.layers[0].wide.block, x, 1.0, model.cfg)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Inference overrides


def test_both_half_equals_default_when_gates_are_at_init():
    model = perturb_(make_model("dual", perturb=False), 77, gates=False)  # paths perturbed, W_g = b_g = 0
    assert not model.layers[0].gate.W_g.any()
    idx = tokens(2, 16, seed=14)
    with torch.no_grad():
        default = model(idx).logits
        half = model(idx, overrides=Overrides(gates="both=0.5")).logits
    torch.testing.assert_close(half, default, **TIGHT)
    # once the gate is trained (random W_g) they no longer coincide
    perturb_(model, 78)
    with torch.no_grad():
        assert (model(idx).logits - model(idx, overrides=Overrides(gates="both=0.5")).logits).abs().amax() > 1e-3


def test_both_one_equals_saturated_gate():
    model = make_model("dual")
    idx = tokens(2, 16, seed=15)
    with torch.no_grad():
        got = model(idx, overrides=Overrides(gates="both=1")).logits
        for layer in model.layers:  # sigmoid(30) rounds to exactly 1.0 in float32
            layer.gate.W_g.zero_()
            layer.gate.b_g.fill_(30.0)
        assert torch.sigmoid(torch.tensor(30.0)).item() == 1.0
        ref = model(idx).logits
        out = model(idx, overrides=Overrides(gates="both=1"), return_diagnostics=True)
    torch.testing.assert_close(got, ref, **TIGHT)
    for diag in out.diagnostics:
        assert torch.equal(diag["gate_deep"], torch.ones(2, 16))
        assert torch.equal(diag["gate_wide"], torch.ones(2, 16))


def test_shuffled_gates_permute_values():
    model = make_model("dual")  # W_g randomised
    # distinct tokens, so that the layer-0 gate values are distinct and a permutation is identifiable
    idx = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(16))[:48].view(3, 16)
    with torch.no_grad():
        base = model(idx, return_diagnostics=True)
        shuf = model(idx, overrides=Overrides(gates="shuffled"), return_diagnostics=True)
        again = model(idx, overrides=Overrides(gates="shuffled"), return_diagnostics=True)
        other = model(idx, overrides=Overrides(gates="shuffled", seed=1), return_diagnostics=True)
    b0, s0 = base.diagnostics[0], shuf.diagnostics[0]  # layer 0 sees the same input (the embeddings)
    gd, gw = b0["gate_deep"].reshape(-1), b0["gate_wide"].reshape(-1)
    sd, sw = s0["gate_deep"].reshape(-1), s0["gate_wide"].reshape(-1)
    assert gd.unique().numel() == gd.numel()
    assert torch.equal(sd.sort().values, gd.sort().values)
    assert torch.equal(sw.sort().values, gw.sort().values)
    assert not torch.equal(sd, gd)
    # the same permutation moves both gates: the (g_d, g_w) pairs survive
    order_b, order_s = gd.argsort(), sd.argsort()
    assert torch.equal(gw[order_b], sw[order_s])
    # seeded: reproducible, and another seed gives another permutation
    torch.testing.assert_close(again.logits, shuf.logits, rtol=0, atol=0)
    assert not torch.equal(other.diagnostics[0]["gate_deep"], s0["gate_deep"])
    assert (shuf.logits - base.logits).abs().amax() > 1e-3


@pytest.mark.parametrize("to", ["deep", "wide"])
def test_token_mask_changes_only_masked_gates(to):
    model = make_model("dual")
    B, T = 2, 16
    idx = tokens(B, T, seed=17)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, [5, 9, 10]] = True
    mask[1, [12]] = True
    with torch.no_grad():
        base = model(idx, return_diagnostics=True)
        got = model(idx, choices=[TokenChoice(mask, to)] * len(model.layers), return_diagnostics=True)
    const_d, const_w = (1.0, 0.0) if to == "deep" else (0.0, 1.0)
    for li, (bd, gd) in enumerate(zip(base.diagnostics, got.diagnostics)):
        assert (gd["gate_deep"][mask] == const_d).all() and (gd["gate_wide"][mask] == const_w).all()
        if li == 0:  # same input: every unmasked gate is untouched
            assert torch.equal(gd["gate_deep"][~mask], bd["gate_deep"][~mask])
            assert torch.equal(gd["gate_wide"][~mask], bd["gate_wide"][~mask])
        # at every layer, positions before a row's first masked token are untouched (causality)
        for b in range(B):
            first = int(mask[b].nonzero()[0])
            torch.testing.assert_close(gd["gate_deep"][b, :first], bd["gate_deep"][b, :first], **TIGHT)
            torch.testing.assert_close(gd["gate_wide"][b, :first], bd["gate_wide"][b, :first], **TIGHT)
    for b in range(B):
        first = int(mask[b].nonzero()[0])
        torch.testing.assert_close(got.logits[b, :first], base.logits[b, :first], **TIGHT)
        assert (got.logits[b, first] - base.logits[b, first]).abs().amax() > 1e-3


def test_layer_choice_moves_the_gate_sum_to_one_path():
    model = make_model("dual")
    idx = tokens(2, 12, seed=18)
    with torch.no_grad():
        base = model(idx, return_diagnostics=True)
        deep = model(idx, choices=["deep-favoured", "learned"], return_diagnostics=True)
        wide = model(idx, choices=["wide-favoured", None], return_diagnostics=True)
    total = base.diagnostics[0]["gate_deep"] + base.diagnostics[0]["gate_wide"]
    assert torch.equal(deep.diagnostics[0]["gate_deep"], total)
    assert not deep.diagnostics[0]["gate_wide"].any()
    assert torch.equal(wide.diagnostics[0]["gate_wide"], total)
    assert not wide.diagnostics[0]["gate_deep"].any()
    with pytest.raises(ValueError):
        model(idx, choices=["sideways", None])


@pytest.mark.parametrize("K", [0, 7, 100])
def test_forced_K_outside_range_raises(K):
    model = make_model("dual", K=3, max_loops=6)
    with pytest.raises(ValueError, match="max_loops"):
        model(tokens(1, 4), overrides=Overrides(K=K))


def test_unknown_gate_override_raises():
    model = make_model("dual")
    with pytest.raises(ValueError, match="gate override"):
        model(tokens(1, 4), overrides=Overrides(gates="half"))


@pytest.mark.parametrize("arch", ["loop", "dual"])
def test_K_override_changes_output_and_equals_model_built_with_that_K(arch):
    model = make_model(arch, K=3, max_loops=6)
    idx = tokens(2, 12, seed=19)
    with torch.no_grad():
        default = model(idx).logits
        same = model(idx, overrides=Overrides(K=3)).logits
        # "own": the extra steps use their own gains, exactly a model built with K=5
        k5 = model(idx, overrides=Overrides(K=5, extra_steps_gain="own")).logits
        built5 = DualPathLM(make_cfg(arch, K=5, max_loops=6)).eval()
        built5.load_state_dict(model.state_dict())
        ref5 = built5(idx).logits
        # "last" (the default): as if steps 4 and 5 had the trained step 3's gain
        k5_last = model(idx, overrides=Overrides(K=5)).logits
        for layer in built5.layers:
            layer.deep.step_gain[3:5] = layer.deep.step_gain[2]
        ref5_last = built5(idx).logits
    torch.testing.assert_close(same, default, rtol=0, atol=0)
    torch.testing.assert_close(k5, ref5, rtol=0, atol=0)
    torch.testing.assert_close(k5_last, ref5_last, rtol=0, atol=0)
    assert (k5 - default).abs().amax() > 1e-3


def test_no_overrides_is_default():
    model = make_model("dual")
    idx = tokens(2, 12, seed=20)
    with torch.no_grad():
        torch.testing.assert_close(model(idx, overrides=Overrides()).logits, model(idx).logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Gate modes


def layer0_gates(model, idx, **ov):
    with torch.no_grad():
        diag = model(idx, return_diagnostics=True, overrides=Overrides(**ov)).diagnostics[0]
    return diag["gate_deep"], diag["gate_wide"]


def test_gate_mode_two_gates_is_independent_sigmoids():
    model = make_model("dual")
    idx = tokens(2, 12, seed=21)
    g_d, g_w = layer0_gates(model, idx)
    gate = model.layers[0].gate
    logits = model.embed(idx).detach() @ gate.W_g.detach() + gate.b_g.detach()
    torch.testing.assert_close(g_d, torch.sigmoid(logits[..., 0]), **TIGHT)
    torch.testing.assert_close(g_w, torch.sigmoid(logits[..., 1]), **TIGHT)
    assert ((g_d + g_w - 1).abs() > 1e-3).any()  # not constrained to sum to 1


def test_gate_mode_convex():
    model = make_model("dual", gate_mode="convex")
    gate = model.layers[0].gate
    assert gate.W_g.shape == (32, 1) and gate.b_g.shape == (1,)
    idx = tokens(2, 12, seed=22)
    g_d, g_w = layer0_gates(model, idx)
    logit = (model.embed(idx).detach() @ gate.W_g.detach() + gate.b_g.detach())[..., 0]
    torch.testing.assert_close(g_d, torch.sigmoid(logit), **TIGHT)
    assert torch.equal(g_w, 1 - g_d)
    assert g_d.std() > 1e-2


def test_gate_mode_softmax():
    model = make_model("dual", gate_mode="softmax")
    gate = model.layers[0].gate
    assert gate.W_g.shape == (32, 2)
    idx = tokens(2, 12, seed=23)
    g_d, g_w = layer0_gates(model, idx)
    logits = model.embed(idx).detach() @ gate.W_g.detach() + gate.b_g.detach()
    torch.testing.assert_close(g_d + g_w, torch.ones_like(g_d), **TIGHT)
    torch.testing.assert_close(g_d, 1 / (1 + torch.exp(logits[..., 1] - logits[..., 0])), **TIGHT)
    assert g_d.std() > 1e-2


def test_gate_mode_fixed_constants():
    model = make_model("dual", gate_mode="fixed", fixed_gate_deep=0.3, fixed_gate_wide=0.9)
    assert not any("gate" in n for n, _ in model.named_parameters())
    idx = tokens(2, 12, seed=24)
    with torch.no_grad():
        out = model(idx, return_diagnostics=True)
    for diag in out.diagnostics:
        assert torch.equal(diag["gate_deep"], torch.full((2, 12), 0.3))
        assert torch.equal(diag["gate_wide"], torch.full((2, 12), 0.9))


def test_gate_mode_fixed_equals_two_gates_with_both_override():
    fixed = make_model("dual", gate_mode="fixed", fixed_gate_deep=0.7, fixed_gate_wide=0.7)
    two = DualPathLM(make_cfg("dual")).eval()
    res = two.load_state_dict(fixed.state_dict(), strict=False)  # only W_g/b_g are missing from `fixed`
    assert not res.unexpected_keys and res.missing_keys and all(".gate." in k for k in res.missing_keys)
    idx = tokens(2, 12, seed=25)
    with torch.no_grad():
        torch.testing.assert_close(fixed(idx).logits, two(idx, overrides=Overrides(gates="both=0.7")).logits,
                                   **TIGHT)


# ----------------------------------------------------------------------------------------------
# Embeddings and losses


def test_tie_embeddings_shares_the_weight():
    untied = make_model("dual", perturb=False)
    tied = make_model("dual", perturb=False, tie_embeddings=True)
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.lm_head.weight is not untied.embed.weight
    n_untied = sum(p.numel() for p in untied.parameters())
    n_tied = sum(p.numel() for p in tied.parameters())
    assert n_untied - n_tied == VOCAB * 32
    assert untied.param_counts()["total"] - tied.param_counts()["total"] == VOCAB * 32
    assert tied.param_counts()["embeddings"] == VOCAB * 32
    # one tensor: a change to the embedding is a change to the head
    with torch.no_grad():
        tied.embed.weight[3, 0] += 1.0
    assert tied.lm_head.weight[3, 0] == tied.embed.weight[3, 0]


@pytest.mark.parametrize("arch", ARCHS)
def test_per_token_loss_averages_to_loss(arch):
    model = make_model(arch)
    idx, tgt = tokens(2, 16, seed=26), tokens(2, 16, seed=27)
    with torch.no_grad():
        out = model(idx, tgt, return_per_token_loss=True)
    assert out.per_token_loss.shape == (2, 16)
    torch.testing.assert_close(out.per_token_loss.mean(), out.loss, rtol=1e-6, atol=0)
    ref = F.cross_entropy(out.logits.reshape(-1, VOCAB), tgt.reshape(-1))
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=0)
    # per token: -log softmax at the target
    lp = out.logits.log_softmax(-1).gather(-1, tgt[..., None])[..., 0]
    torch.testing.assert_close(out.per_token_loss, -lp, rtol=0, atol=1e-5)


def test_ignore_index_targets_are_excluded():
    model = make_model("dual")
    idx, tgt = tokens(2, 16, seed=28), tokens(2, 16, seed=29)
    tgt[0, :5] = -1
    tgt[1, 10] = -1
    keep = tgt != -1
    with torch.no_grad():
        out = model(idx, tgt, return_per_token_loss=True)
        changed = tgt.clone()
        out2 = model(idx, changed, return_per_token_loss=True)
    assert torch.equal(out.per_token_loss[~keep], torch.zeros(int((~keep).sum())))
    torch.testing.assert_close(out.loss, out.per_token_loss[keep].mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[keep], tgt[keep]), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.loss, out.per_token_loss.sum() / keep.sum(), rtol=1e-6, atol=0)
    assert out2.loss == out.loss


def test_ponder_penalty_is_added_to_loss():
    model = make_model("dual", ponder_weight=0.1)
    idx, tgt = tokens(2, 12, seed=30), tokens(2, 12, seed=31)
    with torch.no_grad():
        out = model(idx, tgt, return_diagnostics=True)
    ce = F.cross_entropy(out.logits.reshape(-1, VOCAB), tgt.reshape(-1))
    steps = torch.stack([d["expected_steps"].mean() for d in out.diagnostics]).mean()
    torch.testing.assert_close(out.aux_loss, 0.1 * steps, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.loss, ce + 0.1 * steps, rtol=1e-6, atol=0)
    assert 1.0 <= steps.item() <= 3.0


# ----------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_kv_cache_prefill_then_decode_matches_full_forward(arch, n_kv_heads):
    model = make_model(arch, n_kv_heads=n_kv_heads)
    idx = tokens(2, 20, seed=32)
    P = 7
    with torch.no_grad():
        full = model(idx).logits
        cache = KVCache(model.cfg.seq_len)
        parts = [model(idx[:, :P], cache=cache).logits]
        assert cache.pos == P
        for t in range(P, idx.shape[1]):
            parts.append(model(idx[:, t:t + 1], cache=cache).logits)
        assert cache.pos == idx.shape[1]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_multi_token_chunks_after_prefix(arch):
    model = make_model(arch, n_kv_heads=2)
    idx = tokens(2, 24, seed=33)
    with torch.no_grad():
        full = model(idx).logits
        cache = KVCache(32)
        parts = [model(idx[:, a:b], cache=cache).logits for a, b in ((0, 6), (6, 13), (13, 14), (14, 24))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)


def test_kv_cache_with_overrides_and_forced_K():
    model = make_model("dual", n_kv_heads=2)
    idx = tokens(1, 16, seed=34)
    ov = Overrides(K=5, gates="deep-only")
    with torch.no_grad():
        full = model(idx, overrides=ov).logits
        cache = KVCache(16)
        parts = [model(idx[:, :9], cache=cache, overrides=ov).logits]
        parts += [model(idx[:, t:t + 1], cache=cache, overrides=ov).logits for t in range(9, 16)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)


def test_sequence_longer_than_context_raises():
    model = make_model("dual", perturb=False)
    with pytest.raises(ValueError, match="longer than the context"):
        model(tokens(1, 33))
    cache = KVCache(32)
    with torch.no_grad():
        model(tokens(1, 30), cache=cache)
    with pytest.raises(ValueError, match="longer than the context"):
        model(tokens(1, 3), cache=cache)


# ----------------------------------------------------------------------------------------------
# Training signal


@pytest.mark.parametrize("arch,gate_mode", [("wide", "two_gates"), ("loop", "two_gates"), ("dual", "two_gates"),
                                            ("dual", "convex"), ("dual", "softmax")])
def test_every_used_parameter_gets_a_finite_nonzero_gradient(arch, gate_mode):
    model = make_model(arch, gate_mode=gate_mode, K=3, max_loops=6, ponder_weight=0.01).train()
    idx, tgt = tokens(2, 16, seed=35), tokens(2, 16, seed=36)
    model(idx, tgt).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if name.endswith("step_gain"):  # only the first K of the max_loops gains are used
            assert (p.grad[:3] != 0).all() and not p.grad[3:].any(), name
        else:
            assert p.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------------------------
# torch.compile (used by the trainer and the benchmarks) computes what eager mode computes


@pytest.mark.slow
@pytest.mark.parametrize("arch,kw", [("dual", dict(n_kv_heads=2)), ("wide", {}), ("loop", {}),
                                     ("duo", dict(d_ffn_big=128))])  # train.compile=auto compiles every arch
def test_compiled_model_matches_eager_loss_and_gradients(arch, kw):
    model = make_model(arch, **kw).train()
    x = tokens(2, 32, seed=5)
    keys = torch.tensor([[0, 1, 2], [0, 1, 3]])  # Duo's random routing drawn from the keys: the same in both
    eager = model(x, x, sample_keys=keys)
    eager.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads) > len(list(model.parameters())) // 2
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model)(x, x, sample_keys=keys)
    compiled.loss.backward()
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=0, atol=1e-5)
    for n, p in model.named_parameters():  # the same parameters get a gradient (Duo: the modules routed to)
        assert (p.grad is not None) == (n in grads), n
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-5, msg=n)

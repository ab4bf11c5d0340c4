"""Adaptive depth at inference (AdaptivePolicy): early exit from the deep loop, gate-driven path skipping, the
realised FLOPs they save, and their use through generation, evaluation and the CLI."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dualpath.errors import ConfigError
from dualpath.generate import generate_tokens
from dualpath.model import AdaptivePolicy, FlopTally, KVCache, Overrides

from helpers import one_thread, perturbed_model, tiny_config  # noqa: F401  (autouse: one intra-op thread)

P = AdaptivePolicy
POLICIES = [P(exit=0.3), P(exit=0.5, deep=0.3, wide=0.5), P(deep=0.4, wide=0.4), P(delta=0.5),
            P(exit=0.2, delta=0.4, deep=0.5), P(exit=1.0), P(deep=2.0, wide=2.0)]


def _dual(K=3, seed=1, **kw):
    return perturbed_model(tiny_config("dual", K=K, **kw), seed=seed)


def _idx(B=2, T=24, seed=0):
    return torch.randint(0, 320, (B, T), generator=torch.Generator().manual_seed(seed))


def _logits(model, idx, pol=None, **ov):
    with torch.no_grad():
        return model(idx, overrides=Overrides(adaptive=pol, **ov)).logits


# ----------------------------------------------------------------------------------------------
# An independent reference: every token runs every step densely, then the policy masks the results. A token
# that left keeps its state, so the next dense step's keys/values at its position are those of its last state.


def _reference_loop(path, x, rope, pol, run, K):
    gains = path.step_gains(K)
    state, active = x, run.clone()
    out = torch.where(run.unsqueeze(-1), torch.zeros_like(x), x)
    rem = torch.ones_like(x[..., 0])
    for k in range(K):
        new = path.block(state, gains[k], rope)
        if k == K - 1:
            w, left, leave = rem, rem, torch.ones_like(active)
        else:
            q = path.halt(new, k / (K - 1))
            left = rem * (1 - q)
            leave = left < pol.exit if pol.exit is not None else torch.zeros_like(active)
            if pol.delta is not None:
                leave = leave | ((new - state).norm(dim=-1) / state.norm(dim=-1) < pol.delta)
            w = torch.where(leave, rem, rem * q)
        a = active.unsqueeze(-1)
        out = torch.where(a, out + w.unsqueeze(-1) * new, out)
        state = torch.where(a, new, state)
        rem = torch.where(active, left, rem)
        active = active & ~leave
    return out


def _reference_forward(model, idx, pol):
    T = idx.shape[1]
    rope = (model.rope_cos[:T], model.rope_sin[:T])
    x = model.embed(idx)
    for layer in model.layers:
        everyone = torch.ones_like(idx, dtype=torch.bool)
        if model.cfg.arch == "loop":
            x = _reference_loop(layer.deep, x, rope, pol, everyone, layer.deep.K)
            continue
        g_d, g_w = layer.gate(x)
        run_d = g_d >= pol.deep if pol.deep is not None else everyone
        run_w = g_w >= pol.wide if pol.wide is not None else everyone
        h_deep = _reference_loop(layer.deep, x, rope, pol, run_d, layer.deep.K)
        h_wide = torch.where(run_w.unsqueeze(-1), layer.wide(x, rope), x)
        x = g_d.unsqueeze(-1) * h_deep + g_w.unsqueeze(-1) * h_wide
    return model.lm_head(model.norm(x))


@pytest.mark.parametrize("pol", POLICIES, ids=str)
def test_gathered_tokens_equal_the_dense_masked_reference(pol):
    model = _dual()
    idx = _idx()
    with torch.no_grad():
        ref = _reference_forward(model, idx, pol)
    torch.testing.assert_close(_logits(model, idx, pol), ref, rtol=1e-4, atol=1e-4)


def test_loop_model_early_exit_equals_the_reference():
    model = perturbed_model(tiny_config("loop", K=4), seed=3)
    idx = _idx(3, 20)
    for pol in (P(exit=0.3), P(exit=0.1, delta=0.5)):
        with torch.no_grad():
            ref = _reference_forward(model, idx, pol)
        torch.testing.assert_close(_logits(model, idx, pol), ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# The limits: never triggering is the full model bit for bit; always triggering is forced K=1 / one path.


@pytest.mark.parametrize("arch", ["dual", "loop"])
def test_thresholds_that_never_trigger_are_the_full_model_bit_for_bit(arch):
    model = perturbed_model(tiny_config(arch, K=3), seed=4)
    idx = _idx(2, 30)
    never = P(exit=0.0, deep=0.0, wide=0.0, delta=0.0) if arch == "dual" else P(exit=0.0, delta=0.0)
    for ov in ({}, {"K": 5}):
        assert torch.equal(_logits(model, idx, never, **ov), _logits(model, idx, None, **ov))
    tally = FlopTally()
    with torch.no_grad():
        model(idx, overrides=Overrides(adaptive=never), flops=tally)
    assert tally.total() == model.flops_per_token(30, "true") * idx.numel()


def test_exit_that_always_triggers_is_forced_K1_bit_for_bit():
    for arch in ("dual", "loop"):
        model = perturbed_model(tiny_config(arch, K=3), seed=5)
        idx = _idx(2, 20)
        assert torch.equal(_logits(model, idx, P(exit=1.0)), _logits(model, idx, None, K=1))


def test_skipping_that_always_triggers_is_the_single_path_bit_for_bit():
    """deep=2 (g_d < 2 always): y = g_d·x + g_w·h_wide, the model whose deep path is the identity (gains
    softplus(-1e4) = 0, one step); wide=2 likewise; both: y = (g_d + g_w)·x."""
    model = _dual(seed=6)
    idx = _idx(2, 20)
    gains = {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith(("step_gain", "beta"))}
    skip_deep, skip_wide, skip_both = (_logits(model, idx, P(deep=2.0)), _logits(model, idx, P(wide=2.0)),
                                       _logits(model, idx, P(deep=2.0, wide=2.0)))
    with torch.no_grad():
        for layer in model.layers:
            layer.deep.step_gain.fill_(-1e4)
        assert torch.equal(skip_deep, _logits(model, idx, None, K=1))
        for layer in model.layers:
            layer.wide.beta.fill_(-1e4)
        assert torch.equal(skip_both, _logits(model, idx, None, K=1))
        for name, p in model.named_parameters():
            if name.endswith("step_gain"):
                p.copy_(gains[name])
        assert torch.equal(skip_wide, _logits(model, idx, None))


# ----------------------------------------------------------------------------------------------
# Realised FLOPs: exact against FlopCounterMode on the executed path (halting routers are vector products
# the counter does not see; they are counted apart and checked against their closed form).


def _counted(model, idx, ov, cache=None):
    tally = FlopTally()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx, overrides=ov, flops=tally, cache=cache)
    return counter.get_total_flops(), tally


@pytest.mark.parametrize("pol", [None] + POLICIES, ids=str)
def test_realised_flops_equal_the_flop_counter(pol):
    model = _dual(n_kv_heads=2)
    idx = _idx(3, 20)
    ov = Overrides(adaptive=pol)
    counted, tally = _counted(model, idx, ov)
    assert tally.total() - tally.total(("halt",)) == counted
    # chunks after a cached prefix: queries see past + T keys
    cache = KVCache(64)
    with torch.no_grad():
        model(idx[:, :7], overrides=ov, cache=cache)
    counted, tally = _counted(model, idx[:, 7:], ov, cache)
    assert tally.total() - tally.total(("halt",)) == counted
    assert tally.tokens == 3 * 13


def test_halting_router_flops_are_counted_per_evaluation():
    model = _dual(K=4)
    idx = _idx(2, 16)
    diag_model_steps = []
    with torch.no_grad():
        out = model(idx, overrides=Overrides(adaptive=P(exit=0.3)), return_diagnostics=True)
        tally = FlopTally()
        model(idx, overrides=Overrides(adaptive=P(exit=0.3)), flops=tally)
    d = model.cfg.d_model
    for i, diag in enumerate(out.diagnostics):
        steps = diag["steps_run"]
        diag_model_steps.append(steps)
        # a router runs after each step but the last trained one: min(steps, K - 1) times per token
        routers = int(steps.clamp(max=3).sum())
        assert sum(v for (layer, part, _), v in tally.counts.items() if layer == i and part == "halt") \
            == routers * 2 * (d + 1)
        # halting weights of a token sum to 1 (all its mass is placed somewhere)
        torch.testing.assert_close(diag["halt_weights"].sum(-1), torch.ones_like(steps, dtype=torch.float32))
    assert any(bool((s < 4).any()) for s in diag_model_steps)


def test_exits_save_deep_flops_and_the_tally_reports_them():
    model = _dual(K=4)
    idx = _idx(2, 32)
    full, tally = FlopTally(), FlopTally()
    with torch.no_grad():
        model(idx, flops=full)
        model(idx, overrides=Overrides(adaptive=P(exit=0.4)), flops=tally)
    assert tally.per_token()["deep_flops_per_token"] < full.per_token()["deep_flops_per_token"]
    assert tally.by_part()["wide"] == full.by_part()["wide"] and tally.by_part()["head"] == full.by_part()["head"]


# ----------------------------------------------------------------------------------------------
# Generation: cached == uncached under a policy


@pytest.mark.parametrize("arch,pol", [("dual", P(exit=0.3)), ("dual", P(exit=0.5, deep=0.3, wide=0.5)),
                                      ("dual", P(delta=0.5)), ("dual", P(deep=2.0, wide=2.0)),
                                      ("loop", P(exit=0.1, delta=0.6))], ids=str)
def test_cached_generation_equals_uncached_under_a_policy(arch, pol):
    model = perturbed_model(tiny_config(arch, K=3), seed=2)
    prompt = [1, 2, 3, 4, 9, 11]
    ov = Overrides(adaptive=pol)
    cached = list(generate_tokens(model, prompt, 30, overrides=ov, use_cache=True))
    assert cached == list(generate_tokens(model, prompt, 30, overrides=ov, use_cache=False))
    seq = torch.tensor([prompt + cached[:20]])
    with torch.no_grad():
        full = model(seq, overrides=ov).logits
        cache = KVCache(64)
        parts = [model(seq[:, :6], overrides=ov, cache=cache).logits]
        parts += [model(seq[:, t:t + 1], overrides=ov, cache=cache).logits for t in range(6, seq.shape[1])]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# The policy itself


def test_policy_parses_prints_and_rejects():
    pol = P.parse("exit=0.1,deep=0.05,wide=0.2")
    assert pol == P(exit=0.1, deep=0.05, wide=0.2) and str(pol) == "exit=0.1,deep=0.05,wide=0.2"
    assert P.parse(str(pol)) == pol
    assert P.parse("exit=0.1;delta=0.02") == P.parse("exit=0.1/delta=0.02") == P(exit=0.1, delta=0.02)
    assert P.parse("none") == P() and str(P()) == "none"
    for bad, needle in (("exit", "KEY=VALUE"), ("depth=1", "KEY=VALUE"), ("exit=x", "not a number"),
                        ("exit=-1", ">= 0"), ("exit=0.1,exit=0.2", "twice"), ("exit=nan", ">= 0")):
        with pytest.raises(ConfigError, match=needle):
            P.parse(bad)


def test_policy_needs_what_it_acts_on():
    idx = _idx(1, 8)
    with pytest.raises(ConfigError, match="loop or dual"):
        perturbed_model(tiny_config("wide"))(idx, overrides=Overrides(adaptive=P(exit=0.1)))
    with pytest.raises(ConfigError, match="gates"):
        perturbed_model(tiny_config("loop"))(idx, overrides=Overrides(adaptive=P(deep=0.1)))
    P(deep=0.1).check(tiny_config("dual"))


# ----------------------------------------------------------------------------------------------
# The CLI: eval --adaptive, --adaptive-sweep, generate --adaptive, errors


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    from helpers import SHAKESPEARE, save_tiny_checkpoint, train_tiny_tokenizer

    if not SHAKESPEARE.is_file():
        pytest.skip("shared data missing")
    root = tmp_path_factory.mktemp("adaptive_cli")
    tok = train_tiny_tokenizer(root / "tok" / "tokenizer.json")
    ckpt = save_tiny_checkpoint(root / "run", _dual(K=3, seed=8), tok)
    text = root / "t.txt"
    text.write_text(SHAKESPEARE.read_text()[:3000])
    return ckpt, text, tok


def test_eval_cli_reports_realised_flops_beside_the_full_row(cli_run, tmp_path, capsys):
    import json

    from dualpath.cli import main

    ckpt, text, _ = cli_run
    out = tmp_path / "res.json"
    assert main(["eval", str(ckpt), "--data", str(text), "--adaptive", "exit=0.3,deep=0.3", "--adaptive",
                 "exit=1", "--K", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| adaptive exit=0.3,deep=0.3 |" in printed and "Realised compute" in printed
    rows = {k: v["t"] for k, v in json.loads(out.read_text())["variants"].items()}
    full, ad, k1, always = rows["trained (K=3)"], rows["adaptive exit=0.3,deep=0.3"], rows["K=1"], rows["adaptive exit=1"]
    assert ad["deep_flops_per_token"] < full["deep_flops_per_token"] and ad["bpb"] != full["bpb"]
    assert always["bpb"] == k1["bpb"]  # exit that always triggers is forced K = 1 (plus its halting router)
    assert always["flops_per_token"] == k1["flops_per_token"] + 2 * (32 + 1) * 2  # 2 layers, one router each


def test_adaptive_sweep_writes_csv_and_png_with_the_fixed_K_curve(cli_run, tmp_path, capsys):
    import csv

    from dualpath.cli import main

    ckpt, text, _ = cli_run
    out = tmp_path / "sweep"
    assert main(["eval", str(ckpt), "--data", str(text), "--adaptive-sweep", str(out), "--sweep-exit", "0.5,0.1",
                 "--sweep-deep", "0.3", "--limit", "2"]) == 0
    assert "wrote" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "adaptive_sweep.csv").open()))
    kinds = [r["kind"] for r in rows]
    assert kinds == ["full", "fixed_K", "fixed_K"] + ["adaptive"] * 5  # (off, .5, .1) x (off, .3) - (off, off)
    assert [r["K"] for r in rows[:3]] == ["3", "1", "2"]
    assert float(rows[0]["deep_flops_saving"]) == 0.0
    assert all(float(r["deep_flops_saving"]) > 0 for r in rows[1:])
    assert (out / "adaptive_sweep.png").stat().st_size > 1000


def test_generate_cli_takes_the_policy(cli_run, capsys):
    from dualpath.cli import main
    from dualpath.eval.evaluate import load_tokenizer

    ckpt, _, tok_json = cli_run
    tok = load_tokenizer(tok_json.parent)
    eos = tok.token_to_id("<|endoftext|>")
    model = _dual(K=3, seed=8)
    pol = P(exit=0.3, wide=0.4)
    ids = list(generate_tokens(model, [eos] + tok.encode("ROMEO:").ids, 6, eos_id=eos,
                               overrides=Overrides(adaptive=pol)))
    assert ids != list(generate_tokens(model, [eos] + tok.encode("ROMEO:").ids, 6, eos_id=eos))
    assert main(["generate", str(ckpt), "--prompt", "ROMEO:", "--max-new-tokens", "6", "--temperature", "0",
                 "--adaptive", str(pol)]) == 0
    assert capsys.readouterr().out == "ROMEO:" + tok.decode(ids) + "\n"


@pytest.mark.parametrize("args,needle", [
    (["eval", "{ckpt}", "--data", "{text}", "--adaptive", "exit=x"], "not a number"),
    (["eval", "{ckpt}", "--data", "{text}", "--adaptive", "depth=1"], "KEY=VALUE"),
    (["eval", "{ckpt}", "--data", "{text}", "--adaptive-sweep", "{out}", "--sweep-exit", "-1"], ">= 0"),
    (["eval", "{wide}", "--data", "{text}", "--adaptive", "exit=0.1"], "loop or dual"),
    (["eval", "{wide}", "--data", "{text}", "--adaptive-sweep", "{out}"], "loop or dual"),
    (["eval", "{ckpt}", "--data", "{text}", "{text}", "--adaptive-sweep", "{out}"], "one dataset"),
    (["generate", "{wide}", "--prompt", "hi", "--adaptive", "exit=0.1"], "loop or dual"),
    (["generate", "{ckpt}", "--prompt", "hi", "--adaptive", "exit=0.1,,exit=0.2"], "twice"),
])
def test_adaptive_cli_errors_are_one_line_and_write_nothing(args, needle, cli_run, tmp_path, capsys):
    from dualpath.cli import main
    from helpers import save_tiny_checkpoint

    ckpt, text, tok = cli_run
    wide = save_tiny_checkpoint(tmp_path / "wide", perturbed_model(tiny_config("wide")), tok)
    subs = {"{ckpt}": str(ckpt), "{text}": str(text), "{wide}": str(wide), "{out}": str(tmp_path / "sweep")}
    assert main([subs.get(a, a) for a in args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not captured.out and not (tmp_path / "sweep").exists()


def test_gate_oracle_reports_each_patterns_realised_flops():
    """dualpath duo gates: a pattern's FLOPs are those of a forward that runs it (a path with a zero gate in a
    layer skipped there), as a FlopTally counts them."""
    from dualpath.routing import gate_search

    model = _dual(K=2, seed=7)
    idx = _idx(2, 16)
    res = gate_search(model, [(idx, idx)], max_patterns=16)
    by = {p["pattern"]: p["flops_per_token"] for p in res["patterns"]}
    assert len(by) == 9 and res["learned_flops_per_token"] == model.flops_per_token(16)
    letters = res["letters"]
    for choice in ("deep-favoured", "wide-favoured"):
        tally = FlopTally()
        with torch.no_grad():
            model(idx, overrides=Overrides(gates=choice), flops=tally)
        assert by[letters[choice] * 2] == tally.total() / tally.tokens < model.flops_per_token(16)

"""Duo-LLM stages 2-3 and the routing search: exact equivalences of the routing, the prefix-shared search
against brute force, beam search, the router's budget loss, the Dual-Path plug-in, the command-level
functions end to end, and their user errors.

Tiny models (d_model 32, 4 layers, vocab 128, T = 16), CPU, fp32, one thread, fixed seeds. Every weight is
re-drawn at a scale where every branch matters (at initialisation a layer is nearly the identity, which
would let a broken path hide under any tolerance).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dualpath import DualPathLM, ModelConfig
from dualpath.checkpoint import save_checkpoint
from dualpath.config import RunConfig
from dualpath.data.shards import write_shard
from dualpath.model import BIG, SKIP, SMALL, parse_pattern, pattern_string, realised_flops
from dualpath.routing import (check_budgets, evaluate_routed, gate_search, oracle, report, run_oracle, run_report,
                                run_train_router, train_router)
from dualpath.errors import CheckpointError, ConfigError, DualPathError
from dualpath.routing.adapters import DualSearchModel, DuoSearchModel
from dualpath.routing.report import report_markdown
from dualpath.routing.search import PatternEvaluator, SearchSpace, beam_search, pattern_from_string, search

from helpers import perturb_, one_thread  # noqa: F401  (autouse: one intra-op thread)

VOCAB, T, L = 128, 16, 4
TIGHT = dict(rtol=0.0, atol=2e-5)


def duo_cfg(**kw) -> ModelConfig:
    base = dict(arch="duo", vocab_size=VOCAB, d_model=32, n_layers=L, n_heads=4, n_kv_heads=2, seq_len=32,
                d_ffn_big=192, d_ffn_small=48, ffn_multiple=16)
    base.update(kw)
    return ModelConfig(**base)


def duo_model(seed=0, **kw) -> DualPathLM:
    torch.manual_seed(seed)
    return perturb_(DualPathLM(duo_cfg(**kw)).eval(), seed + 100, routers=False)


def tokens(B, n=T, seed=0):
    return torch.randint(0, VOCAB, (B, n), generator=torch.Generator().manual_seed(seed))


def batches_of(seed=0, n_seq=6, bs=4, ignore_tail=True):
    x, y = tokens(n_seq, seed=seed), tokens(n_seq, seed=seed + 1)
    if ignore_tail:
        y[0, -3:] = -1  # ignored targets must not count anywhere
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n_seq, bs)]


# ----------------------------------------------------------------------------------------------
# Routing equivalences


def test_all_big_pattern_equals_a_dense_model():
    duo = duo_model(0)
    dense = DualPathLM(ModelConfig(arch="wide", vocab_size=VOCAB, d_model=32, n_layers=L, n_heads=4, n_kv_heads=2,
                                   seq_len=32, d_ffn_wide=192, ffn_multiple=16, wide_gain=False)).eval()
    sd = {"embed.weight": duo.embed.weight, "norm.weight": duo.norm.weight, "lm_head.weight": duo.lm_head.weight}
    for i, layer in enumerate(duo.layers):
        pre = f"layers.{i}.wide.block."
        for src, dst in (("attn_norm", "attn_norm"), ("attn", "attn"), ("ffn_norm", "ffn_norm"), ("ffn_big", "ffn")):
            for k, v in getattr(layer, src).state_dict().items():
                sd[pre + f"{dst}.{k}"] = v
    dense.load_state_dict(sd, strict=True)
    x = tokens(3)
    ref = dense(x).logits
    mask = torch.zeros(L, 3, T, dtype=torch.long)
    torch.testing.assert_close(duo(x, choices=mask).logits, ref, **TIGHT)
    pat = DualPathLM(duo_cfg(duo_policy="pattern", duo_pattern="B" * L)).eval()
    pat.load_state_dict(duo.state_dict())
    torch.testing.assert_close(pat(x).logits, ref, **TIGHT)
    # and the search adapter's layer-by-layer path gives the same per-token losses
    y = tokens(3, seed=5)
    ev = PatternEvaluator(DuoSearchModel(duo), [(x, y)])
    torch.testing.assert_close(ev.token_losses(("big",) * L), dense(x, y, return_per_token_loss=True).per_token_loss,
                               **TIGHT)


@pytest.mark.parametrize("skip_whole_layer", [False, True])
def test_gather_scatter_routing_equals_masked_dense_computation(skip_whole_layer):
    model = duo_model(1, skip_whole_layer=skip_whole_layer)
    B = 3
    x = tokens(B, seed=2)
    choice = torch.randint(0, 3, (L, B, T), generator=torch.Generator().manual_seed(3))
    choice[0, 0] = BIG  # a row with a single choice, and a layer with all three
    out = model(x, choices=choice, return_diagnostics=True)
    with torch.no_grad():
        h = model.embed(x)
        rope = (model.rope_cos[:T], model.rope_sin[:T])
        for i, layer in enumerate(model.layers):
            a = h + layer.attn(layer.attn_norm(h), rope)
            z = layer.ffn_norm(a)
            big, small = a + layer.ffn_big(z), a + layer.ffn_small(z)  # both FFNs on every token
            skip = h if skip_whole_layer else a
            c = choice[i].unsqueeze(-1)
            h = torch.where(c == BIG, big, torch.where(c == SMALL, small, skip))
        ref = model.lm_head(model.norm(h))
    torch.testing.assert_close(out.logits, ref, **TIGHT)
    for i, d in enumerate(out.diagnostics):
        assert torch.equal(d["duo_choice"], choice[i])
    # realised FLOPs: attention on every token (or only non-skipped ones), each FFN on its own tokens
    f = model.layers[0].module_flops(T)
    n_tok = B * T
    attn = sum(int((c != SKIP).sum()) if skip_whole_layer else n_tok for c in choice)
    expect = (attn * f["attn"] + int((choice == BIG).sum()) * f["big"] + int((choice == SMALL).sum()) * f["small"]
              + n_tok * 2.0 * model.cfg.d_model * VOCAB)
    assert realised_flops(model, choice, T) == pytest.approx(expect, rel=1e-12)


@pytest.mark.parametrize("skip_whole_layer", [False, True])
def test_search_adapter_siblings_equal_the_layer_forward(skip_whole_layer):
    model = duo_model(2, skip_whole_layer=skip_whole_layer)
    sm = DuoSearchModel(model)
    x = model.embed(tokens(2)).detach()
    with torch.no_grad():
        for i in range(L):
            multi = sm.apply_layer_multi(i, x, ["big", "small", "skip"])
            for c, m in zip(["big", "small", "skip"], multi):
                torch.testing.assert_close(m, sm.apply_layer(i, x, c), **TIGHT)


# ----------------------------------------------------------------------------------------------
# Search


def brute_force(model, batches, patterns):
    """Every pattern through the model's own forward with an explicit routing mask."""
    per_pattern = []
    with torch.no_grad():
        for p in patterns:
            codes = torch.tensor(parse_pattern(p, L))
            per_pattern.append(torch.cat([
                model(x, y, choices=codes.view(L, 1, 1).expand(L, *x.shape),
                      return_per_token_loss=True).per_token_loss for x, y in batches]))
    losses = torch.stack(per_pattern)  # (P, N, T)
    valid = torch.cat([y != -1 for _, y in batches])
    n = valid.sum()
    mean = [(lo[valid].double().sum() / n).item() for lo in losses]
    seq = (losses.double() * valid).sum(-1)  # (P, N)
    return {"pattern_loss": dict(zip(patterns, mean)),
            "best": min(mean), "best_pattern": patterns[int(np.argmin(mean))],
            "per_sequence_oracle": (seq.min(0).values.sum() / n).item(),
            "per_token_oracle": (losses.min(0).values[valid].double().sum() / n).item()}


@pytest.mark.parametrize("with_skip,k", [(False, 2), (True, 1), (True, 3)])
def test_prefix_shared_search_equals_brute_force_enumeration(with_skip, k):
    model = duo_model(3)
    batches = batches_of(4)
    res = oracle(model, batches, [k], with_skip=with_skip)
    e = res["budgets"][k]
    space = SearchSpace(L, ("big", "small", "skip") if with_skip else ("big", "small"), "big", k)
    patterns = ["".join({"big": "B", "small": "S", "skip": "X"}[c] for c in p) for p in space.enumerate()]
    assert len(patterns) == space.count() == math.comb(L, k) * (2 if with_skip else 1) ** (L - k)
    assert len(set(patterns)) == len(patterns) and all(p.count("B") == k for p in patterns)
    bf = brute_force(model, batches, patterns)
    assert e["method"] == "enumerate" and e["n_evaluated"] == len(patterns)
    got = {p["pattern"]: p["loss"] for p in e["patterns"]}
    assert set(got) == set(bf["pattern_loss"])
    for p, lo in bf["pattern_loss"].items():
        assert got[p] == pytest.approx(lo, abs=1e-5)
    assert e["best_single"]["loss"] == pytest.approx(bf["best"], abs=1e-5)
    assert e["per_sequence_oracle"]["loss"] == pytest.approx(bf["per_sequence_oracle"], abs=1e-5)
    assert e["per_token_oracle"]["loss"] == pytest.approx(bf["per_token_oracle"], abs=1e-5)
    # the oracles order as they must, and the per-token one says it is optimistic
    assert e["per_token_oracle"]["loss"] <= e["per_sequence_oracle"]["loss"] <= e["best_single"]["loss"] + 1e-12
    assert e["per_token_oracle"]["optimistic"] and "label" in res["note"]
    # prefix sharing computed fewer layers than L per pattern
    assert e["layer_calls"] < L * len(patterns) * len(batches)


def test_naive_evaluator_equals_prefix_shared_and_counts_calls():
    model = duo_model(4)
    batches = batches_of(5)
    space = SearchSpace(L, ("big", "small"), "big", 2)
    pats = list(space.enumerate())
    sm = DuoSearchModel(model)
    shared, naive = PatternEvaluator(sm, batches), PatternEvaluator(sm, batches, share_prefix=False)
    a, b = shared.evaluate(pats), naive.evaluate(pats)
    assert a == pytest.approx(b, abs=1e-5)
    ra, rb = shared.result(), naive.result()
    for key in ("best_loss", "per_sequence_oracle", "per_token_oracle"):
        assert ra[key] == pytest.approx(rb[key], abs=1e-6)
    assert naive.layer_calls == L * len(pats) * len(batches)
    # prefix sharing computes one layer per node of the pattern trie (per batch)
    n_nodes = sum(len({p[:d] for p in pats}) for d in range(1, L + 1))
    assert shared.layer_calls == n_nodes * len(batches)
    # evaluating again is free (cached)
    calls = shared.layer_calls
    assert shared.evaluate(pats[:2]) == a[:2] and shared.layer_calls == calls


def test_beam_search_wide_enough_equals_enumeration_and_narrow_beam_is_feasible():
    model = duo_model(5)
    batches = batches_of(6)
    sm = DuoSearchModel(model)
    space = SearchSpace(L, ("big", "small", "skip"), "big", 2)
    full = search(sm, batches, space)
    wide = search(sm, batches, space, max_patterns=1, beam=1000)
    assert full["method"] == "enumerate" and wide["method"] == "beam"
    assert sorted(wide["pattern_strings"]) == sorted(full["pattern_strings"])
    assert wide["best_loss"] == pytest.approx(full["best_loss"], abs=1e-6)
    assert wide["best_pattern_string"] == full["best_pattern_string"]
    assert wide["per_sequence_oracle"] == pytest.approx(full["per_sequence_oracle"], abs=1e-6)
    assert wide["per_token_oracle"] == pytest.approx(full["per_token_oracle"], abs=1e-6)
    narrow = search(sm, batches, space, max_patterns=1, beam=2)
    assert narrow["n_evaluated"] < full["n_evaluated"]
    assert all(p.count("B") == 2 for p in narrow["pattern_strings"])  # every scored completion is feasible
    assert narrow["best_loss"] >= full["best_loss"] - 1e-9
    # the final beam is made of complete patterns, best first
    ev = PatternEvaluator(sm, batches)
    final = beam_search(ev, space, 3)
    losses = ev.evaluate(final)
    assert len(final) == 3 and losses == sorted(losses)


def test_search_space_completion_and_counts():
    s = SearchSpace(6, ("big", "small", "skip"), "big", 3)
    assert s.count() == math.comb(6, 3) * 2 ** 3 == len(list(s.enumerate()))
    assert s.complete(()) == ("small", "big", "small", "big", "small", "big")
    assert s.complete(("big", "big")) == ("big", "big", "small", "small", "big", "small")
    assert s.complete(("big", "big", "big", "skip")) == ("big", "big", "big", "skip", "small", "small")
    assert not s.can_extend(("big",) * 3, "big") and not s.can_extend(("small",) * 3, "small")
    u = SearchSpace(3, ("learned", "deep-favoured", "wide-favoured"))
    assert u.count() == 27 and u.default == "learned" and u.complete(("wide-favoured",))[1:] == ("learned",) * 2


# ----------------------------------------------------------------------------------------------
# Stage 3: routers


def test_budget_loss_drives_the_router_to_its_target_fraction():
    model = duo_model(6)
    data = torch.randint(0, VOCAB, (64, T + 1), generator=torch.Generator().manual_seed(7))

    def batch_fn(step):
        w = data[(step * 8) % 64:(step * 8) % 64 + 8]
        return w[:, :-1], w[:, 1:]

    held_out = [(data[:32, :-1], data[:32, 1:])]
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    for target in (0.25, 0.75):
        torch.manual_seed(0)
        rm, hist = train_router(model, batch_fn, target, steps=150)
        ev = evaluate_routed(rm, held_out)
        assert abs(ev["big_fraction"] - target) < 0.05, (target, ev["big_fraction"])
        assert hist[0]["tau"] == pytest.approx(1.0) and hist[-1]["tau"] == pytest.approx(0.05)
        assert all(layer.router_hard and layer.router_temperature == 1.0 for layer in rm.layers)
        # the base model is frozen: only routers differ from it, and the input model is untouched
        for k, v in rm.state_dict().items():
            if ".router." not in k:
                assert torch.equal(v, base_state[k]), k
        for k, v in model.state_dict().items():
            assert torch.equal(v, base_state[k]), k
        # the routed FLOPs sit between all-small and all-big
        lo = realised_flops(model, torch.full((L, 1, 1), SMALL), T)
        hi = realised_flops(model, torch.full((L, 1, 1), BIG), T)
        assert lo < ev["flops_per_token"] < hi


# ----------------------------------------------------------------------------------------------
# The Dual-Path plug-in


def dual_model(seed=0, n_layers=3):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="dual", vocab_size=VOCAB, d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=4,
                      seq_len=32, d_ffn_deep=96, d_ffn_wide=192, ffn_multiple=16, K=2, max_loops=4)
    return perturb_(DualPathLM(cfg).eval(), seed + 100, routers=False)


def test_dual_path_plugs_into_the_search():
    model = dual_model(8)
    x = tokens(2, seed=9)
    learned = model(x, return_diagnostics=True).diagnostics
    lc = [None, "deep-favoured", "wide-favoured"]
    forced = model(x, choices=lc, return_diagnostics=True).diagnostics
    total = learned[1]["gate_deep"] + learned[1]["gate_wide"]
    torch.testing.assert_close(forced[1]["gate_deep"], total, **TIGHT)  # the whole gate sum moves to deep
    assert torch.count_nonzero(forced[1]["gate_wide"]) == 0
    assert torch.count_nonzero(forced[2]["gate_deep"]) == 0
    torch.testing.assert_close(forced[0]["gate_deep"], learned[0]["gate_deep"], **TIGHT)  # layer 0 as learned
    sm = DualSearchModel(model)
    h = model.embed(x).detach()
    with torch.no_grad():
        for i in range(3):
            for c, out in zip(sm.choices, sm.apply_layer_multi(i, h, list(sm.choices))):
                torch.testing.assert_close(out, sm.apply_layer(i, h, c), **TIGHT)
    batches = batches_of(10, n_seq=4)
    res = gate_search(model, batches)
    assert res["method"] == "enumerate" and res["n_evaluated"] == 27
    lo = model(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])).loss.item()
    assert res["learned_loss"] == pytest.approx(lo, abs=1e-5)  # the all-learned pattern is the model itself
    assert res["per_token_oracle"] <= res["per_sequence_oracle"] <= res["best_single_loss"] \
        <= res["learned_loss"] + 1e-9
    beam = gate_search(model, batches, max_patterns=1, beam=2)
    assert beam["method"] == "beam" and beam["n_evaluated"] < 27
    assert beam["best_single_loss"] >= res["best_single_loss"] - 1e-9


# ----------------------------------------------------------------------------------------------
# Commands end to end, and their errors


@pytest.fixture(scope="module")
def duo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("duo")
    data = root / "data"
    data.mkdir()
    gen = np.random.default_rng(0)
    write_shard(data / "train_000.bin", gen.integers(0, VOCAB, 4000), VOCAB)
    write_shard(data / "val_000.bin", gen.integers(0, VOCAB, 600), VOCAB)
    (data / "meta.json").write_text(json.dumps({"vocab_size": VOCAB}))
    model = duo_model(11)
    ckpt = save_checkpoint(root / "base", 1, model.state_dict(), RunConfig(model=model.cfg))
    return root, data, ckpt


def test_oracle_router_and_report_commands_write_their_outputs(duo_run):
    root, data, ckpt = duo_run
    res = run_oracle(ckpt, data, [1, 2], root / "oracle", max_sequences=6, batch_size=4, seq_len=T)
    assert set(res["budgets"]) == {"1", "2"}
    for name in ("oracle.json", "oracle.md", "oracle_patterns.csv", "oracle_sequences.csv", "layer_usage_by_layer.png",
                 "layer_usage_by_position.png"):
        assert (root / "oracle" / name).is_file(), name
    assert "optimistic" in (root / "oracle" / "oracle.md").read_text()
    rows = (root / "oracle" / "oracle_patterns.csv").read_text().splitlines()
    assert len(rows) == 1 + math.comb(L, 1) + math.comb(L, 2)
    r = run_train_router(ckpt, data, 0.5, root / "router", steps=20, batch_size=4, seq_len=T, eval_sequences=6)
    assert 0.0 <= r["achieved_big_fraction"] <= 1.0 and r["target"] == 0.5
    rep = run_report(ckpt, data, [1, 2], root / "report", random_trials=3, routers=[r["checkpoint"]],
                     max_sequences=6, batch_size=4, seq_len=T)
    methods = {(row["method"], row["budget"]) for row in rep["rows"]}
    for m in ("random routing", "best of N random patterns", "best single pattern", "per-sequence oracle",
              "per-token oracle"):
        assert (m, 1) in methods and (m, 2) in methods
    assert ("all-big", L) in methods and ("all-small", 0) in methods
    routed = [row for row in rep["rows"] if row["method"] == "trained router"]
    assert any(row["budget"] == 2 and row["loss"] is not None for row in routed)  # target 0.5 -> k = 2
    assert any(row["budget"] == 1 and row["loss"] is None for row in routed)  # marked missing
    by = {(row["method"], row["budget"]): row for row in rep["rows"]}
    for k in (1, 2):
        # fixed patterns are chosen on training windows: only the in-sample best bounds them on the scored data
        assert by[("per-token oracle", k)]["loss"] <= by[("per-sequence oracle", k)]["loss"] \
            <= by[("best single pattern, in-sample", k)]["loss"] <= min(
                by[("best single pattern", k)]["loss"], by[("best of N random patterns", k)]["loss"]) + 1e-9
        assert by[("best single pattern", k)]["flops_per_token"] == pytest.approx(
            by[("best of N random patterns", k)]["flops_per_token"])
    assert by[("all-small", 0)]["flops_per_token"] < by[("best single pattern", 1)]["flops_per_token"] \
        < by[("best single pattern", 2)]["flops_per_token"] < by[("all-big", L)]["flops_per_token"]
    d = rep["difficulty"]["2"]
    assert -1 <= d["pearson_vs_small_loss"] <= 1 and 0 <= d["share_not_helped_top_decile"] <= 1
    for name in ("summary.md", "report.json", "report.csv", "loss_vs_flops.png", "difficulty_hist.png",
                 "difficulty_vs_loss.png"):
        assert (root / "report" / name).is_file(), name
    assert "optimistic" in (root / "report" / "summary.md").read_text()


def test_report_difficulty_matches_its_definition():
    model = duo_model(12)
    batches = batches_of(13, n_seq=4, ignore_tail=False)
    res = report(model, batches, [2], random_trials=2)
    sm = DuoSearchModel(model)
    ev = PatternEvaluator(sm, batches)
    small = ev.token_losses(("small",) * L).reshape(-1).numpy()
    orc = oracle(model, batches, [2])["budgets"][2]["_result"]["tok_best"].reshape(-1).numpy()
    np.testing.assert_allclose(res["_diff"][2], small - orc, atol=1e-5)
    assert res["difficulty"][2]["mean"] == pytest.approx(float((small - orc).mean()), abs=1e-5)


def test_per_sequence_choice_from_the_prefix_equals_brute_force():
    """Held out within the sequence: each sequence's pattern is the best on its first T/2 positions (its
    labels there), scored on the rest, beside the oracles on the same positions; recomputed by hand."""
    model = duo_model(14)
    batches = batches_of(15, n_seq=6)
    k = 2
    res = report(model, batches, [k], random_trials=3, variable_budget=False, n_boot=50)
    w = res["within_sequence"][k]
    sp = T // 2
    assert w["split"] == sp
    space = SearchSpace(L, ("big", "small"), "big", k)
    patterns = ["".join({"big": "B", "small": "S"}[c] for c in p) for p in space.enumerate()]
    per = []
    with torch.no_grad():
        for p in patterns:
            codes = torch.tensor(parse_pattern(p, L))
            per.append(torch.cat([model(x, y, choices=codes.view(L, 1, 1).expand(L, *x.shape),
                                        return_per_token_loss=True).per_token_loss for x, y in batches]))
    losses = torch.stack(per).double()  # (P, N, T)
    valid = torch.cat([y != -1 for _, y in batches])
    losses = losses * valid
    pre, suf = losses[:, :, :sp].sum(-1), losses[:, :, sp:].sum(-1)  # (P, N)
    n_suf = int(valid[:, sp:].sum())
    assert w["n_tokens"] == n_suf
    choice = pre.argmin(0)
    expect = {"per-sequence choice from the prefix": suf.gather(0, choice[None])[0].sum() / n_suf,
              "per-sequence oracle": suf.min(0).values.sum() / n_suf,
              "per-token oracle": losses[:, :, sp:].min(0).values.sum() / n_suf}
    got = {r["method"]: r for r in w["rows"]}
    for m, v in expect.items():
        assert got[m]["loss"] == pytest.approx(float(v), abs=1e-5), m
        assert got[m]["ci_low"] <= got[m]["loss"] <= got[m]["ci_high"]
    # the best single pattern of the main table, scored on the same positions
    best = [r for r in res["rows"] if r["method"] == "best single pattern"][0]["pattern"]
    assert got["best single pattern"]["loss"] == pytest.approx(float(suf[patterns.index(best)].sum() / n_suf),
                                                               abs=1e-5)
    # the oracles bound the held-out choice; the paired differences are the differences of the rows
    assert got["per-token oracle"]["loss"] <= got["per-sequence oracle"]["loss"] + 1e-9
    assert got["per-sequence oracle"]["loss"] <= got["per-sequence choice from the prefix"]["loss"] + 1e-9
    for c in w["comparisons"]:
        assert c["delta"] == pytest.approx(got[c["a"]]["loss"] - got[c["b"]]["loss"], abs=1e-9)
    assert "held out within the sequence" in report_markdown(res)


def test_user_errors(duo_run, tmp_path):
    _, data, ckpt = duo_run
    model = duo_model(0)
    with pytest.raises(ConfigError, match="more than the model's 4 layers"):
        oracle(model, batches_of(), [5])
    with pytest.raises(DualPathError, match="more than"):
        run_oracle(ckpt, data, [1, 9], tmp_path / "o")
    with pytest.raises(ConfigError):
        check_budgets([-1], L)
    with pytest.raises(ConfigError, match="unknown choice letter"):
        parse_pattern("BBQS", L)
    with pytest.raises(ConfigError, match="unknown choice letter"):
        pattern_from_string(DuoSearchModel(model), "BBQS")
    with pytest.raises(ConfigError, match="unknown choice"):
        PatternEvaluator(DuoSearchModel(model), batches_of()).evaluate([("big", "huge", "small", "small")])
    assert pattern_string(parse_pattern("bsxb", L)) == "BSXB"
    dual = dual_model(0)
    dual_ckpt = save_checkpoint(tmp_path / "dual", 1, dual.state_dict(), RunConfig(model=dual.cfg))
    for fn in (lambda: run_oracle(dual_ckpt, data, [1], tmp_path / "o"),
               lambda: run_train_router(dual_ckpt, data, 0.5, tmp_path / "r", steps=1),
               lambda: run_report(dual_ckpt, data, [1], tmp_path / "rep")):
        with pytest.raises(CheckpointError, match="model.arch=duo"):
            fn()
    with pytest.raises(CheckpointError):
        oracle(dual, batches_of(), [1])
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        run_train_router(ckpt, data, 1.5, tmp_path / "r", steps=1)
    with pytest.raises(CheckpointError, match="not a router checkpoint"):
        run_report(ckpt, data, [1], tmp_path / "rep", routers=[ckpt])
    with pytest.raises(DualPathError, match="not found"):
        run_oracle(ckpt, tmp_path / "missing", [1], tmp_path / "o")


# ----------------------------------------------------------------------------------------------
# Router variants, the supervised router, the variable-budget oracle, the held-out report (#28)


def random_routers_(model, seed):
    """Router weights at a scale where every choice is taken (they start at zero: every choice equally likely)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers:
            for p in layer.router.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (3.0 / math.sqrt(p.shape[-1]) if p.dim() == 2 else 1.0))
    return model


@pytest.mark.parametrize("router_input,hidden,skip_whole_layer", [("pre", 0, False), ("post", 8, False),
                                                                  ("pre", 8, True)])
def test_three_choice_router_realises_the_flops_it_reports(router_input, hidden, skip_whole_layer):
    from dualpath.routing.router import router_model

    base = duo_model(20, skip_whole_layer=skip_whole_layer)
    torch.manual_seed(0)
    rm = random_routers_(router_model(base, choices="bsx", router_input=router_input, hidden=hidden), 21)
    batches = batches_of(22, n_seq=6, bs=3, ignore_tail=False)
    # count what really runs: rows through each FFN, each router matrix, and attention
    rows = {"big": 0, "small": 0, "router": 0.0}
    hooks = []
    for layer in rm.layers:
        for name in ("big", "small"):
            hooks.append(getattr(layer, f"ffn_{name}").register_forward_hook(
                lambda mod, a, out, name=name: rows.__setitem__(name, rows[name] + a[0].shape[0])))
        for lin in (m for m in layer.router.modules() if isinstance(m, torch.nn.Linear)):
            hooks.append(lin.register_forward_hook(lambda mod, a, out: rows.__setitem__(
                "router", rows["router"] + 2.0 * mod.in_features * mod.out_features * a[0][..., 0].numel())))
    ev = evaluate_routed(rm, batches, keep_token_losses=True)
    for h in hooks:
        h.remove()
    choice = ev["_choices"]  # (L, N, T)
    for code in (BIG, SMALL, SKIP):
        assert int((choice == code).sum()) > 0, code  # every choice is taken
    f = base.layers[0].module_flops(T)
    n_tok = choice[0].numel()
    assert rows["big"] == int((choice == BIG).sum()) and rows["small"] == int((choice == SMALL).sum())
    attn_tokens = sum(int((c != SKIP).sum()) if skip_whole_layer else n_tok for c in choice)
    spent = (attn_tokens * f["attn"] + rows["big"] * f["big"] + rows["small"] * f["small"] + rows["router"]
             + n_tok * 2.0 * base.cfg.d_model * VOCAB)
    assert ev["flops_per_token"] * n_tok == pytest.approx(spent, rel=1e-9)
    assert rows["router"] == pytest.approx(L * n_tok * rm.layers[0].module_flops(T)["router"])
    # the hard decisions are the argmax of the router, and the routed forward is the model under them
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        out = rm(x, y, return_diagnostics=True)
        for i, d in enumerate(out.diagnostics):
            assert torch.equal(d["duo_choice"], d["router_probs"].argmax(-1))
            assert torch.equal(d["duo_choice"], choice[i])
        ref = rm(x, y, choices=choice, return_per_token_loss=True).per_token_loss
    torch.testing.assert_close(ev["_token_losses"], ref, **TIGHT)


def test_soft_three_choice_router_mixes_the_choices_by_their_probabilities():
    from dualpath.routing.router import router_model, set_routing

    base = duo_model(23, skip_whole_layer=True)
    torch.manual_seed(0)
    rm = random_routers_(router_model(base, choices="bsx", router_input="pre", hidden=0), 24)
    set_routing(rm, hard=False, temperature=0.7)
    x = tokens(2, seed=25)
    layer = rm.layers[1]
    h0 = rm.embed(x).detach()
    rope = (rm.rope_cos[:T], rm.rope_sin[:T])
    with torch.no_grad():
        p = layer.router_probs(layer.router_logits(h0, None))
        outs = [layer(h0, rope, None, None, None, c) for c in ("big", "small", "skip")]
        mixed = layer(h0, rope, None)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, T), **TIGHT)
    torch.testing.assert_close(mixed, sum(p[..., i:i + 1] * o for i, o in enumerate(outs)), **TIGHT)


def test_supervised_router_agrees_with_the_oracle_more_than_the_budget_router():
    """A model whose oracle is known: the targets are the all-BBSS model's predictions for the first half of the
    vocabulary and the all-SSBB model's for the second, and the embedding shows the half on one coordinate."""
    from dualpath.routing.router import oracle_labels, train_router_oracle
    from dualpath.routing.report import agreement

    model = duo_model(26)
    with torch.no_grad():
        model.embed.weight[:, 0] = torch.where(torch.arange(VOCAB) < VOCAB // 2, 4.0, -4.0)
    first, second = (torch.tensor(parse_pattern(p, L)).view(L, 1, 1) for p in ("BBSS", "SSBB"))

    def windows(seed, n):
        x = tokens(n, seed=seed)
        with torch.no_grad():
            pa, pb = (model(x, choices=c.expand(L, *x.shape)).logits.argmax(-1) for c in (first, second))
        return x, torch.where(x < VOCAB // 2, pa, pb)

    x, y = windows(27, 32)
    train = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]
    held = [windows(28, 16)]
    k = 2
    labels, e = oracle_labels(model, train, k, with_skip=False)  # exact: every C(4, 2) pattern
    assert e["method"] == "enumerate" and labels.shape == (L, 32, T)
    assert ((labels == BIG).sum(0) == k).all()  # each token's pattern has exactly k big layers
    designed = torch.where((x < VOCAB // 2).unsqueeze(0), first, second)
    assert (labels == designed).all(0).float().mean() > 0.7  # mostly the designed pattern
    torch.manual_seed(0)
    sup, hist = train_router_oracle(model, train, labels, k / L, steps=200, batch_size=8, lr=1e-2)
    assert hist[-2]["label_loss"] < 0.5 * hist[0]["label_loss"]
    assert hist[-1]["calibrated_big_fraction"] == pytest.approx(k / L, abs=0.05)
    torch.manual_seed(0)
    bud, _ = train_router(model, lambda s: train[s % len(train)], k / L, steps=200)
    held_labels, _ = oracle_labels(model, held, k, with_skip=False)
    valid = torch.ones(16, T, dtype=torch.bool)
    a_sup = agreement(evaluate_routed(sup, held, keep_token_losses=True)["_choices"], held_labels, valid)
    a_bud = agreement(evaluate_routed(bud, held, keep_token_losses=True)["_choices"], held_labels, valid)
    assert a_sup["choice_agreement"] > a_bud["choice_agreement"] > 0.6, (a_sup, a_bud)
    assert a_sup["choice_agreement"] > 0.85


def test_variable_budget_oracle_keeps_its_budget_and_is_the_fixed_oracle_when_uniform():
    from dualpath.routing.oracle import (allocate_sequence, losses_by_count, variable_budget_oracle,
                                         variable_choice)

    model = duo_model(28)
    batches = batches_of(29, n_seq=6, bs=3)  # the first sequence ignores its last 3 targets
    valid = torch.cat([y != -1 for _, y in batches])
    res = oracle(model, batches, list(range(L + 1)))
    by_count = losses_by_count(res["budgets"], L)
    for k in range(L + 1):
        fixed = oracle(model, batches, [k])["budgets"][k]["_result"]["tok_best"]  # an independent search
        uni = variable_budget_oracle(by_count, valid, k, uniform=True)
        torch.testing.assert_close(uni["tok_loss"].float(), fixed, **TIGHT)
        assert uni["loss"] == pytest.approx(res["budgets"][k]["per_token_oracle"]["loss"], abs=1e-6)
        var = variable_budget_oracle(by_count, valid, k)
        for (used, budget), v in zip(var["uses"], valid):
            assert used <= budget == k * int(v.sum())
        assert var["max_over_budget"] <= 0 and var["loss"] <= uni["loss"] + 1e-12
        # the routing it describes has each token's count of big layers
        choice = variable_choice(res["budgets"], var["counts"])
        assert torch.equal((choice == BIG).sum(0)[valid], var["counts"][valid])
    # the allocation is the exact optimum (every allocation of 5 tokens, counts 0..3, enumerated)
    g = torch.rand(4, 5, generator=torch.Generator().manual_seed(30)).double()
    g[2, 1] = math.inf  # a count with no evaluated pattern is never chosen
    import itertools
    for budget in range(0, 16):
        c = allocate_sequence(g, budget)
        best = min(sum(float(g[j, t]) for t, j in enumerate(cs))
                   for cs in itertools.product(range(4), repeat=5) if sum(cs) <= budget)
        assert int(c.sum()) <= budget and float(g.gather(0, c.view(1, -1)).sum()) == pytest.approx(best, abs=1e-12)


def test_findings_verdicts():
    from dualpath.routing.findings import verdict

    def rec(vals, sign, **kw):
        return {"finding": "x", "per_seed": vals, "sign": sign, **kw}

    assert verdict(rec([(-0.2, -0.3, -0.1)] * 3, -1)) == "reproduced"
    assert verdict(rec([(-0.2, -0.3, -0.1), (-0.1, -0.2, 0.05)], -1)) == "inconclusive"  # an interval holds 0
    assert verdict(rec([(-0.1, -0.3, 0.1)], 1)) == "inconclusive"  # the wrong sign, but not excluded
    assert verdict(rec([(0.2, 0.1, 0.3)] * 2, -1)) == "not reproduced"
    assert verdict(rec([(0.01, -0.02, 0.04)] * 2, 0)) == "reproduced"  # no difference
    assert verdict(rec([(0.3, None, None)], 1)) == "reproduced"  # no interval: the value's side
    assert verdict(rec([(0.03, None, None)], -1, ref=0.5)) == "reproduced"  # below the reference
    assert verdict(rec([None, None], 1)).startswith("untestable")


def test_bootstrap_interval_and_agreement_by_hand():
    from dualpath.routing.report import agreement, bootstrap_ci, bootstrap_indices

    sums, counts = np.array([1.0, 2.0, 3.0, 10.0]), np.array([1.0, 1.0, 1.0, 2.0])
    idx = bootstrap_indices(4, 2000, 0)
    lo, hi = bootstrap_ci(sums, counts, idx)
    means = sums[idx].sum(1) / counts[idx].sum(1)
    assert (lo, hi) == (pytest.approx(np.quantile(means, 0.025)), pytest.approx(np.quantile(means, 0.975)))
    assert 1.0 <= lo < 16 / 5 < hi <= 5.0
    r = torch.tensor([[[BIG, SMALL]], [[SKIP, BIG]]])  # (L=2, N=1, T=2)
    o = torch.tensor([[[BIG, BIG]], [[SMALL, BIG]]])
    a = agreement(r, o, torch.ones(1, 2, dtype=torch.bool))
    assert a["choice_agreement"] == 0.5 and a["big_agreement"] == 0.75  # skip vs small: same not-big decision
    assert a["router_big_by_layer"] == [0.5, 0.5] and a["oracle_big_by_layer"] == [1.0, 0.5]
    # ranks with ties averaged, as scipy.stats.rankdata
    from dualpath.routing.report import _rankdata
    np.testing.assert_array_equal(_rankdata(np.array([3, 1, 2, 2, 5, 1.0])), [5, 1.5, 3.5, 3.5, 6, 1.5])


def test_router_variants_and_held_out_report_through_the_cli(duo_run, tmp_path, capsys):
    from dualpath.cli import main

    root, data, ckpt = duo_run
    common = ["--data", str(data), "--seq-len", str(T), "--batch-size", "4", "--max-sequences", "6"]
    r1, r2 = tmp_path / "r_oracle", tmp_path / "r_budget"
    assert main(["duo", "train-router", str(ckpt), "--budget", "0.5", "--kind", "oracle", "--choices", "bsx",
                 "--input", "post", "--hidden", "8", "--steps", "30", "--label-sequences", "8", "--out", str(r1),
                 *common]) == 0
    assert main(["duo", "train-router", str(ckpt), "--budget", "0.5", "--steps", "10", "--out", str(r2),
                 *common]) == 0
    info = json.loads((r1 / "router.json").read_text())
    assert info["router"] == "oracle/post/bsx/mlp8" and info["label_budget"] == 2 and info["label_windows"] == 8
    # oracle labels kept in a file serve the next router of the same setting, and refuse another setting
    labels = tmp_path / "labels.pt"
    oracle_args = ["--budget", "0.5", "--kind", "oracle", "--choices", "bsx", "--steps", "5", "--label-sequences", "8",
                   "--labels", str(labels)]
    assert main(["duo", "train-router", str(ckpt), *oracle_args, "--out", str(tmp_path / "r3"), *common]) == 0
    assert labels.is_file()
    capsys.readouterr()
    assert main(["duo", "train-router", str(ckpt), *oracle_args, "--out", str(tmp_path / "r4"), *common]) == 0
    assert "oracle labels from" in capsys.readouterr().err
    r3, r4 = (json.loads((tmp_path / r / "router.json").read_text()) for r in ("r3", "r4"))
    assert r3["label_oracle_loss"] == r4["label_oracle_loss"] == pytest.approx(info["label_oracle_loss"])
    assert r3["loss"] == r4["loss"]  # the same labels, seed and steps: the same router
    assert main(["duo", "train-router", str(ckpt), *("bs" if a == "bsx" else a for a in oracle_args),
                 "--out", str(tmp_path / "r5"), *common]) == 2
    assert "another setting" in capsys.readouterr().err and not (tmp_path / "r5").exists()
    capsys.readouterr()
    out = tmp_path / "rep"
    assert main(["duo", "report", str(ckpt), "--budgets", "1,2", "--random-trials", "3", "--with-skip",
                 "--router", str(r1), "--router", str(r2), "--select-sequences", "8", "--bootstrap", "200",
                 "--out", str(out), *common]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["held_out"] and rep["n_select_sequences"] == 8 and "attention still runs" in rep["skip_semantics"]
    for row in rep["rows"]:
        if row["loss"] is not None:
            assert row["ci_low"] <= row["loss"] <= row["ci_high"], row["method"]
    names = {a["router"] for a in rep["agreement"]}
    assert names == {"oracle/post/bsx/mlp8", "budget/pre/bs/linear"}
    for a in rep["agreement"]:
        assert 0 <= a["choice_agreement"] <= a["big_agreement"] <= 1
        assert a["loss_gap"] == pytest.approx(a["loss"] - a["oracle_loss"])
    by = {(r["method"], r["budget"]): r for r in rep["rows"]}
    for k in (1, 2):
        assert "training windows" in by[("best single pattern", k)]["note"]
        assert by[("variable-budget oracle", k)]["loss"] <= by[("per-token oracle", k)]["loss"] + 1e-9
        assert by[("variable-budget oracle", k)]["big_fraction"] <= k / L + 1e-9  # what it really spends
        assert by[("per-token oracle", k)]["loss"] <= by[("best single pattern, in-sample", k)]["loss"]
    assert rep["variable_budget"]["2"]["max_over_budget"] <= 0
    for c in [*rep["variable_budget"]["2"]["ci"].values(), *rep["layer_preference"].values()]:
        assert -1 <= c["ci_low"] <= c["ci_high"] <= 1 and -1 <= c["value"] <= 1
    for name in ("variable_budget_by_position.png", "variable_budget_by_difficulty.png", "summary.md"):
        assert (out / name).is_file(), name
    text = (out / "summary.md").read_text()
    assert "Skip semantics" in text and "Agreement with the per-token oracle" in text and "95% CI" in text
    # the findings over "seeds" (the same report twice): each number is the report's own
    fdir = tmp_path / "findings"
    assert main(["duo", "findings", str(out), str(out), "--skip-report", str(out), "--skip-report", str(out),
                 "--out", str(fdir)]) == 0
    f = fdir / "findings.md"
    recs = json.loads((fdir / "findings.json").read_text())
    by_f = {r["finding"]: r for r in recs}
    c = next(c for c in rep["comparisons"] if c["a"] == "per-token oracle" and c["b"] == "random routing"
             and c["budget"] == 2)
    assert by_f["oracle routing beats random routing"]["per_seed"] == [[c["delta"], c["ci_low"], c["ci_high"]]] * 2
    expect = "reproduced" if c["ci_high"] < 0 else "not reproduced" if c["ci_low"] > 0 else "inconclusive"
    assert by_f["oracle routing beats random routing"]["verdict"] == expect
    c1 = next(c for c in rep["comparisons"] if c["a"] == "per-token oracle" and c["b"] == "all-big"
              and c["budget"] == 1)
    assert by_f["one big layer, well placed, beats all-big"]["per_seed"][0] == [c1["delta"], c1["ci_low"], c1["ci_high"]]
    assert "router oracle/post/bsx/mlp8 stays far from the oracle" in by_f
    cw = next(c for c in rep["within_sequence"]["2"]["comparisons"]
              if c["a"] == "per-sequence choice from the prefix" and c["b"] == "best single pattern")
    assert (by_f["a per-sequence choice held out within the sequence beats the best fixed pattern"]["per_seed"]
            == [[cw["delta"], cw["ci_low"], cw["ci_high"]]] * 2)
    assert "| oracle routing beats random routing |" in f.read_text()
    assert main(["duo", "findings", str(tmp_path / "nothing"), "--out", str(tmp_path / "g")]) == 2
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("args,message", [
    (["train-router", "--budget", "0.5", "--hidden", "-1"], "hidden width"),
    (["train-router", "--budget", "0.5", "--kind", "labels"], "invalid choice"),
    (["train-router", "--budget", "0.5", "--kind", "oracle", "--label-sequences", "0"], "--label-sequences"),
    (["report", "--budgets", "1", "--bootstrap", "5"], "--bootstrap"),
    (["report", "--budgets", "1", "--select-sequences", "-1"], "--select-sequences"),
    (["train-router", "--budget", "0.5", "--lr", "-1"], "--lr must be finite and > 0"),
    (["report", "--budgets", "1", "--help-threshold", "nan"], "--help-threshold"),
    (["report", "--budgets", "1", "--max-patterns", "0"], "--max-patterns"),
    (["report", "--budgets", "1,,2"], "expected comma-separated integers"),
    (["train-router", "--budget", "0.5", "--lr", "nan"], "--lr must be finite and > 0"),
    pytest.param(["oracle", "--budgets", "1", "--device", "cuda"], "no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")),
])
def test_new_duo_options_reject_bad_input_with_one_line(duo_run, tmp_path, capsys, args, message):
    from dualpath.cli import main

    _, data, ckpt = duo_run
    out = tmp_path / "out"
    assert main(["duo", args[0], str(ckpt), "--data", str(data), "--out", str(out), *args[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert not out.exists()


def test_train_router_refuses_an_out_that_holds_a_run_or_cannot_be_written(duo_run, tmp_path, capsys):
    """Saving a router into the base run's folder would overwrite or prune its checkpoint: refused before any
    work, as are an --out where no folder can be made (/proc) and a --labels file in a missing folder."""
    import shutil

    from dualpath.cli import main

    root, data, ckpt = duo_run
    base = shutil.copytree(root / "base", tmp_path / "base")
    before = {p: p.read_bytes() for p in base.rglob("*") if p.is_file()}
    common = ["--data", str(data), "--budget", "0.5", "--steps", "2", "--max-sequences", "4", "--seq-len", str(T)]
    cases = [(["--out", str(base)], "holds a run or router already"),
             (["--out", "/proc/dualpath_router"], "cannot create a folder in /proc"),
             (["--kind", "oracle", "--labels", str(tmp_path / "missing" / "l.pt"), "--out", str(tmp_path / "r")],
              "--labels")]
    for args, message in cases:
        assert main(["duo", "train-router", str(ckpt), *common, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert {p: p.read_bytes() for p in base.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "r").exists()


def test_oracle_labels_belong_to_the_weights_not_the_path(duo_run, tmp_path, capsys):
    """Labels saved for one model are refused for another model trained into the same folder."""
    from dualpath.cli import main

    _, data, _ = duo_run
    base, labels = tmp_path / "base", tmp_path / "labels.pt"
    args = ["--data", str(data), "--budget", "0.5", "--steps", "2", "--max-sequences", "4", "--seq-len", str(T),
            "--kind", "oracle", "--label-sequences", "4", "--labels", str(labels)]
    first = save_checkpoint(base, 1, duo_model(11).state_dict(), RunConfig(model=duo_model(11).cfg))
    assert main(["duo", "train-router", str(first), *args, "--out", str(tmp_path / "r1")]) == 0
    again = save_checkpoint(base, 1, duo_model(12).state_dict(), RunConfig(model=duo_model(12).cfg))
    assert again == first
    saved = labels.read_bytes()
    capsys.readouterr()
    assert main(["duo", "train-router", str(again), *args, "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds labels of another setting (base_weights" in err
    assert labels.read_bytes() == saved and not (tmp_path / "r2").exists()


def test_findings_refuse_reports_that_do_not_measure_the_same_things(tmp_path, capsys):
    """Seeds' reports with other budgets, a skip report that is not one, or a JSON file that is no report:
    one line, exit 2, nothing written (they used to end in a KeyError)."""
    from dualpath.cli import main

    def report(name, budgets, with_skip=False):
        d = tmp_path / name
        d.mkdir()
        (d / "report.json").write_text(json.dumps({"rows": [], "comparisons": [], "n_layers": 3, "with_skip": with_skip,
                                                   "difficulty": {str(k): {} for k in budgets}}))
        return str(d)

    a, b, c = report("a", [1, 2]), report("b", [1]), report("c", [1, 2])
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "report.json").write_text('{"x": 1}')
    cases = [([a, b], "has other layers or budgets than"), ([a, "--skip-report", c], "is not a --with-skip report"),
             ([a, str(tmp_path / "x")], "is not a `duo report` report (no rows)")]
    for args, message in cases:
        assert main(["duo", "findings", *args, "--out", str(tmp_path / "f")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "f").exists()

"""Valid ablations: forced K beyond the trained K, gate modes that hold the residual scale, realised FLOPs."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dualpath import ModelConfig, Overrides
from dualpath.cli import main
from dualpath.errors import ConfigError
from dualpath.model import GATE_MIXES, check_gate_override

from helpers import perturb_


def _dual(K=2, arch="dual", seed=0):
    cfg = ModelConfig(arch=arch, vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, seq_len=24,
                      d_ffn_deep=64, d_ffn_wide=128, ffn_multiple=16, K=K, max_loops=6)
    model = cfg.build().eval()
    perturb_(model, seed)
    with torch.no_grad():  # trained steps have real gains; steps beyond K keep the untrained start (-7)
        for layer in model.layers:
            layer.deep.step_gain[K:] = -7.0
    return model


def _idx(B=2, T=16, seed=1):
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["loop", "dual"])
def test_extra_steps_reuse_the_last_trained_gain_and_change_the_output_more(arch):
    model = _dual(K=2, arch=arch)
    idx = _idx()
    step = model.layers[0].deep
    last = step.step_gains(4, "last")
    own = step.step_gains(4, "own")
    assert torch.equal(last[:2], own[:2]) and torch.equal(last[2:], last[1:2].expand(2))
    assert torch.allclose(own[2:], torch.nn.functional.softplus(torch.tensor(-7.0)))
    with torch.no_grad():
        base = model(idx).logits
        d_last = (model(idx, overrides=Overrides(K=4)).logits - base).abs().max().item()
        d_own = (model(idx, overrides=Overrides(K=4, extra_steps_gain="own")).logits - base).abs().max().item()
        # at or below the trained K the two modes are the same forward
        assert torch.equal(model(idx, overrides=Overrides(K=1)).logits,
                           model(idx, overrides=Overrides(K=1, extra_steps_gain="own")).logits)
    assert d_last > 10 * d_own > 0


def _gates(model, idx, gates, seed=0):
    with torch.no_grad():
        return model(idx, overrides=Overrides(gates=gates, seed=seed) if gates else None,
                     return_diagnostics=True).diagnostics


@pytest.mark.parametrize("mode", ["deep-favoured", "wide-favoured", "swapped", "share-shuffled", "share-shuffled-seq"])
def test_residual_holding_gate_modes_keep_g_d_plus_g_w_per_token(mode):
    model = _dual()
    idx = _idx()
    # layer 0 sees the same input under every mode, so its learned gates are the reference
    ref, got = _gates(model, idx, None)[0], _gates(model, idx, mode)[0]
    total = ref["gate_deep"] + ref["gate_wide"]
    torch.testing.assert_close(got["gate_deep"] + got["gate_wide"], total, rtol=1e-6, atol=1e-6)
    share, new_share = ref["gate_deep"] / total, got["gate_deep"] / total
    if mode == "deep-favoured":
        assert not got["gate_wide"].any()
    elif mode == "wide-favoured":
        assert not got["gate_deep"].any()
    elif mode == "swapped":
        assert torch.equal(got["gate_deep"], ref["gate_wide"]) and torch.equal(got["gate_wide"], ref["gate_deep"])
    else:
        # the shares are a permutation: across the batch, or within each sequence
        rows = [slice(None)] if mode == "share-shuffled" else [b for b in range(idx.shape[0])]
        for r in rows:
            a, b = torch.sort(share[r].reshape(-1)).values, torch.sort(new_share[r].reshape(-1)).values
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(share, new_share)


def test_the_papers_shuffle_permutes_the_gate_pairs():
    model = _dual()
    idx = _idx()
    ref, got = _gates(model, idx, None)[0], _gates(model, idx, "shuffled")[0]
    pairs = sorted(zip(ref["gate_deep"].reshape(-1).tolist(), ref["gate_wide"].reshape(-1).tolist()))
    assert sorted(zip(got["gate_deep"].reshape(-1).tolist(), got["gate_wide"].reshape(-1).tolist())) == pairs


def test_gate_modes_are_validated():
    for mode in GATE_MIXES + ("deep-only", "wide-only", "both=0.5"):
        assert check_gate_override(mode) == mode
    with pytest.raises(ConfigError, match="sideways"):
        check_gate_override("sideways")


def _counted(model, idx, ov):
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx, overrides=ov)
    return counter.get_total_flops()


@pytest.mark.parametrize("ov", [Overrides(), Overrides(K=5), Overrides(K=1), Overrides(gates="deep-only"),
                                Overrides(gates="wide-only"), Overrides(gates="deep-favoured"),
                                Overrides(gates="wide-favoured"), Overrides(K=4, gates="wide-only"),
                                Overrides(gates="share-shuffled")])
def test_realised_flops_match_the_flop_counter(ov):
    model = _dual(K=2)
    B, T = 2, 16
    idx = _idx(B, T)
    counted = _counted(model, idx, ov)
    predicted = model.flops_per_token(T, "true", overrides=ov) * B * T
    # halting routers are vector products the counter does not see: well under 1%
    assert abs(predicted - counted) / counted < 0.01, (predicted, counted)


def test_eval_reports_each_variants_realised_flops(tmp_path, capsys):
    from helpers import save_tiny_checkpoint, tiny_config, train_tiny_tokenizer

    tok = train_tiny_tokenizer(tmp_path / "tok" / "tokenizer.json")
    run = tmp_path / "run"
    model = perturb_(tiny_config("dual", K=2, max_loops=6).build(), 5).eval()
    save_tiny_checkpoint(run, model, tok)
    text = tmp_path / "t.txt"
    text.write_text("to be or not to be, that is the question. " * 20)
    assert main(["eval", str(run), "--data", str(text), "--K", "1,4", "--gates", "wide-only,deep-favoured",
                 "--json", "--no-exact-match"]) == 0
    import json

    res = json.loads(capsys.readouterr().out)
    fpt = {name: next(iter(row.values()))["flops_per_token"] for name, row in res["variants"].items()}
    from dualpath.checkpoint import load_model

    model, cfg, _ = load_model(run)
    T = cfg.model.seq_len
    assert fpt["K=1"] == model.flops_per_token(T, "true", K=1) < fpt[f"trained (K={cfg.model.K})"]
    assert fpt["K=4"] == model.flops_per_token(T, "true", K=4) > fpt[f"trained (K={cfg.model.K})"]
    assert fpt["gates=wide-only"] == model.flops_per_token(T, "true", overrides=Overrides(gates="wide-only"))
    assert fpt["gates=wide-only"] < fpt["gates=deep-favoured"] < fpt[f"trained (K={cfg.model.K})"]

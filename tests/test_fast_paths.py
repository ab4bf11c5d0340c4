"""The fast training paths (issue #30) compute what the eager reference path computes: same loss, same gradients."""

from __future__ import annotations

import pytest
import torch

from dualpath.config import ModelConfig, OptimConfig
from dualpath.model import DualPathLM, FlopTally, Overrides
from dualpath.train import build_optimizer

from helpers import perturb_

FP32 = dict(rtol=1e-5, atol=1e-5)  # fp32 rounding: the fused paths sum in another order


def model_pair(arch: str, **kw) -> tuple[DualPathLM, DualPathLM]:
    """(fast, reference): one perturbed model and a copy of it on the reference path."""
    cfg = dict(arch=arch, vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, seq_len=24,
               d_ffn_deep=64, d_ffn_wide=128, ffn_multiple=16, K=2, ponder_weight=0.01)
    cfg.update(kw)
    torch.manual_seed(0)
    fast = perturb_(DualPathLM(ModelConfig(**cfg)), 7).train()
    ref = DualPathLM(ModelConfig(**cfg)).set_fast(False).train()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def loss_and_grads(model, x, y, **kw):
    model.zero_grad(set_to_none=True)
    loss = model(x, y, **kw).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch,kw", [("wide", {}), ("loop", {}), ("dual", {}), ("dual", {"n_kv_heads": 2}),
                                     ("dual", {"qk_norm": False, "K": 3}), ("loop", {"n_kv_heads": 1})])
def test_fast_path_matches_reference_loss_and_gradients(arch, kw):
    fast, ref = model_pair(arch, **kw)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 96, (3, 24), generator=g), torch.randint(0, 96, (3, 24), generator=g)
    lf, gf = loss_and_grads(fast, x, y)
    lr, gr = loss_and_grads(ref, x, y)
    torch.testing.assert_close(lf, lr, **FP32)
    assert gf.keys() == gr.keys()
    for n in gr:
        torch.testing.assert_close(gf[n], gr[n], **FP32, msg=n)


@pytest.mark.parametrize("ov", [Overrides(K=4), Overrides(gates="wide-only"), Overrides(gates="shuffled")])
def test_fast_dual_matches_reference_under_overrides_and_counts_the_same_flops(ov):
    fast, ref = model_pair("dual")
    x = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(2))
    tf, tr = FlopTally(), FlopTally()
    with torch.no_grad():
        of = fast(x, overrides=ov, return_diagnostics=True, flops=tf)
        orf = ref(x, overrides=ov, return_diagnostics=True, flops=tr)
    torch.testing.assert_close(of.logits, orf.logits, **FP32)
    for df, dr in zip(of.diagnostics, orf.diagnostics):
        for key in dr:
            torch.testing.assert_close(df[key], dr[key], **FP32, msg=key)
    assert tf.counts == tr.counts


def test_fused_adamw_steps_like_the_reference_adamw():
    fast, ref = model_pair("dual")
    ref.set_fast(True)  # only the optimiser differs
    opt_cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    opt_f = build_optimizer(fast, opt_cfg)
    assert opt_f.defaults.get("fused")
    name_of = {id(p): n for n, p in fast.named_parameters()}
    ref_params = dict(ref.named_parameters())
    keep = ("lr", "betas", "eps", "weight_decay")
    ref_groups = [{**{k: g[k] for k in keep}, "params": [ref_params[name_of[id(p)]] for p in g["params"]]}
                  for g in opt_f.param_groups]
    opt_r = torch.optim.AdamW(ref_groups, fused=False, foreach=False)
    x = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        for model, opt in ((fast, opt_f), (ref, opt_r)):
            model.zero_grad(set_to_none=True)
            model(x, x).loss.backward()
            opt.step()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(dict(fast.named_parameters())[n], p, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_cross_entropy_matches_torch_with_ignored_targets(dtype):
    from dualpath.model import token_cross_entropy

    g = torch.Generator().manual_seed(4)
    logits = (3 * torch.randn(37, 50, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (37,), generator=g)
    targets[[0, 5, 36]] = -1
    w = torch.rand(37, generator=g)
    ours = token_cross_entropy(logits, targets, chunk=8)
    (ours * w).sum().backward()
    got = logits.grad.clone()
    logits.grad = None
    ref = torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=-1, reduction="none")
    (ref * w).sum().backward()
    torch.testing.assert_close(ours, ref, **FP32)
    assert ours.dtype == torch.float32 and got.dtype == dtype and not got[[0, 5, 36]].any()
    torch.testing.assert_close(got, logits.grad, **(FP32 if dtype == torch.float32 else {}))

"""The reference recipe's options: scaled init, the reference's weight-decay grouping, the gate LR multiplier."""

import math

import pytest
import torch

from dualpath import ModelConfig
from dualpath.config import OptimConfig
from dualpath.errors import ConfigError
from dualpath.train import build_optimizer, lr_at, param_groups


def _cfg(arch: str, **kw) -> ModelConfig:
    widths = {"wide": dict(d_ffn_wide=96), "loop": dict(d_ffn_deep=48), "dual": dict(d_ffn_deep=48, d_ffn_wide=96),
              "duo": dict(d_ffn_big=96)}[arch]
    base = dict(arch=arch, vocab_size=64, d_model=32, n_layers=3, n_heads=2, n_kv_heads=1, seq_len=16,
                ffn_multiple=16, K=2, **widths)
    return ModelConfig(**{**base, **kw})


def _residual_projection_names(model) -> set[str]:
    """Attention out-projections and SwiGLU down-projections, found by module structure in the test."""
    names = set()
    for mname, m in model.named_modules():
        for child, attr in (("wo", "attn"), ("w2", "ffn")):
            if hasattr(m, child) and isinstance(getattr(m, child), torch.nn.Linear):
                names.add(f"{mname}.{child}.weight")
    return names


@pytest.mark.parametrize("arch", ["wide", "loop", "dual", "duo"])
def test_scaled_init_divides_exactly_the_residual_projections_by_sqrt_2L(arch):
    torch.manual_seed(3)
    plain = _cfg(arch, init="plain").build()
    torch.manual_seed(3)
    scaled = _cfg(arch, init="scaled").build()
    targets = _residual_projection_names(plain)
    # every block's out-projections: deep, wide, duo (attention + both FFNs)
    per_layer = {"wide": 2, "loop": 2, "dual": 4, "duo": 3}[arch]
    assert len(targets) == per_layer * 3
    factor = 1 / math.sqrt(2 * 3)
    p_plain = dict(plain.named_parameters())
    for name, p in scaled.named_parameters():
        if name in targets:
            torch.testing.assert_close(p, p_plain[name] * factor, rtol=1e-6, atol=0)
        else:
            assert torch.equal(p, p_plain[name]), name


def test_init_statistics_per_parameter():
    torch.manual_seed(0)
    cfg = _cfg("dual", d_model=128, n_heads=4, n_kv_heads=2, d_ffn_deep=384, d_ffn_wide=768)
    model = cfg.build()
    targets = _residual_projection_names(model)
    for name, p in model.named_parameters():
        if name in targets:
            want = 0.02 / math.sqrt(2 * cfg.n_layers)
            assert abs(p.std().item() - want) < 0.05 * want, name
            assert abs(p.mean().item()) < 0.1 * want, name
        elif name.endswith((".W_g", ".b_g", ".halt.bias")):
            assert not p.any(), name  # gates start at 0.5
        elif name.endswith((".step_gain", ".beta")):
            assert torch.equal(p, torch.full_like(p, -7.0)), name
        elif "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:  # embeddings, head, other projections, halting router weights
            assert abs(p.std().item() - 0.02) < 0.05 * 0.02, name


def test_unknown_init_is_a_config_error():
    with pytest.raises(ConfigError, match="model.init"):
        _cfg("dual", init="xavier").validate()


def _groups_by_name(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    return [({names[id(p)] for p in g["params"]}, g["weight_decay"], g["lr_mult"]) for g in groups]


def test_reference_decay_grouping_decays_gates_norms_gains_and_biases_not_embeddings():
    model = _cfg("dual").build()
    default = _groups_by_name(model, param_groups(model, 0.3))
    ref = _groups_by_name(model, param_groups(model, 0.3, decay_gates_and_norms=True))
    assert len(default) == len(ref) == 2
    decayed, undecayed = ref[0][0], ref[1][0]
    assert undecayed == {"embed.weight"}
    extra = decayed - default[0][0]
    assert extra == default[1][0] - {"embed.weight"}
    assert any(n.endswith(".W_g") for n in extra) and any(n.endswith(".step_gain") for n in extra)
    assert any("norm" in n for n in extra) and any(n.endswith(".halt.bias") for n in extra)


def test_gate_lr_mult_scales_the_first_adam_step_of_gates_and_gains_only():
    torch.manual_seed(1)
    base = _cfg("dual").build()
    idx = torch.randint(0, 64, (2, 16))
    deltas = {}
    for mult in (1.0, 3.0):
        model = _cfg("dual").build()
        model.load_state_dict(base.state_dict())
        opt = build_optimizer(model, OptimConfig(lr=1e-3, min_lr=0, weight_decay=0.0, gate_lr_mult=mult,
                                                 warmup_steps=0, schedule="constant"))
        for g in opt.param_groups:
            g["lr"] = lr_at(0, 10, OptimConfig(lr=1e-3, min_lr=0, warmup_steps=0, schedule="constant")) * g["lr_mult"]
        model(idx, idx).loss.backward()
        opt.step()
        deltas[mult] = {n: (p - base.state_dict()[n]).detach() for n, p in model.named_parameters()}
    roles = {n: r for n, _, r in base.named_param_roles()}
    moved = 0
    for name, d1 in deltas[1.0].items():
        d3 = deltas[3.0][name]
        if roles[name] in ("gate", "gain"):
            mask = d1.abs() > 1e-6  # Adam's first step is lr * g/(|g| + eps): ±lr wherever the gradient is not tiny
            moved += int(mask.sum())
            torch.testing.assert_close(d3[mask], 3 * d1[mask], rtol=1e-3, atol=0)
        else:
            torch.testing.assert_close(d3, d1, rtol=0, atol=0)
    assert moved > 0


def test_gate_lr_mult_must_be_positive():
    with pytest.raises(ConfigError, match="gate_lr_mult"):
        OptimConfig(gate_lr_mult=0).validate()

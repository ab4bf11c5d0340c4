"""Stage 3: learned routers on a frozen Duo-LLM model.

Each DuoLayer already owns a router, a Linear(d_model -> 1) on the layer input: P_big = σ(logit / τ).
Training (the base model frozen, only the routers learn):

    soft forward   y = h + P_big·FFN_big(z) + (1 − P_big)·FFN_small(z)   (router_hard=False)
    loss           LM loss + budget_weight · (mean P_big − target)²
                   (mean over every layer and token of the batch: the share of big decisions)
    temperature    τ annealed geometrically from tau_start (1) to tau_end (0.05) over the steps, so
                   P_big → 0/1 and the soft mixture approaches the hard decision it is evaluated with
    optimiser      AdamW on the router weights only (no weight decay), constant lr after a short warmup

Evaluation is hard: big where P_big > 0.5 (logit > 0, independent of τ), small elsewhere, with the
model's gather/scatter routing, so the FLOPs are really saved; the achieved big fraction is reported
next to the target.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from ..model import BIG
from ..errors import CheckpointError, ConfigError, DualPathError
from .oracle import check_duo, flops_per_token

DEFAULT_BUDGET_WEIGHT = 100.0
DEFAULT_LR = 3e-3


def router_model(model, hard: bool = True):
    """A copy of a Duo model with duo_policy="router" and the same weights (its routers included)."""
    from ..model import DualPathLM

    check_duo(model, "router routing")
    cfg = dataclasses.replace(model.cfg, duo_policy="router", router_hard=hard, router_temperature=1.0)
    device = next(model.parameters()).device
    m = DualPathLM(cfg).to(device)
    m.load_state_dict(model.state_dict())
    return m.eval()


def set_routing(model, hard: bool, temperature: float) -> None:
    for layer in model.layers:
        layer.router_hard = hard
        layer.router_temperature = temperature


def check_fraction(target: float) -> float:
    try:
        target = float(target)
    except (TypeError, ValueError):
        raise ConfigError(f"--budget must be a fraction of big layers in [0, 1], got '{target}'") from None
    if not 0.0 <= target <= 1.0 or math.isnan(target):
        raise ConfigError(f"--budget must be a fraction of big layers in [0, 1], got {target}")
    return target


def train_router(model, batch_fn, target: float, steps: int = 500, *, lr: float = DEFAULT_LR,
                 budget_weight: float = DEFAULT_BUDGET_WEIGHT, tau_start: float = 1.0, tau_end: float = 0.05,
                 warmup_steps: int = 10, grad_clip: float = 1.0, log_every: int = 50, log=None):
    """Train the routers of (a router-policy copy of) a frozen Duo model. batch_fn(step) -> (inputs, targets).

    Returns (router_model, history): the model with hard routing at τ = 1, and per-logged-step records.
    """
    target = check_fraction(target)
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    if not (tau_start > 0 and tau_end > 0):
        raise ConfigError("router temperatures must be > 0")
    if budget_weight < 0:
        raise ConfigError(f"the budget weight must be >= 0, got {budget_weight}")
    m = model if model.cfg.duo_policy == "router" else router_model(model)
    for p in m.parameters():
        p.requires_grad_(False)
    params = []
    for layer in m.layers:
        for p in layer.router.parameters():
            p.requires_grad_(True)
            params.append(p)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    history = []
    m.train()
    t0 = time.perf_counter()
    for step in range(steps):
        tau = tau_start * (tau_end / tau_start) ** (step / max(1, steps - 1))
        set_routing(m, hard=False, temperature=tau)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / max(1, warmup_steps))
        x, y = batch_fn(step)
        out = m(x, y, return_diagnostics=True)
        p_big = torch.stack([d["p_big"] for d in out.diagnostics])  # (L, B, T)
        valid = (y != -1).unsqueeze(0).expand_as(p_big)
        frac = p_big[valid].mean()
        budget_loss = budget_weight * (frac - target) ** 2
        loss = out.loss + budget_loss
        if not torch.isfinite(loss):
            raise DualPathError(f"router training diverged at step {step} (loss {loss.item()})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            rec = {"step": step, "lm_loss": out.loss.item(), "budget_loss": budget_loss.item(),
                   "p_big_mean": frac.item(), "hard_fraction": (p_big[valid] > 0.5).float().mean().item(),
                   "tau": tau, "seconds": time.perf_counter() - t0}
            history.append(rec)
            if log:
                log(f"router step {step}: lm {rec['lm_loss']:.4f} P_big {rec['p_big_mean']:.3f} "
                    f"(hard {rec['hard_fraction']:.3f}, target {target:.3f}) tau {tau:.3f}")
    for p in m.parameters():
        p.requires_grad_(False)
    set_routing(m, hard=True, temperature=1.0)
    return m.eval(), history


@torch.inference_mode()
def evaluate_routed(model, batches, keep_token_losses: bool = False) -> dict:
    """Loss, perplexity, achieved big fraction and realised FLOPs of a router-policy model, hard routing."""
    if model.cfg.duo_policy != "router":
        raise ConfigError("evaluate_routed needs a router-policy model (see router_model)")
    set_routing(model, hard=True, temperature=1.0)
    loss_sum, n_tok, big, n_dec, flops = 0.0, 0, 0, 0, 0.0
    per_layer = torch.zeros(model.cfg.n_layers, dtype=torch.float64)
    tok = []
    for x, y in batches:
        out = model(x, y, return_per_token_loss=True, return_diagnostics=True)
        choice = torch.stack([d["duo_choice"] for d in out.diagnostics])  # (L, B, T)
        valid = (y != -1)
        loss_sum += float(out.per_token_loss.double()[valid].sum())
        n_tok += int(valid.sum())
        is_big = (choice == BIG) & valid.unsqueeze(0)
        big += int(is_big.sum())
        n_dec += int(valid.sum()) * choice.shape[0]
        per_layer += is_big.sum((1, 2)).double().cpu()
        flops += flops_per_token(model, choice, x.shape[1], with_router=True) * choice[0].numel()
        if keep_token_losses:
            tok.append(out.per_token_loss.float().cpu())
    loss = loss_sum / max(n_tok, 1)
    res = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "big_fraction": big / max(n_dec, 1),
           "big_fraction_by_layer": (per_layer / max(n_tok, 1)).tolist(),
           "flops_per_token": flops / sum(x.numel() for x, _ in batches), "n_tokens": n_tok}
    if keep_token_losses:
        res["_token_losses"] = torch.cat(tok)
    return res


def router_target_of(ckpt: Path) -> float | None:
    """The target big fraction a router checkpoint was trained for (None if unknown)."""
    from ..checkpoint import load_torch

    p = Path(ckpt) / "trainer_state.pt"
    if p.is_file():
        st = load_torch(p)
        if isinstance(st, dict) and "router_target" in st:
            return float(st["router_target"])
    return None


def load_router(path, base_model=None, device: str = "cpu"):
    """A router checkpoint -> (router model, target fraction, folder). With base_model, its frozen weights
    must be the base model's (else the comparison would mix two models)."""
    from ..checkpoint import load_model

    m, _, ckpt = load_model(path, device)
    check_duo(m, "a router checkpoint")
    if m.cfg.duo_policy != "router":
        raise CheckpointError(f"{ckpt} is not a router checkpoint (model.duo_policy={m.cfg.duo_policy}); "
                              "train one with `dualpath duo train-router`")
    if base_model is not None:
        sd = base_model.state_dict()
        for k, v in m.state_dict().items():
            if ".router." in k:
                continue
            if k not in sd or sd[k].shape != v.shape or not torch.equal(sd[k].to(v.device), v):
                raise CheckpointError(f"router checkpoint {ckpt} was not trained on this base model ({k} differs)")
    return m, router_target_of(ckpt), ckpt


def run_train_router(checkpoint, data, budget: float, out, *, steps: int = 500, batch_size: int = 8,
                     seq_len: int | None = None, lr: float = DEFAULT_LR, budget_weight: float = DEFAULT_BUDGET_WEIGHT,
                     tau_end: float = 0.05, eval_sequences: int = 64, seed: int = 0, device: str = "cpu",
                     log=None) -> dict:
    """`dualpath duo train-router`: train on the train split of a prepared folder, evaluate hard on its val
    split, save a router checkpoint (duo_policy=router) under OUT/checkpoints and OUT/router.json."""
    from ..checkpoint import atomic_write_text, load_model, save_checkpoint
    from ..data.loader import load_windows, make_batches, train_window_fn

    target = check_fraction(budget)
    model, cfg, ckpt = load_model(checkpoint, device)
    check_duo(model, "`duo train-router`")
    torch.manual_seed(seed)
    batch_fn = train_window_fn(data, model, batch_size=batch_size, seq_len=seq_len, seed=seed, device=device)
    x, y = load_windows(data, model, tokenizer_dir=ckpt, max_sequences=eval_sequences, seq_len=seq_len)
    rm, history = train_router(model, batch_fn, target, steps, lr=lr, budget_weight=budget_weight, tau_end=tau_end,
                               log=log)
    ev = evaluate_routed(rm, make_batches(x, y, batch_size, device))
    run_cfg = dataclasses.replace(cfg, model=rm.cfg)
    run_cfg.train = dataclasses.replace(cfg.train, out_dir=str(out))
    files = {n: ckpt / n for n in ("tokenizer.json", "data_meta.json") if (ckpt / n).is_file()}
    state = {"step": steps, "router_target": target, "router_budget_weight": budget_weight, "router_lr": lr,
             "router_tau_end": tau_end, "base_checkpoint": str(ckpt)}
    saved = save_checkpoint(out, steps, rm.state_dict(), run_cfg, trainer_state=state, files=files, keep_last=1)
    res = {"checkpoint": str(saved), "base_checkpoint": str(ckpt), "target": target,
           "achieved_big_fraction": ev["big_fraction"], "loss": ev["loss"], "ppl": ev["ppl"],
           "flops_per_token": ev["flops_per_token"], "big_fraction_by_layer": ev["big_fraction_by_layer"],
           "steps": steps, "budget_weight": budget_weight, "lr": lr, "tau_end": tau_end, "history": history}
    atomic_write_text(Path(out) / "router.json", json.dumps(res, indent=1))
    if log:
        log(f"router: big fraction {ev['big_fraction']:.3f} (target {target:.3f}), loss {ev['loss']:.4f}, "
            f"saved {saved}")
    return res

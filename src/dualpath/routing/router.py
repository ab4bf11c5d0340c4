"""Stage 3: learned routers on a frozen Duo-LLM model.

Each DuoLayer owns a router (model.router_*): linear or a small MLP, reading the normalised layer input (pre)
or what the FFN sees after attention (post), choosing big | small (bs) or big | small | skip (bsx).
The base model is frozen; only the routers learn, by one of two kinds:

budget (the LM loss under a budget):
    soft forward   y = h + P_big·FFN_big(z) + P_small·FFN_small(z) [+ P_skip·skip]   (router_hard=False)
    loss           LM loss + budget_weight · (mean P_big − target)²
                   (mean over every layer and token of the batch: the share of big decisions)
    temperature    τ annealed geometrically from tau_start (1) to tau_end (0.05) over the steps, so the
                   probabilities saturate and the soft mixture approaches the hard decision it is evaluated with
oracle (supervised on the oracle's per-token choices):
    labels         the per-token oracle at k = round(target·L) big layers on training windows (each token's
                   best whole-sequence pattern: one choice per layer), the layers run under those choices
                   (teacher forcing), and each router learns its layer's label from its input there
                   (cross-entropy; a bs router learns big against not-big); afterwards one shift of the big
                   logit, found on the same training windows, sets the hard big fraction to the target

Both: AdamW on the router parameters only (no weight decay), constant lr after a short warmup. Evaluation is
hard (the most probable choice) with the model's gather/scatter routing, so the FLOPs are really saved;
the achieved big fraction is reported next to the target.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..model import BIG, SKIP, SMALL
from ..errors import CheckpointError, ConfigError, DualPathError
from .oracle import check_duo, choice_from_index, flops_per_token, oracle_budget

DEFAULT_BUDGET_WEIGHT = 100.0
DEFAULT_LR = 3e-3
KINDS = ("budget", "oracle")


def router_model(model, hard: bool = True, choices: str | None = None, router_input: str | None = None,
                 hidden: int | None = None):
    """A copy of a Duo model with duo_policy="router" and the same weights. The router variant (choices
    bs | bsx, input pre | post, hidden 0 = linear) defaults to the model's; routers of the same shape are
    copied, others start fresh (output layer zero: every choice equally likely)."""
    from ..model import DualPathLM

    check_duo(model, "router routing")
    cfg = model.cfg
    cfg = dataclasses.replace(cfg, duo_policy="router", router_hard=hard, router_temperature=1.0,
                              router_choices=cfg.router_choices if choices is None else choices,
                              router_input=cfg.router_input if router_input is None else router_input,
                              router_hidden=cfg.router_hidden if hidden is None else hidden)
    device = next(model.parameters()).device
    m = DualPathLM(cfg).to(device)
    own = m.state_dict()
    sd = {k: v for k, v in model.state_dict().items() if ".router." not in k or
          (k in own and own[k].shape == v.shape)}
    missing, unexpected = m.load_state_dict(sd, strict=False)
    if unexpected or any(".router." not in k for k in missing):
        raise CheckpointError(f"router copy does not match the base model ({(unexpected or missing)[0]})")
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


def check_variant(kind: str = "budget", choices: str = "bs", router_input: str = "pre", hidden: int = 0) -> None:
    from ..errors import check_one_of
    from ..model import ROUTER_CHOICES

    check_one_of("router kind", kind, KINDS)
    check_one_of("router choices", choices, tuple(ROUTER_CHOICES))
    check_one_of("router input", router_input, ("pre", "post"))
    if hidden < 0:
        raise ConfigError(f"the router hidden width must be >= 0 (0: linear), got {hidden}")


def _router_params(m) -> list:
    for p in m.parameters():
        p.requires_grad_(False)
    params = []
    for layer in m.layers:
        for p in layer.router.parameters():
            p.requires_grad_(True)
            params.append(p)
    return params


def _check_train_args(target, steps, tau_start=1.0, tau_end=1.0, budget_weight=0.0, lr=DEFAULT_LR) -> float:
    target = check_fraction(target)
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    if not (tau_start > 0 and tau_end > 0 and math.isfinite(tau_start) and math.isfinite(tau_end)):
        raise ConfigError("router temperatures must be finite and > 0")
    if not (budget_weight >= 0 and math.isfinite(budget_weight)):
        raise ConfigError(f"the budget weight must be finite and >= 0, got {budget_weight}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"--lr must be finite and > 0, got {lr}")
    return target


def _step(opt, params, loss, step: int, lr: float, grad_clip: float) -> None:
    if not torch.isfinite(loss):
        raise DualPathError(f"router training diverged at step {step} (loss {loss.item()})")
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()


def train_router(model, batch_fn, target: float, steps: int = 500, *, lr: float = DEFAULT_LR,
                 budget_weight: float = DEFAULT_BUDGET_WEIGHT, tau_start: float = 1.0, tau_end: float = 0.05,
                 warmup_steps: int = 10, grad_clip: float = 1.0, log_every: int = 50, choices: str | None = None,
                 router_input: str | None = None, hidden: int | None = None, log=None):
    """Train the routers of (a router-policy copy of) a frozen Duo model with the budget loss.
    batch_fn(step) -> (inputs, targets). The variant (choices, router_input, hidden) defaults to the model's.

    Returns (router_model, history): the model with hard routing at τ = 1, and per-logged-step records.
    """
    target = _check_train_args(target, steps, tau_start, tau_end, budget_weight)
    fresh = model.cfg.duo_policy != "router" or any(v is not None for v in (choices, router_input, hidden))
    m = router_model(model, choices=choices, router_input=router_input, hidden=hidden) if fresh else model
    params = _router_params(m)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    history = []
    m.train()
    t0 = time.perf_counter()
    for step in range(steps):
        tau = tau_start * (tau_end / tau_start) ** (step / max(1, steps - 1))
        set_routing(m, hard=False, temperature=tau)
        x, y = batch_fn(step)
        out = m(x, y, return_diagnostics=True)
        p_big = torch.stack([d["p_big"] for d in out.diagnostics])  # (L, B, T)
        valid = (y != -1).unsqueeze(0).expand_as(p_big)
        frac = p_big[valid].mean()
        budget_loss = budget_weight * (frac - target) ** 2
        loss = out.loss + budget_loss
        _step(opt, params, loss, step, lr * min(1.0, (step + 1) / max(1, warmup_steps)), grad_clip)
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


def oracle_labels(model, batches, k: int, with_skip: bool, *, max_patterns: int = 4096, beam: int = 16,
                  log=None) -> tuple[torch.Tensor, dict]:
    """The per-token oracle's choices at k big layers on `batches`: (L, N, T) codes (each token's best
    whole-sequence pattern, one choice per layer), and the oracle entry."""
    e = oracle_budget(model, batches, k, with_skip=with_skip, max_patterns=max_patterns, beam=beam, log=log)
    return choice_from_index(e["_codes"], e["_result"]["tok_arg"]), e


@torch.no_grad()
def _router_inputs(m, batches, labels) -> list[torch.Tensor]:
    """Each layer's router input (N, T, d) with the layers run under the label choices (teacher forcing)."""
    feats: list[list] = [[] for _ in m.layers]
    hooks = [layer.router.register_forward_pre_hook(lambda mod, a, i=i: feats[i].append(a[0].detach()))
             for i, layer in enumerate(m.layers)]
    try:
        n = 0
        for x, y in batches:
            m(x, y, choices=labels[:, n:n + x.shape[0]].to(x.device), return_diagnostics=True)
            n += x.shape[0]
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(f) for f in feats]


def _router_targets(labels: torch.Tensor, choices: str) -> torch.Tensor:
    """Class targets of the router outputs: bs learns big (0) against not-big (1); bsx the code itself."""
    return torch.where(labels == BIG, BIG, SMALL) if choices == "bs" else labels


def _router_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if logits.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(logits.squeeze(-1), (target == BIG).float(), reduction="none")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none").view(
        target.shape)


def shift_big_logit(m, delta: float) -> None:
    """Add delta to every router's big logit (its output-layer bias): more big decisions for delta > 0."""
    for layer in m.layers:
        out = layer.router if isinstance(layer.router, torch.nn.Linear) else layer.router.out
        out.bias.data[BIG] += delta


@torch.no_grad()
def calibrate_big_fraction(m, batches, target: float, iters: int = 24) -> dict:
    """Bisection on one shift of every router's big logit so the hard big fraction on `batches` meets the
    target (as close as the decisions allow)."""
    lo, hi, applied = -20.0, 20.0, 0.0
    best = (math.inf, 0.0, None)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        shift_big_logit(m, mid - applied)
        applied = mid
        frac = evaluate_routed(m, batches)["big_fraction"]
        if abs(frac - target) < best[0]:
            best = (abs(frac - target), mid, frac)
        if frac < target:
            lo = mid
        else:
            hi = mid
    shift_big_logit(m, best[1] - applied)
    return {"big_logit_shift": best[1], "calibrated_big_fraction": best[2]}


def train_router_oracle(model, batches, labels: torch.Tensor, target: float, steps: int = 500, *,
                        lr: float = DEFAULT_LR, batch_size: int = 8, warmup_steps: int = 10, grad_clip: float = 1.0,
                        seed: int = 0, log_every: int = 50, choices: str | None = None,
                        router_input: str | None = None, hidden: int | None = None, calibrate: bool = True,
                        log=None):
    """Train the routers to predict the oracle's per-token choices `labels` (L, N, T) on `batches` (the
    windows the labels were found on), then shift the big logit so the hard big fraction on them is the
    target. Returns (router_model, history)."""
    target = _check_train_args(target, steps)
    m = router_model(model, choices=choices, router_input=router_input, hidden=hidden)
    batches = list(batches)
    N = sum(x.shape[0] for x, _ in batches)
    if labels.shape[:2] != (m.cfg.n_layers, N):
        raise ConfigError(f"labels of shape {tuple(labels.shape)} for {m.cfg.n_layers} layers and {N} windows")
    if m.cfg.router_choices == "bs" and bool((labels == SKIP).any()) and log:
        log("the oracle skips some layers: a big/small router learns them as small")
    feats = _router_inputs(m, batches, labels)
    valid = torch.cat([y != -1 for _, y in batches]).cpu()
    tgt = _router_targets(labels.cpu(), m.cfg.router_choices)
    params = _router_params(m)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    history = []
    t0 = time.perf_counter()
    for step in range(steps):
        rows = torch.randint(0, N, (min(batch_size, N),), generator=gen)
        v = valid[rows].float()
        loss = sum((_router_ce(layer.router(f[rows.to(f.device)]), tgt[i, rows].to(f.device)).cpu() * v).sum()
                   for i, (layer, f) in enumerate(zip(m.layers, feats))) / (v.sum().clamp(min=1) * len(feats))
        _step(opt, params, loss, step, lr * min(1.0, (step + 1) / max(1, warmup_steps)), grad_clip)
        if step % log_every == 0 or step == steps - 1:
            history.append({"step": step, "label_loss": loss.item(), "seconds": time.perf_counter() - t0})
            if log:
                log(f"router step {step}: label cross-entropy {loss.item():.4f}")
    for p in m.parameters():
        p.requires_grad_(False)
    set_routing(m, hard=True, temperature=1.0)
    m.eval()
    if calibrate:
        cal = calibrate_big_fraction(m, batches, target)
        history.append({"step": steps, **cal})
        if log:
            log(f"big logit shifted by {cal['big_logit_shift']:+.3f}: hard big fraction "
                f"{cal['calibrated_big_fraction']:.3f} on the label windows (target {target:.3f})")
    return m, history


@torch.inference_mode()
def evaluate_routed(model, batches, keep_token_losses: bool = False) -> dict:
    """Loss, perplexity, achieved big fraction and realised FLOPs of a router-policy model, hard routing."""
    if model.cfg.duo_policy != "router":
        raise ConfigError("evaluate_routed needs a router-policy model (see router_model)")
    set_routing(model, hard=True, temperature=1.0)
    loss_sum, n_tok, big, skip, n_dec, flops = 0.0, 0, 0, 0, 0, 0.0
    per_layer = torch.zeros(model.cfg.n_layers, dtype=torch.float64)
    tok, chosen = [], []
    for x, y in batches:
        out = model(x, y, return_per_token_loss=True, return_diagnostics=True)
        choice = torch.stack([d["duo_choice"] for d in out.diagnostics])  # (L, B, T)
        valid = (y != -1)
        loss_sum += float(out.per_token_loss.double()[valid].sum())
        n_tok += int(valid.sum())
        is_big = (choice == BIG) & valid.unsqueeze(0)
        big += int(is_big.sum())
        skip += int(((choice == SKIP) & valid.unsqueeze(0)).sum())
        n_dec += int(valid.sum()) * choice.shape[0]
        per_layer += is_big.sum((1, 2)).double().cpu()
        flops += flops_per_token(model, choice, x.shape[1], with_router=True) * choice[0].numel()
        if keep_token_losses:
            tok.append(out.per_token_loss.float().cpu())
            chosen.append(choice.cpu())
    loss = loss_sum / max(n_tok, 1)
    res = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "big_fraction": big / max(n_dec, 1),
           "skip_fraction": skip / max(n_dec, 1), "big_fraction_by_layer": (per_layer / max(n_tok, 1)).tolist(),
           "flops_per_token": flops / sum(x.numel() for x, _ in batches), "n_tokens": n_tok}
    if keep_token_losses:
        res["_token_losses"] = torch.cat(tok)
        res["_choices"] = torch.cat(chosen, 1)  # (L, N, T)
    return res


def router_name(cfg, kind: str | None) -> str:
    """'oracle/post/bsx/mlp64': how a router was trained, what it reads, what it may choose, its shape."""
    shape = f"mlp{cfg.router_hidden}" if cfg.router_hidden else "linear"
    return f"{kind or 'budget'}/{cfg.router_input}/{cfg.router_choices}/{shape}"


def router_state_of(ckpt: Path) -> dict:
    """What `duo train-router` recorded about a router checkpoint (router_target, router_kind, ...)."""
    from ..checkpoint import load_torch

    p = Path(ckpt) / "trainer_state.pt"
    st = load_torch(p) if p.is_file() else None
    return {k: v for k, v in st.items() if k.startswith("router_")} if isinstance(st, dict) else {}


def load_router(path, base_model=None, device: str = "cpu"):
    """A router checkpoint -> (router model, its recorded state {router_target, router_kind, ...}, folder).
    With base_model, its frozen weights must be the base model's (else the comparison would mix two models)."""
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
    return m, router_state_of(ckpt), ckpt


def _load_labels(path, key: dict) -> dict | None:
    """Oracle labels saved by an earlier run for the same base model, budget, windows and search; None if the
    file does not exist yet."""
    from ..checkpoint import load_torch

    p = Path(path)
    if not p.is_file():
        return None
    st = load_torch(p)
    diff = [k for k, v in key.items() if not isinstance(st, dict) or st.get(k) != v]
    if diff:
        raise ConfigError(f"--labels {p} holds labels of another setting ({diff[0]}: "
                          f"{st.get(diff[0]) if isinstance(st, dict) else '?'} vs {key[diff[0]]})")
    return st


def _save_labels(path, labels: dict) -> None:
    from ..fileio import atomic_open

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        torch.save(labels, f)


def run_train_router(checkpoint, data, budget: float, out, *, kind: str = "budget", choices: str = "bs",
                     router_input: str = "pre", hidden: int = 0, steps: int = 500, batch_size: int = 8,
                     seq_len: int | None = None, lr: float = DEFAULT_LR, budget_weight: float = DEFAULT_BUDGET_WEIGHT,
                     tau_end: float = 0.05, label_sequences: int = 64, labels_file=None, max_patterns: int = 4096,
                     beam: int = 16, eval_sequences: int = 64, seed: int = 0, device: str = "cpu", log=None) -> dict:
    """`dualpath duo train-router`: train on the train split of a prepared folder (kind budget: random
    windows; kind oracle: the first label_sequences windows, labelled by the per-token oracle at
    k = round(budget·L), with skip for a bsx router; with labels_file, labels of the same setting are read
    from it, or saved there for the next router), evaluate hard on its val split, save a router checkpoint
    (duo_policy=router) under OUT/checkpoints and OUT/router.json."""
    from ..checkpoint import atomic_write_text, load_model, save_checkpoint
    from ..data.loader import load_windows, make_batches, train_window_fn
    from ..fileio import sha256_file

    target = check_fraction(budget)
    check_variant(kind, choices, router_input, hidden)
    held = [n for n in ("checkpoints", "router.json", "config.yaml", "metrics.jsonl") if (Path(out) / n).exists()]
    if held:  # saving would overwrite or prune what is there (a trained model, another router)
        raise ConfigError(f"--out {out} holds a run or router already ({', '.join(held)}); "
                          "give a new folder, or remove this one")
    if labels_file and kind == "oracle":
        from ..fileio import check_output_file

        check_output_file(labels_file, "--labels")
    if label_sequences < 1:
        raise ConfigError(f"--label-sequences must be >= 1, got {label_sequences}")
    model, cfg, ckpt = load_model(checkpoint, device)
    check_duo(model, "`duo train-router`")
    _check_train_args(target, steps, 1.0, tau_end, budget_weight, lr)
    variant = dict(choices=choices, router_input=router_input, hidden=hidden)
    x, y = load_windows(data, model, tokenizer_dir=ckpt, max_sequences=eval_sequences, seq_len=seq_len)
    torch.manual_seed(seed)
    extra = {}
    if kind == "budget":
        batch_fn = train_window_fn(data, model, batch_size=batch_size, seq_len=seq_len, seed=seed, device=device)
        rm, history = train_router(model, batch_fn, target, steps, lr=lr, budget_weight=budget_weight,
                                   tau_end=tau_end, log=log, **variant)
    else:
        train_window_fn(data, model, batch_size=batch_size, seq_len=seq_len, seed=seed, device=device)  # checks
        lx, ly = load_windows(data, model, split="train", max_sequences=label_sequences, seq_len=seq_len)
        lb = make_batches(lx, ly, batch_size, device)
        k = round(target * model.cfg.n_layers)
        key = {"budget": k, "with_skip": choices == "bsx", "windows": int(lx.shape[0]), "seq_len": int(lx.shape[1]),
               "base_checkpoint": str(ckpt), "max_patterns": max_patterns, "beam": beam,
               "base_weights": sha256_file(ckpt / "model.safetensors")}  # a retrained model in the same folder
        cached = _load_labels(labels_file, key) if labels_file else None
        if cached is None:
            labels, e = oracle_labels(model, lb, k, choices == "bsx", max_patterns=max_patterns, beam=beam, log=log)
            cached = {**key, "labels": labels.to(torch.int8), "oracle_loss": e["per_token_oracle"]["loss"],
                      "search": e["method"]}
            if labels_file:
                _save_labels(labels_file, cached)
        elif log:
            log(f"oracle labels from {labels_file}")
        rm, history = train_router_oracle(model, lb, cached["labels"].long(), k / model.cfg.n_layers, steps, lr=lr,
                                          batch_size=batch_size, seed=seed, log=log, **variant)
        extra = {"label_budget": k, "label_windows": int(lx.shape[0]), "label_oracle_loss": cached["oracle_loss"],
                 "label_search": cached["search"]}
    ev = evaluate_routed(rm, make_batches(x, y, batch_size, device))
    run_cfg = dataclasses.replace(cfg, model=rm.cfg)
    run_cfg.train = dataclasses.replace(cfg.train, out_dir=str(out))
    files = {n: ckpt / n for n in ("tokenizer.json", "data_meta.json") if (ckpt / n).is_file()}
    state = {"step": steps, "router_target": target, "router_kind": kind, "router_budget_weight": budget_weight,
             "router_lr": lr, "router_tau_end": tau_end, "router_seed": seed, "base_checkpoint": str(ckpt),
             **{f"router_{k}": v for k, v in extra.items()}}
    saved = save_checkpoint(out, steps, rm.state_dict(), run_cfg, trainer_state=state, files=files, keep_last=1)
    res = {"checkpoint": str(saved), "base_checkpoint": str(ckpt), "kind": kind, "router": router_name(rm.cfg, kind),
           "target": target, "achieved_big_fraction": ev["big_fraction"], "skip_fraction": ev["skip_fraction"],
           "loss": ev["loss"], "ppl": ev["ppl"], "flops_per_token": ev["flops_per_token"],
           "big_fraction_by_layer": ev["big_fraction_by_layer"], "steps": steps, "budget_weight": budget_weight,
           "lr": lr, "tau_end": tau_end, "seed": seed, **extra, "history": history}
    atomic_write_text(Path(out) / "router.json", json.dumps(res, indent=1))
    if log:
        log(f"router {res['router']}: big fraction {ev['big_fraction']:.3f} (target {target:.3f}), skip "
            f"{ev['skip_fraction']:.3f}, loss {ev['loss']:.4f}, saved {saved}")
    return res

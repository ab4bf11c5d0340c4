"""The trainer. It knows nothing about a specific architecture: it needs a config with `build()`, and a model
whose forward takes `sample_keys` (one key per sample for any random draw) and returns an object with `.loss`
(and `.per_token_loss` on request), that reports
`train_flops_per_token(seq_len)`, `param_counts()` and `named_param_roles()`, and optionally
`summary_metrics(idx)` for the log at every log step and `summary_sums(out)` / `summary_from_sums(sums)` for
statistics over the val windows at every eval. Parallelism is applied from `parallel.py`.

    dualpath train CONFIG.yaml [key=value ...] [--steps N | --tokens N | --target-flops F] [--resume auto|PATH]
    torchrun --nproc_per_node N -m dualpath train CONFIG.yaml ...      (DDP: gloo on CPU, nccl on GPU)

Batches are addressed by a global window counter, so a run resumes exactly from the counter alone, and
N ranks with accumulation A see the same windows as one rank with accumulation N·A.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from collections import deque
from pathlib import Path

import torch
import torch.nn as nn

from . import checkpoint as ckpt_io
from .config import OptimConfig, RunConfig, to_dict
from .data.loader import Batches
from .data.tokenizer import check_same_tokenizer
from .errors import ConfigError, DualPathError, warn
from .fileio import FolderLock, atomic_write_json, check_writable_dir
from .parallel import (Dist, full_state_dict, init_distributed, load_optimizer_state_dict, optimizer_state_dict,
                       pick_device, sync_context, unwrap, use_compile, wrap_model)
from .perf import peak_flops

LN2 = math.log(2.0)


class TrainingError(DualPathError):
    """The run diverged (a non-finite loss or gradient norm, or a loss spike); nothing poisoned is kept."""


# ----------------------------------------------------------------------------------------------
# Optimiser and schedule


# The roles (from the model's named_param_roles()) that get weight decay, and those that
# optim.decay_gates_and_norms adds (the reference's grouping); gate_lr_mult scales the LR of GATE_LR_ROLES.
DECAY_ROLES = ("matrix", "head", "router")
REFERENCE_EXTRA_DECAY_ROLES = ("gate", "gain", "norm", "router_bias")
GATE_LR_ROLES = ("gate", "gain")


def param_groups(model: nn.Module, weight_decay: float, decay_gates_and_norms: bool = False,
                 gate_lr_mult: float = 1.0) -> list[dict]:
    """AdamW groups by parameter role (the model says which parameter plays which role, through
    `named_param_roles`). By default decay only matrices (projections, the LM head, router weights); never
    embeddings, norms, gains, gates or biases. The first two groups are always (decayed, not decayed) at
    the base LR; groups with another `lr_mult` follow only when gate_lr_mult != 1."""
    decay_roles = DECAY_ROLES + (REFERENCE_EXTRA_DECAY_ROLES if decay_gates_and_norms else ())
    groups = [{"params": [], "weight_decay": weight_decay, "lr_mult": 1.0},
              {"params": [], "weight_decay": 0.0, "lr_mult": 1.0}]
    scaled: dict[bool, dict] = {}
    for _, p, role in model.named_param_roles():
        if not p.requires_grad:
            continue
        decayed = role in decay_roles
        if role in GATE_LR_ROLES and gate_lr_mult != 1.0:
            scaled.setdefault(decayed, {"params": [], "weight_decay": weight_decay if decayed else 0.0,
                                        "lr_mult": gate_lr_mult})["params"].append(p)
        else:
            groups[0 if decayed else 1]["params"].append(p)
    return groups + [scaled[k] for k in (True, False) if k in scaled]


def build_optimizer(model: nn.Module, cfg: OptimConfig, fast: bool = True) -> torch.optim.Optimizer:
    """AdamW over param_groups; fast=False: torch's default implementation (the reference the fused one is
    tested and benchmarked against)."""
    groups = param_groups(model, cfg.weight_decay, cfg.decay_gates_and_norms, cfg.gate_lr_mult)
    params = [p for g in groups for p in g["params"]]
    # One fused kernel for all parameters instead of a dozen ops per tensor (the step of the default for-loop
    # AdamW on CPU); sharded (DTensor) parameters keep torch's default.
    fused = fast and all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda") for p in params) or None
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    """Linear warmup into cosine decay to min_lr (or WSD: warmup, stable, linear decay at the end)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.wsd_decay_frac * total))
        start = total - decay_steps
        if step < start:
            return cfg.lr
        return cfg.lr + (cfg.min_lr - cfg.lr) * min(1.0, (step - start + 1) / decay_steps)
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# The loop


def horizon(cfg: RunConfig, tokens_per_step: int, train_flops_per_token: float) -> int:
    t = cfg.train
    if t.steps:
        return t.steps
    if t.tokens:
        return max(1, math.ceil(t.tokens / tokens_per_step))
    if t.target_flops:
        steps = int(t.target_flops // (train_flops_per_token * tokens_per_step))
        if steps < 1:
            raise DualPathError(f"train.target_flops={t.target_flops:.3g} is less than one step "
                                f"({train_flops_per_token * tokens_per_step:.3g} FLOPs)")
        return steps
    raise DualPathError("set the horizon: --steps, --tokens or --target-flops (train.steps/tokens/target_flops)")


@torch.no_grad()
def evaluate_split(model: nn.Module, batches: Batches, n_batches: int, batch_size: int, device, d: Dist,
                   autocast) -> dict:
    """Mean loss and exact bits per byte over a fixed set of val windows (split across ranks), and the model's
    own statistics over the same windows when it has `summary_sums(out)` / `summary_from_sums(sums)`: exact
    sums per forward (made with return_diagnostics=True), added over every window and rank."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    tok_sum = torch.zeros((), dtype=torch.float64, device=device)
    byte_sum = torch.zeros((), dtype=torch.float64, device=device)
    sums_of = getattr(model, "summary_sums", None)
    extra = {"return_diagnostics": True} if sums_of is not None else {}
    stat_sums: dict[str, torch.Tensor] = {}  # the same keys, in the same order, on every rank
    n_windows = batches.val_sampler.n_windows
    n_batches = max(1, min(n_batches, math.ceil(n_windows / batch_size)))
    # Every rank runs the same number of forwards (FSDP2 gathers weights collectively); spare ones count 0.
    for j in range(math.ceil(n_batches / d.world)):
        i = j * d.world + d.rank
        real = i < n_batches
        start = i * batch_size if real else 0
        count = min(batch_size, n_windows - start)
        x, y = batches.get("val", start, count, device)
        keys = _sample_keys(batches.val_sampler.seed, -1, start, count, device)  # step -1: validation
        with autocast:
            out = model(x, y, return_per_token_loss=True, sample_keys=keys, **extra)
        if sums_of is not None:
            for k, v in sums_of(out).items():
                v = v.to(device=device, dtype=torch.float64)
                stat_sums[k] = stat_sums.get(k, torch.zeros_like(v)) + (v if real else 0)
        if not real:
            continue
        loss_sum += out.per_token_loss.double().sum()
        tok_sum += y.numel()
        if batches.byte_lengths is not None:
            byte_sum += batches.byte_lengths.to(device)[y].sum()
    keys = list(stat_sums)
    packed = [torch.stack([stat_sums[k] for k in keys])] if keys else []
    if d.enabled:
        import torch.distributed as dist

        for t in (loss_sum, tok_sum, byte_sum, *packed):
            dist.all_reduce(t)
    model.train()
    loss = (loss_sum / tok_sum.clamp(min=1)).item()
    bpb = (loss_sum / LN2 / byte_sum).item() if byte_sum.item() > 0 else float("nan")
    res = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_bpb": bpb, "val_tokens": int(tok_sum.item())}
    if keys:
        res.update(model.summary_from_sums(dict(zip(keys, packed[0].tolist()))))
    return res


def _rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _line_step(line: str) -> int:
    """The step of a metrics.jsonl line; -1 for a blank or torn line (e.g. a write cut short by a full disk)."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return -1
    return int(rec.get("step", 0)) if isinstance(rec, dict) else -1


class _Logger:
    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():  # drop lines the resumed run will write again
            keep = [ln for ln in self.path.read_text().splitlines() if 0 <= _line_step(ln) <= resume_step]
            ckpt_io.atomic_write_text(self.path, "".join(k + "\n" for k in keep))
        elif self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:
                self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


class _Progress:
    """The rich bar on a terminal; without one (nohup, Slurm, CI) one plain line every `every` steps:
    step, loss, tokens/s, MFU and the time left."""

    def __init__(self, enabled: bool, total: int, start: int, every: int):
        self.total, self.every, self.bar = total, every, None
        self.enabled = enabled
        self.t_start, self.start = time.perf_counter(), start
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"), transient=False)
            self.bar.start()
            self.bar.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, loss: float | None = None, tps: float = 0.0, mfu: float = 0.0) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            info = {"info": f"loss {loss:.3f}  {tps:,.0f} tok/s  MFU {mfu:.1%}"} if loss is not None else {}
            self.bar.update(self.bar.task_ids[0], completed=step, **info)
        elif loss is not None and (step % self.every == 0 or step == self.total):
            done = step - self.start
            left = (time.perf_counter() - self.t_start) / done * (self.total - step) if done else 0.0
            eta = time.strftime("%H:%M:%S", time.gmtime(left)) if left < 86400 else f"{left / 86400:.1f} days"
            print(f"step {step}/{self.total}  loss {loss:.4f}  {tps:,.0f} tok/s  MFU {mfu:.1%}  ETA {eta}",
                  flush=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


MIN_HISTORY = 5  # losses the spike guard needs before it judges a step

# What a run folder holds (the lock file aside); --overwrite removes exactly these.
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "tb", "eval.json")
# Keys a resume never compares (where the run is, how it was asked to resume, whether it is compiled: that
# changes float rounding only, as the thread count does)...
RESUME_IGNORED = ("train.resume", "train.out_dir", "train.compile")
# ...and those --allow-safe-changes lets differ: the horizon (the LR schedule follows the new one), cadence
# of logs, evals and saves, and reporting. Everything else changes what the run computes.
SAFE_CHANGES = ("train.steps", "train.tokens", "train.target_flops", "train.log_every", "train.eval_every",
                "train.eval_batches", "train.save_every", "train.keep_last", "train.tensorboard", "train.progress",
                "train.peak_flops", "train.divergence_factor", "train.divergence_window")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: RunConfig, new: RunConfig) -> list[str]:
    """The dotted keys whose values differ between two configs (RESUME_IGNORED aside)."""
    a, b = _flat(to_dict(old)), _flat(to_dict(new))
    return [k for k in dict.fromkeys([*a, *b]) if k not in RESUME_IGNORED and a.get(k) != b.get(k)]


def check_same_run(saved: RunConfig, cfg: RunConfig, where, allow_safe_changes: bool) -> None:
    """ConfigError listing the keys where `cfg` differs from the run's saved config, unless there are none
    (or, with allow_safe_changes, only SAFE_CHANGES)."""
    changed = config_changes(saved, cfg)
    if not changed:
        return
    flat_old, flat_new = _flat(to_dict(saved)), _flat(to_dict(cfg))
    shown = ", ".join(f"{k} ({flat_old.get(k)!r} -> {flat_new.get(k)!r})" for k in changed[:6])
    more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
    unsafe = [k for k in changed if k not in SAFE_CHANGES]
    if not unsafe and allow_safe_changes:
        return
    if unsafe:
        hint = "resume with the run's own config (e.g. its config.yaml), or train a new run into another folder"
    else:
        hint = "pass --allow-safe-changes to resume with these changes"
    raise ConfigError(f"the config differs from the run in {where}: {shown}{more}; {hint}")


def holds_run(out_dir: Path) -> bool:
    return any((out_dir / name).exists() for name in RUN_FILES)


def resume_point(cfg: RunConfig, *, overwrite: bool = False, allow_safe_changes: bool = False) -> Path | None:
    """The checkpoint a run resumes from (None: a fresh start), after every check that decides whether it
    may run into its folder at all. Reads only: nothing is written.

    - a fresh run (train.resume empty) refuses a folder that holds a run, unless overwrite;
    - resume=auto takes the newest checkpoint of the folder that verifies (a warning names any newer one
      that does not); with none, a folder holding a run started under another config is refused;
    - resume=PATH takes that checkpoint, verified;
    - a resumed run's config must equal the checkpoint's (see check_same_run)."""
    t = cfg.train
    out_dir = Path(t.out_dir)
    check_writable_dir(out_dir, "train.out_dir")
    if overwrite and t.resume:
        raise ConfigError("--overwrite starts the run again and --resume continues it: give one of them")
    if not t.resume:
        if holds_run(out_dir) and not overwrite:
            raise ConfigError(f"{out_dir} holds a run already: --resume auto continues it, --overwrite replaces "
                              "it, or train into another folder (--out)")
        return None
    if t.resume == "auto":
        ckpt = ckpt_io.find_resumable(out_dir)
        if ckpt is None:
            saved = out_dir / "config.yaml"
            if saved.is_file():  # a run that stopped before its first checkpoint: only the same run restarts
                check_same_run(ckpt_io.load_config(out_dir), cfg, saved, allow_safe_changes)
            return None
    else:
        ckpt = ckpt_io.resolve(t.resume)
        ckpt_io.verify(ckpt)
    check_same_run(ckpt_io.load_config(ckpt), cfg, ckpt, allow_safe_changes)
    return ckpt


def _recheck_locked(out_dir: Path, seen: list[str], fresh: bool) -> None:
    """Under the lock: another process may have written the folder between the checks and the lock."""
    if fresh and holds_run(out_dir):
        raise ConfigError(f"{out_dir} holds a run already (written while this one started)")
    if [p.name for p in ckpt_io.step_folders(out_dir / "checkpoints")] != seen:
        raise ConfigError(f"the checkpoints in {out_dir} changed while this run started: start it again")


def _remove_run(out_dir: Path) -> None:
    """The files of the run in out_dir (RUN_FILES), for --overwrite, after every check passed."""
    for name in RUN_FILES:
        p = out_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def train(cfg: RunConfig, *, overwrite: bool = False, allow_safe_changes: bool = False) -> dict:
    """Train `cfg.model` on `cfg.data` to the configured horizon. Returns the final summary.

    Everything is checked before any file is written: the config, the data (headers, token ids against the
    model's vocabulary, the tokenizer against a resumed checkpoint's), the run folder (see resume_point).
    Then the folder is locked for this process (FolderLock) until the run ends."""
    t = cfg.train
    device_type = "cuda" if (t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())) else "cpu"
    d = init_distributed(device_type)
    device = pick_device(t.device, d)
    seq_len = cfg.data.seq_len or cfg.model.seq_len
    if seq_len > cfg.model.seq_len:
        raise DualPathError(f"data.seq_len={seq_len} is longer than model.seq_len={cfg.model.seq_len}")
    out_dir = Path(t.out_dir)
    batches = Batches(cfg.data.path, seq_len, t.seed, cfg.model.vocab_size)

    torch.manual_seed(t.seed)
    model = cfg.model.build().to(device)
    raw = model
    B, A = cfg.data.batch_size, t.grad_accum
    tokens_per_step = B * A * d.world * seq_len
    train_fpt = raw.train_flops_per_token(seq_len)
    total_steps = horizon(cfg, tokens_per_step, train_fpt)
    compiled = use_compile(t.compile, total_steps * tokens_per_step * train_fpt / d.world, device)

    resume_from = resume_point(cfg, overwrite=overwrite, allow_safe_changes=allow_safe_changes)
    seen = [p.name for p in ckpt_io.step_folders(out_dir / "checkpoints")]
    step, windows = 0, 0  # windows: the global window counter (what the data loader has consumed)
    recent: deque = deque(maxlen=t.divergence_window)  # recent healthy losses, for the spike guard
    if resume_from is not None:
        if (resume_from / "tokenizer.json").is_file():
            check_same_tokenizer(batches.root, resume_from / "tokenizer.json", f"the checkpoint {resume_from}")
        step, windows, losses = _restore_weights(resume_from, raw, device)
        recent.extend(losses)
        if step >= total_steps and (out_dir / "summary.json").is_file():
            return json.loads((out_dir / "summary.json").read_text())
    if d.main and cfg.optim.warmup_steps > total_steps:
        warn(f"optim.warmup_steps={cfg.optim.warmup_steps} is longer than the run ({total_steps} steps): "
             "the learning rate never reaches optim.lr")
    # Every check passed: from here on files are written, under the folder's lock.
    lock = FolderLock(out_dir).acquire() if d.main else None
    try:
        if d.main:
            _recheck_locked(out_dir, seen, fresh=not t.resume and not overwrite)
            if overwrite:
                _remove_run(out_dir)
        return _train_locked(cfg, d, device, raw, batches, seq_len, tokens_per_step, train_fpt, total_steps,
                             resume_from, step, windows, recent, compiled)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(cfg: RunConfig, d: Dist, device, raw: nn.Module, batches: Batches, seq_len: int,
                  tokens_per_step: int, train_fpt: float, total_steps: int, resume_from: Path | None, step: int,
                  windows: int, recent: deque, compiled: tuple[bool, str]) -> dict:
    t = cfg.train
    out_dir = Path(t.out_dir)
    B, A = cfg.data.batch_size, t.grad_accum
    model = wrap_model(raw, cfg, device, d, compile=compiled[0])
    optimizer = build_optimizer(raw, cfg.optim)  # after wrapping: FSDP2 replaces the parameters
    if resume_from is not None and (resume_from / "optimizer.pt").is_file():
        load_optimizer_state_dict(model, optimizer, ckpt_io.load_torch(resume_from / "optimizer.pt"), cfg)

    use_bf16 = t.dtype == "bfloat16" or (t.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    peak, peak_src = peak_flops(device, t.peak_flops) if d.main else (1.0, "")
    logger = _Logger(out_dir, d.main, t.tensorboard, step if resume_from is not None else None)
    files = {"tokenizer.json": batches.root / "tokenizer.json", "data_meta.json": batches.root / "meta.json"}
    if d.main:
        ckpt_io.write_config(out_dir / "config.yaml", cfg)
        logger.log({"step": step, "event": "start", "params": raw.param_counts()["total"],
                    "train_flops_per_token": train_fpt, "tokens_per_step": tokens_per_step,
                    "total_steps": total_steps, "peak_flops": peak, "peak_source": peak_src, "world": d.world,
                    "device": str(device), "compile": compiled[0], "compile_reason": compiled[1],
                    "resumed_from": str(resume_from) if resume_from else None})

    saved: list[Path] = []  # the checkpoints this run wrote, oldest first
    # Older checkpoints are pruned only once a newer one is known healthy (its weights gave a healthy loss
    # at the next step, or a finite val loss), so a divergence never leaves a run without a good one.
    unconfirmed = False

    def save(at_step: int, confirmed: bool):
        nonlocal unconfirmed
        state = full_state_dict(model, cfg)
        optim_state = optimizer_state_dict(model, optimizer, cfg)
        if d.main:
            saved.append(ckpt_io.save_checkpoint(
                out_dir, at_step, state, cfg, optimizer_state=optim_state,
                trainer_state={"step": at_step, "rng": _rng_state(device), "window_counter": windows,
                               "world": d.world, "tokens": at_step * tokens_per_step,
                               "recent_losses": list(recent)},
                files=files, keep_last=None))
            if confirmed:
                ckpt_io.prune(out_dir, t.keep_last)
            unconfirmed = not confirmed

    def diverged(what: str, at_step: int, bad_from: int):
        """Stop: the weights after step bad_from - 1 are the last healthy ones; checkpoints from bad_from on
        are removed and `latest` points at the last good one."""
        good = _roll_back(out_dir, saved, resume_from, bad_from) if d.main else None
        raise TrainingError(f"{what} at step {at_step}; stopped, nothing from step {bad_from} on is kept "
                            f"(last good checkpoint: {good or 'none'})")

    progress = _Progress(t.progress and d.main, total_steps, step, t.log_every)
    model.train()
    t0, tokens_since, last_metrics = time.perf_counter(), 0, {}
    seed = t.seed
    try:
        while step < total_steps:
            lr = lr_at(step, total_steps, cfg.optim)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_mult", 1.0)
            loss_acc = torch.zeros((), device=device)
            for a in range(A):
                first = windows + (a * d.world + d.rank) * B
                x, y = batches.get("train", first, B, device)
                keys = _sample_keys(seed, step, first, B, device)
                with sync_context(model, a == A - 1, d), autocast:
                    loss = model(x, y, sample_keys=keys).loss / A
                with sync_context(model, a == A - 1, d):
                    loss.backward()
                loss_acc += loss.detach()
            if d.enabled:
                import torch.distributed as dist

                dist.all_reduce(loss_acc, op=dist.ReduceOp.AVG if device.type == "cuda" else dist.ReduceOp.SUM)
                if device.type != "cuda":
                    loss_acc /= d.world
            loss_value = loss_acc.item()
            # the loss of step s is measured on the weights after step s - 1
            if not math.isfinite(loss_value):
                diverged(f"loss became {loss_value}", step + 1, step)
            if (t.divergence_factor and len(recent) >= min(MIN_HISTORY, t.divergence_window)
                    and loss_value > t.divergence_factor * (mean := sum(recent) / len(recent))):
                diverged(f"loss {loss_value:.4g} spiked above {t.divergence_factor:g}x its recent mean "
                         f"{mean:.4g} (train.divergence_factor)", step + 1, step)
            gnorm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip) if cfg.optim.grad_clip
                     else torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters()
                                         if p.grad is not None)))
            gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
            gnorm_value = float(gnorm)
            if not math.isfinite(gnorm_value):  # a finite loss can still have a non-finite gradient
                diverged(f"gradient norm became {gnorm_value}", step + 1, step)
            recent.append(loss_value)
            if unconfirmed:  # the last checkpoint's weights gave this healthy step
                ckpt_io.prune(out_dir, t.keep_last)
                unconfirmed = False
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            windows += B * A * d.world
            tokens_since += tokens_per_step

            if step % t.log_every == 0 or step == total_steps:
                dt = time.perf_counter() - t0
                tps = tokens_since / max(dt, 1e-9)
                rec = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": gnorm_value, "tokens_per_s": tps,
                       "mfu": tps * train_fpt / peak, "tokens": step * tokens_per_step,
                       "flops": step * tokens_per_step * train_fpt}
                summary = getattr(raw, "summary_metrics", None)
                if summary is not None:
                    with autocast:
                        rec.update(summary(x[:1]))
                logger.log(rec)
                last_metrics = rec
                t0, tokens_since = time.perf_counter(), 0
                progress.update(step, loss=loss_value, tps=tps, mfu=rec["mfu"])
            else:
                progress.update(step)
            evaluated = (t.eval_every and step % t.eval_every == 0) or step == total_steps
            if evaluated:
                # DDP's forward would broadcast buffers; FSDP2 needs the sharded module itself
                ev = evaluate_split(model if t.fsdp else unwrap(model), batches, t.eval_batches, B, device, d, autocast)
                if not math.isfinite(ev["val_loss"]):  # these weights are not saved
                    diverged(f"val loss became {ev['val_loss']}", step, step)
                logger.log({"step": step, **ev})
                last_metrics = {**last_metrics, **ev}
            if (t.save_every and step % t.save_every == 0) or step == total_steps:
                save(step, confirmed=bool(evaluated))
    finally:
        progress.stop()
        logger.close()
    result = {"step": step, "out_dir": str(out_dir), "params": raw.param_counts()["total"],
              "train_flops_per_token": train_fpt, "flops": step * tokens_per_step * train_fpt,
              "tokens": step * tokens_per_step, **{k: v for k, v in last_metrics.items() if k != "step"}}
    if d.main:
        atomic_write_json(out_dir / "summary.json", result)
    return result


def _sample_keys(seed: int, step: int, first_window: int, count: int, device) -> torch.Tensor:
    """(count, 3) keys (seed, step, global window index) of the samples first_window..: the model draws any
    per-sample randomness from them, so a sample is treated alike under any rank/accumulation split."""
    keys = torch.empty(count, 3, dtype=torch.long)
    keys[:, 0], keys[:, 1] = seed, step
    keys[:, 2] = torch.arange(first_window, first_window + count)
    return keys.to(device)


def _roll_back(out_dir: Path, saved: list[Path], resumed_from: Path | None, bad_from: int) -> Path | None:
    """Remove this run's checkpoints of steps >= bad_from; point `latest` at the newest good one, or remove it.
    Returns that checkpoint (this run's, or the one it resumed from)."""
    step_of = lambda p: int(p.name.split("_")[1])  # noqa: E731
    for p in [p for p in saved if step_of(p) >= bad_from]:
        shutil.rmtree(p, ignore_errors=True)
        saved.remove(p)
    good = [p for p in saved if p.is_dir()]
    if not good and resumed_from is not None and step_of(resumed_from) < bad_from:
        good = [resumed_from]
    latest = out_dir / "checkpoints" / "latest"
    if good and good[-1].parent == latest.parent:
        ckpt_io.atomic_write_text(latest, good[-1].name + "\n")
    elif latest.is_file():
        latest.unlink()
    return good[-1] if good else None


def _restore_weights(path: Path, model: nn.Module, device) -> tuple[int, int, list[float]]:
    """Weights, RNG state, position and recent losses of a checkpoint, into the unwrapped model."""
    try:
        ckpt_io.load_model_state(path, model)
    except ckpt_io.CheckpointError as e:
        raise ckpt_io.CheckpointError(f"cannot resume from {path}: {e}") from None
    ts = ckpt_io.load_torch(path / "trainer_state.pt")
    try:
        _set_rng_state(ts["rng"], device)
        return int(ts["step"]), int(ts["window_counter"]), [float(v) for v in ts.get("recent_losses", [])]
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise ckpt_io.CheckpointError(f"cannot resume from {path}: trainer_state.pt lacks the run's position") \
            from None

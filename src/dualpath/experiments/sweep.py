"""Iso-FLOP sweeps: budgets × architectures × K × α × seeds, as the paper runs them, optionally × the
values of one synthetic-corpus dial (a dose-response).

    dualpath sweep SWEEP.yaml [--jobs N] [--dry-run] [--aggregate-only]

Widths come from the solver, so every arm of a budget costs about the same FLOPs per token. The protocol
says what else is equal: `protocol: tokens` (the paper's) trains every arm of every budget on the same
tokens; `protocol: flops` gives every run of a budget the same total true training FLOPs (the budget's
tokens times its PureWide model's training FLOPs per token), so cheaper arms see more tokens.
With `synthetic.dial`, the sweep prepares one synthetic corpus per dial value (under OUT/data/) and
trains and evaluates every arm on each. Each run writes into its own folder and is resumable: finished
runs are skipped, a crashed run resumes from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import RunConfig, apply_overrides, from_dict, load_yaml, to_dict, validate_tree
from ..errors import ConfigError, warn
from ..fileio import FolderLock, atomic_write_text, check_writable_dir
from .sweep_report import aggregate


@dataclass
class ArmSpec:
    arch: str = "dual"  # wide | loop | dual
    K: list[int] | None = None  # loop and dual; not given: [1]
    alpha: list[float] | None = None  # dual only; not given: [0.5]
    gate_mode: list[str] = field(default_factory=list)  # dual only: e.g. [two_gates, convex, softmax, fixed]

    @property
    def ks(self) -> list[int]:
        return [1] if self.arch == "wide" or self.K is None else self.K

    @property
    def alphas(self) -> list[float | None]:
        return [None] if self.arch != "dual" else [0.5] if self.alpha is None else self.alpha

    def validate(self) -> "ArmSpec":
        from ..model import GATE_MODES

        if self.arch not in ("wide", "loop", "dual"):
            raise ConfigError(f"sweep arm arch must be wide, loop or dual, got '{self.arch}'")
        if self.gate_mode and self.arch != "dual":
            raise ConfigError(f"sweep arm gate_mode applies to dual arms only, not '{self.arch}'")
        if self.K is not None and self.arch == "wide":
            raise ConfigError("sweep arm K applies to loop and dual arms, not wide")
        if self.alpha is not None and self.arch != "dual":
            raise ConfigError(f"sweep arm alpha applies to dual arms only, not '{self.arch}'")
        for name in ("K", "alpha", "gate_mode"):
            values = getattr(self, name)
            if values is not None and name != "gate_mode" and not values:
                raise ConfigError(f"sweep arm {self.arch}: {name} is an empty list (leave it out for the default)")
            if values and len(set(values)) != len(values):
                raise ConfigError(f"sweep arm {self.arch}: {name} lists a value twice: {values}")
        for mode in self.gate_mode:
            if mode not in GATE_MODES:
                raise ConfigError(f"sweep arm gate_mode must be one of {', '.join(GATE_MODES)}, got '{mode}'")
        if any(k < 1 for k in self.ks):
            raise ConfigError(f"sweep arm K values must be >= 1, got {self.K}")
        if any(not 0 < a < 1 for a in self.alphas if a is not None):
            raise ConfigError(f"sweep arm alpha values must be in (0, 1), got {self.alpha}")
        return self


@dataclass
class SyntheticDial:
    """One synthetic corpus per value of a SyntheticConfig field (`dial`), prepared by the sweep."""

    dial: str = ""  # e.g. recall_facts; "" = no dial: every run trains on base.data.path
    values: list[float] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # other SyntheticConfig fields, the same for every value
    vocab_size: int = 512
    max_tokens: int = 2_000_000
    eval_per_category: int = 200
    val_fraction: float = 0.02
    capacity_category: str = "recall"  # the dose-response figure: accuracy of this category against the dial
    compute_category: str = "chain"  # ... and of this one against its own per-example dial (chain steps)

    def config_for(self, value: float):
        """The SyntheticConfig of one dial value (validated)."""
        from ..config import apply_overrides
        from ..data.synthetic import SyntheticConfig

        cfg = from_dict(SyntheticConfig, dict(self.settings), prefix="synthetic.settings.")
        apply_overrides(cfg, [f"{self.dial}={value:g}"])
        return cfg.validate()

    def validate(self) -> "SyntheticDial":
        if not self.dial:
            return self
        if not self.values or len(set(self.values)) != len(self.values):
            raise ConfigError(f"synthetic.values must list distinct values of {self.dial}, got {self.values}")
        for v in self.values:
            self.config_for(v)
        if self.vocab_size < 257 or self.max_tokens < 1 or self.eval_per_category < 1:
            raise ConfigError("synthetic.vocab_size must be >= 257, max_tokens and eval_per_category >= 1")
        return self


@dataclass
class SweepConfig:
    name: str = "sweep"
    out_dir: str = "runs/sweep"
    base: RunConfig = field(default_factory=RunConfig)  # backbone, data, optimiser, trainer settings
    budgets: list[float] = field(default_factory=lambda: [80e6])  # per-layer F_M
    match: str = "paper"  # paper | true (solve on true FLOPs at base.model.seq_len)
    multiple: int = 64
    build_multiple: int = 256
    tokens: list[int] = field(default_factory=lambda: [0])  # training tokens per budget (see protocol)
    protocol: str = "flops"  # tokens: every arm the same tokens | flops: every arm of a budget the same FLOPs
    synthetic: SyntheticDial = field(default_factory=SyntheticDial)
    arms: list[ArmSpec] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    evals: list[str] = field(default_factory=list)  # prepared folders, .txt files, Q/A .jsonl files
    eval_limit: int = 0  # windows / examples per eval set (0: all)
    assumed_mfu: float = 0.5  # for --dry-run's wall-time estimate only

    def validate(self) -> "SweepConfig":
        if not self.arms:
            raise ConfigError("sweep.arms is empty")
        for name in ("budgets", "seeds", "tokens"):
            values = getattr(self, name)
            if not values:
                raise ConfigError(f"sweep.{name} is empty: the sweep would run nothing")
            if name != "tokens" and len(set(values)) != len(values):
                raise ConfigError(f"sweep.{name} lists a value twice: {values}")
        if min(self.budgets) <= 0:
            raise ConfigError(f"sweep.budgets must be > 0, got {self.budgets}")
        if min(self.seeds) < 0:
            raise ConfigError(f"sweep.seeds must be >= 0, got {self.seeds}")
        if self.eval_limit < 0:
            raise ConfigError(f"sweep.eval_limit must be >= 0 (0: all), got {self.eval_limit}")
        if self.match not in ("paper", "true"):
            raise ConfigError(f"sweep.match must be paper or true, got '{self.match}'")
        if self.protocol not in ("tokens", "flops"):
            raise ConfigError(f"sweep.protocol must be tokens or flops, got '{self.protocol}'")
        if self.protocol == "tokens" and len(set(self.tokens)) > 1:
            raise ConfigError("sweep.protocol=tokens gives every budget the same tokens: give one token count")
        if len(self.tokens) not in (1, len(self.budgets)) or min(self.tokens) < 1:
            raise ConfigError("sweep.tokens needs one positive token count, or one per budget")
        for a in self.arms:
            a.validate()
        arms = [(a.arch, tuple(a.ks), tuple(a.alphas), tuple(a.gate_mode)) for a in self.arms]
        if len(set(arms)) != len(arms):
            raise ConfigError("sweep.arms lists the same arm twice")
        check_writable_dir(self.out_dir, "sweep.out_dir")
        return self


@dataclass
class Run:
    budget: float
    arch: str
    K: int
    alpha: float | None
    seed: int
    config: RunConfig
    params: int
    flops_per_token: float  # true forward
    target_flops: float  # true training FLOPs of the whole run
    tokens: int = 0  # training tokens of the run
    wide_flops_per_token: float = 0.0  # its budget's PureWide, true forward
    dial_value: float | None = None  # the synthetic dial's value, when the sweep has one
    data_dir: str = ""  # the synthetic corpus of that value
    gate_mode: str | None = None  # set when the arm lists gate modes (the gate-mode ablation)

    @property
    def flops_ratio(self) -> float:
        """True FLOPs per token relative to the budget's PureWide."""
        return self.flops_per_token / self.wide_flops_per_token if self.wide_flops_per_token else math.nan

    @property
    def arm(self) -> str:
        if self.arch == "wide":
            return "PureWide"
        if self.arch == "loop":
            return f"PureLoop K={self.K}"
        return f"Dual K={self.K} α={self.alpha}" + (f" {self.gate_mode}" if self.gate_mode else "")

    @property
    def folder(self) -> str:
        tag = {"wide": "wide", "loop": f"loop_K{self.K}", "dual": f"dual_K{self.K}_a{self.alpha}"}[self.arch]
        tag += f"_{self.gate_mode}" if self.gate_mode else ""
        dial = f"{Path(self.data_dir).name}/" if self.dial_value is not None else ""
        return f"{dial}F{self.budget:.3g}/{tag}/seed{self.seed}"


def load_sweep(path: str | Path, overrides=()) -> SweepConfig:
    cfg = from_dict(SweepConfig, load_yaml(path))
    apply_overrides(cfg, list(overrides))
    m = cfg.base.model  # the solver sets the widths of every run; the backbone needs none
    m.d_ffn_deep, m.d_ffn_wide = m.d_ffn_deep or 1, m.d_ffn_wide or 1
    return validate_tree(cfg)


def dial_data_dir(sweep: SweepConfig, value: float) -> Path:
    return Path(sweep.out_dir) / "data" / f"{sweep.synthetic.dial}={value:g}"


def plan(sweep: SweepConfig) -> list[Run]:
    """The grid, with widths from the solver and each run's tokens and total FLOPs (see `protocol`)."""
    from ..solver import solve

    backbone = sweep.base.model
    T = sweep.base.data.seq_len or backbone.seq_len
    dial_values = sweep.synthetic.values if sweep.synthetic.dial else [None]
    runs, floored = [], {}
    for value in dial_values:
        data = dataclasses.replace(sweep.base.data)
        if value is not None:
            data.path = str(dial_data_dir(sweep, value))
        for b, budget in enumerate(sweep.budgets):
            tokens = sweep.tokens[b] if len(sweep.tokens) > 1 else sweep.tokens[0]
            kw = dict(multiple=sweep.multiple, build_multiple=sweep.build_multiple, match=sweep.match, seq_len=T)
            wide_fpt = solve(backbone, budget, "wide", **kw)["config"].meta_model().flops_per_token(T, "true")
            for arm in sweep.arms:
                ks, alphas = arm.ks, arm.alphas
                modes = arm.gate_mode or [None]
                for K, alpha, mode, seed in itertools.product(ks, alphas, modes, sweep.seeds):
                    r = solve(backbone, budget, arm.arch, K=K, alpha=alpha or 0.5, **kw)
                    if r["mismatch"] > SOLVER_OVER_WARN:
                        floored[(budget, arm.arch, K, alpha)] = r["mismatch"]
                    if mode is not None:  # the gate's own FLOPs differ by a few per token between modes
                        r["config"] = dataclasses.replace(r["config"], gate_mode=mode).validate()
                    fpt = r["config"].meta_model().flops_per_token(T, "true")
                    horizon = (dict(tokens=tokens, target_flops=0.0) if sweep.protocol == "tokens"
                               else dict(tokens=0, target_flops=tokens * 3 * wide_fpt))
                    cfg = RunConfig(model=r["config"], data=dataclasses.replace(data),
                                    optim=dataclasses.replace(sweep.base.optim),
                                    train=dataclasses.replace(sweep.base.train, seed=seed, steps=0, resume="auto",
                                                              **horizon))
                    run_tokens = tokens if sweep.protocol == "tokens" else tokens * wide_fpt / fpt
                    runs.append(Run(budget, arm.arch, K, alpha, seed, cfg, r["params"], fpt,
                                    3 * fpt * run_tokens, int(run_tokens), wide_fpt, value,
                                    data.path if value is not None else "", mode))
    for r in runs:
        r.config.train.out_dir = str(Path(sweep.out_dir) / r.folder)
    check_plan(runs)
    for (budget, arch, K, alpha), over in floored.items():
        warn(f"{arch} K={K}" + (f" α={alpha}" if alpha is not None else "") + f" at {budget:.3g}: the solver's "
             f"smallest widths are {over:+.0%} over the budget ({sweep.match} FLOPs per layer); not FLOP-matched")
    return runs


SOLVER_OVER_WARN = 0.10  # a solver result this far over its budget (at its smallest widths) gets a warning


def check_plan(runs: list[Run]) -> None:
    """ConfigError for a grid that cannot run as planned: two runs in one folder (duplicate arms or seeds, or
    budgets that print alike), or a run shorter than its warmup."""
    seen: dict[str, Run] = {}
    for r in runs:
        other = seen.setdefault(r.folder, r)
        if other is not r:
            raise ConfigError(f"two runs of the sweep map to one folder {r.folder} ({other.arm} at budget "
                              f"{other.budget!r} and {r.arm} at {r.budget!r}): make budgets, arms and seeds distinct")
        c = r.config
        steps = math.ceil(r.tokens / (c.data.batch_size * c.train.grad_accum * (c.data.seq_len or c.model.seq_len)))
        if c.optim.warmup_steps > steps:
            raise ConfigError(f"base.optim.warmup_steps={c.optim.warmup_steps} is longer than run {r.folder} "
                              f"({steps} steps)")


def prepare_dial_data(sweep: SweepConfig, log=print) -> None:
    """The synthetic corpus of every dial value that is not prepared yet (each written atomically)."""
    from ..data.prepare import prepare

    for value in sweep.synthetic.values if sweep.synthetic.dial else []:
        out = dial_data_dir(sweep, value)
        if (out / "meta.json").is_file():
            continue
        s = sweep.synthetic
        log(f"preparing {out} ({s.dial}={value:g}, {s.max_tokens:,} tokens)")
        prepare(["synthetic"], out, vocab_size=s.vocab_size, max_tokens=s.max_tokens, val_fraction=s.val_fraction,
                synthetic=s.config_for(value), synthetic_eval_per_category=s.eval_per_category, progress=False,
                seed=0)


def read_metrics(folder: Path) -> tuple[dict | None, int, float | None]:
    """(the last start record, the last step, the last tokens/s) of a run's metrics.jsonl; (None, 0, None)
    before it has one."""
    start, step, rate = None, 0, None
    try:
        lines = (folder / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return start, step, rate
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a crash
            continue
        if rec.get("event") == "start":
            start = rec
        step = max(step, int(rec.get("step", 0)))
        rate = rec.get("tokens_per_s", rate)
    return start, step, rate


def throughput(sweep: SweepConfig, runs: list[Run], device_kind: str | None = None) -> tuple[float, str]:
    """(training FLOP/s of one run, where it comes from) on the device kind the sweep targets (device_kind: cpu
    or a GPU name of perf.GPU_PEAKS; default: base.train.device, `auto` being this machine's): measured by the
    sweep's own runs on that kind when some have logged steps, else the GPU's spec-sheet peak or this machine's
    measured GEMM peak, times assumed_mfu."""
    import statistics

    import torch

    from ..perf import GPU_PEAKS, measure_gemm_peak

    device = sweep.base.train.device
    if device_kind is not None:
        kind = device_kind
    elif device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        kind = torch.cuda.get_device_name() if torch.cuda.is_available() else "H100"
    else:
        kind = "cpu"
    gpu = kind != "cpu"
    measured = []
    for r in runs:  # achieved FLOP/s = tokens/s x training FLOPs per token, from the runs' own logs
        start, _, rate = read_metrics(Path(r.config.train.out_dir))
        if start and rate and str(start.get("device", "")).startswith("cuda") == gpu and \
                (not gpu or kind in str(start.get("peak_source", kind))):
            measured.append(rate * start["train_flops_per_token"])
    if measured:
        return statistics.median(measured), f"measured by {len(measured)} run(s) of this sweep on {kind}"
    if gpu:
        peak = next((v for k, v in GPU_PEAKS.items() if k.lower() in kind.lower()), None)
        if peak is None:
            raise ConfigError(f"--device-kind must be cpu or one of {', '.join(GPU_PEAKS)}, got '{kind}'")
        return peak * sweep.assumed_mfu, f"MFU {sweep.assumed_mfu} of {kind}'s bf16 spec-sheet peak " \
                                         f"({peak / 1e12:.0f} TFLOP/s)"
    peak = measure_gemm_peak("cpu", seconds=0.3)
    return peak * sweep.assumed_mfu, f"MFU {sweep.assumed_mfu} of a measured {peak / 1e9:.0f} GFLOP/s GEMM peak " \
                                     "on this machine's CPU"


def dry_run(sweep: SweepConfig, runs: list[Run], device_kind: str | None = None, processes: int = 1) -> str:
    """The grid with each run's cost and state, and the wall time of what is left to train, at the throughput
    of the target device kind (see `throughput`) times the processes (GPUs) of one run."""
    from ..checkpoint import find_latest

    rate, source = throughput(sweep, runs, device_kind)
    lines = [f"protocol: {sweep.protocol} (" + ("every arm the same tokens" if sweep.protocol == "tokens" else
                                                "every arm of a budget the same total FLOPs") + ")", "",
             "| dial | budget | arm | seed | params | true FLOPs/token (fwd) | vs PureWide | tokens | train FLOPs | "
             "est. minutes | state |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    total = left = 0.0
    done = 0
    for r in runs:
        minutes = r.target_flops / (rate * processes) / 60
        folder = Path(r.config.train.out_dir)
        ckpt = find_latest(folder)
        state = "done" if (folder / "eval.json").is_file() else f"checkpoint {ckpt.name}" if ckpt else "to train"
        total += minutes
        done += state == "done"
        left += 0 if state == "done" else minutes
        dial = f"{sweep.synthetic.dial}={r.dial_value:g}" if r.dial_value is not None else "–"
        lines.append(f"| {dial} | {r.budget:.3g} | {r.arm} | {r.seed} | {r.params / 1e6:.2f}M | "
                     f"{r.flops_per_token / 1e6:.2f}M | {r.flops_ratio - 1:+.1%} | {r.tokens:,} | "
                     f"{r.target_flops:.3g} | {minutes:.1f} | {state} |")
    lines.append("")
    off = mismatches(runs)
    lines.append(f"arms outside ±{MISMATCH_TOLERANCE:.1%} of PureWide's true FLOPs per token: "
                 + ("; ".join(off) if off else "none"))
    # --jobs share this machine's cores, so they do not shorten a compute-bound sweep
    lines.append(f"{len(runs)} runs, {done} done; estimated wall time {total / 60:.1f} h in all, {left / 60:.1f} h "
                 f"left, one run at a time, each on {processes} process(es) at {rate / 1e12:.3g} TFLOP/s: {source}")
    return "\n".join(lines)


def check_run_folders(runs: list[Run]) -> None:
    """A folder trained under another config would be skipped as finished, or resumed, as if it were this run:
    refuse it. Keys the stored run.yaml lacks are fields an older version did not have."""
    from ..train import RESUME_IGNORED
    for r in runs:
        path = Path(r.config.train.out_dir) / "run.yaml"
        if not path.is_file():
            continue
        try:
            stored = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            stored = None
        if not isinstance(stored, dict):
            raise ConfigError(f"{path} is not a run config; remove the folder to train this run again")
        planned = to_dict(r.config)
        # what a resume never compares either: the folder however its path is spelled, compiling
        for key in RESUME_IGNORED:
            section, name = key.split(".")
            if isinstance(stored.get(section), dict) and name in stored[section]:
                planned[section][name] = stored[section][name]
        diff = _first_difference(stored, planned)
        if diff:
            raise ConfigError(f"{path} was trained under another config ({diff}); "
                              "use another out_dir, or remove the folder to train it again")


def _first_difference(stored: dict, planned: dict, prefix: str = "") -> str | None:
    for key, value in stored.items():
        if key not in planned:
            return f"{prefix}{key} is no longer a setting"
        want = planned[key]
        if isinstance(value, dict) and isinstance(want, dict):
            diff = _first_difference(value, want, f"{prefix}{key}.")
            if diff:
                return diff
        elif value != want:
            return f"{prefix}{key}: {value!r} there, {want!r} here"
    return None


JOB_RECORD = "job.json"  # in a run folder: how the run was launched (read by `sweep --status`)


def run_command(run: Run, sweep: SweepConfig) -> list[str] | None:
    """The command that trains and evaluates one run (its run.yaml written first); None when it is done."""
    folder = Path(run.config.train.out_dir)
    if (folder / "eval.json").is_file():
        return None
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / "run.yaml"
    atomic_write_text(cfg_path, yaml.safe_dump(to_dict(run.config), sort_keys=False))
    evals = sweep.evals + ([run.data_dir] if run.dial_value is not None else [])
    return [sys.executable, "-m", "dualpath", "sweep", str(cfg_path), "--run-one"] + [
        f"--eval={e}" for e in evals] + [f"--eval-limit={sweep.eval_limit}"]


def record_job(folder: str | Path, **record) -> None:
    from ..fileio import atomic_write_text

    atomic_write_text(Path(folder) / JOB_RECORD, json.dumps({**record, "submitted": time.time()}))


def _run_one(run: Run, sweep: SweepConfig, threads: int | None) -> subprocess.Popen | None:
    cmd = run_command(run, sweep)
    if cmd is None:
        return None
    folder = Path(run.config.train.out_dir)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log = open(folder / "run.log", "a")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    record_job(folder, launcher="local", pid=proc.pid, host=socket.gethostname())
    return proc


def train_and_eval(cfg_path: str, evals: list[str], eval_limit: int) -> None:
    """One run of a sweep (a child process): train to the target, then evaluate on every eval set."""
    from ..config import load_config
    from ..train import train

    cfg = load_config(RunConfig, cfg_path)
    cfg.train.progress = False
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 evaluates
        train(cfg)
        return
    # held over training and evaluation, so another sweep process skips this run until eval.json exists; a
    # requeued Slurm job may start while its preempted process is still exiting, hence the wait
    lock = FolderLock(cfg.train.out_dir, JOB_LOCK).acquire(wait=120)
    try:
        _train_and_eval(cfg, evals, eval_limit)
    finally:
        lock.release()


def _train_and_eval(cfg: RunConfig, evals: list[str], eval_limit: int) -> None:
    from ..checkpoint import atomic_write_text, load_model
    from ..eval.evaluate import evaluate_datasets, load_tokenizer
    from ..train import train

    summary = train(cfg)
    model, _, ckpt = load_model(cfg.train.out_dir)
    result = {"summary": summary}
    if evals:
        # Q/A sets report the answer loss; greedy accuracy is measured on the synthetic examples only
        res = evaluate_datasets(model, load_tokenizer(ckpt), evals, limit=eval_limit or None, qa_exact_match=False)
        result["eval"] = res["variants"][next(iter(res["variants"]))]
    atomic_write_text(Path(cfg.train.out_dir) / "eval.json", json.dumps(result, indent=2))


JOB_LOCK = ".job.lock"  # a sweep run's whole job (training and evaluation); the trainer's own lock is .lock


def run_order(runs: list[Run], seeds: list[int]) -> list[Run]:
    """Budget by budget (in the order given), seed by seed within a budget, and in each budget last the arms the
    solver could not bring within MISMATCH_TOLERANCE of its PureWide's FLOPs per token: a sweep cut off part-way
    has its first budget complete for its first seeds."""
    budgets = list(dict.fromkeys(r.budget for r in runs))
    return sorted(runs, key=lambda r: (budgets.index(r.budget), r.flops_ratio > 1 + MISMATCH_TOLERANCE,
                                       seeds.index(r.seed)))


MISMATCH_TOLERANCE = 0.025  # an arm farther than this from its PureWide's true FLOPs per token is listed


def mismatches(runs: list[Run]) -> list[str]:
    """One line per (budget, arm) whose true FLOPs per token lie outside ±MISMATCH_TOLERANCE of PureWide's."""
    out = {}
    for r in runs:
        off = r.flops_ratio - 1
        if abs(off) > MISMATCH_TOLERANCE:
            side = "over" if off > 0 else "under"
            out[(r.dial_value, r.budget, r.arm)] = f"{r.arm} at {r.budget:.3g}: {side} by {off:+.1%} (ratio {r.flops_ratio:.3f})"
    return list(out.values())


def run_sweep(sweep: SweepConfig, jobs: int = 1, log=print, threads: int = 0) -> list[dict]:
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    if threads < 0:
        raise ConfigError(f"--threads must be 0 (the cores over --jobs) or more, got {threads}")
    runs = plan(sweep)
    check_run_folders(runs)
    prepare_dial_data(sweep, log)
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    pending = run_order(runs, sweep.seeds)
    active: list[tuple[Run, subprocess.Popen]] = []
    failed = []
    while pending or active:
        while pending and len(active) < jobs:
            run = pending.pop(0)
            holder = FolderLock.holder(run.config.train.out_dir, JOB_LOCK)
            if holder:  # another sweep process (or a Slurm job) has it; not a failure
                log(f"running elsewhere ({holder}): {run.folder}")
                continue
            proc = _run_one(run, sweep, threads)
            if proc is None:
                log(f"done already: {run.folder}")
                continue
            log(f"started: {run.folder} ({run.arm}, {run.params / 1e6:.2f}M params)")
            active.append((run, proc))
        time.sleep(0.5)
        for run, proc in list(active):
            if proc.poll() is not None:
                active.remove((run, proc))
                if proc.returncode:
                    failed.append(run.folder)
                    log(f"FAILED ({proc.returncode}): {run.folder}; see {run.config.train.out_dir}/run.log")
                else:
                    log(f"finished: {run.folder}")
    rows = aggregate(sweep, runs)
    if failed:
        log(f"{len(failed)} run(s) failed; rerun the same command to resume them")
    return rows


def emit_configs(sweep: SweepConfig, folder: str | Path, source: str = "SWEEP.yaml") -> list[Path]:
    """Write one training config per (budget, arm) of the grid (seed 0), e.g. the paper's F80M/F160M runs."""
    folder = check_writable_dir(folder, "--emit-configs")
    written = []
    for r in plan(sweep):
        if r.seed != sweep.seeds[0]:
            continue
        path = folder / f"{r.folder.split('/seed')[0].replace('/', '_')}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        d = to_dict(r.config)
        d["train"]["out_dir"] = f"runs/paper/{path.stem}"
        header = (f"# {r.arm} at F_M = {r.budget:.3g} (paper FLOPs per layer): {r.params / 1e6:.0f}M params,\n"
                  f"# {r.flops_per_token / 1e9:.2f} GFLOPs/token true forward. Generated by\n"
                  f"# `dualpath sweep {source} --emit-configs {folder}`; widths from the iso-FLOP solver.\n")
        atomic_write_text(path, header + yaml.safe_dump(d, sort_keys=False))
        written.append(path)
    return written

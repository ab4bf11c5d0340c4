"""Sweep launchers beside the trainer, and the state of every run of a sweep.

    dualpath sweep SWEEP.yaml --launcher slurm [--slurm-partition P --slurm-gpus-per-node G --slurm-nodes N
                                                --slurm-time T --slurm-account A --slurm-extra key=value ...]
    dualpath sweep SWEEP.yaml --status

The Slurm launcher submits every run that is neither done nor queued as one job of a job array (submitit).
A job runs the same child command as the local pool (`dualpath sweep RUN.yaml --run-one`), under torchrun when
it has more than one GPU or node. On preemption or timeout Slurm signals the job; submitit's checkpoint hook
stops the child and requeues the job, and the run resumes from its own last checkpoint (`resume: auto`), so
the requeued run ends with the weights an uninterrupted one would have.

Each launched run leaves a record (job.json) in its folder; `--status` reads it, the scheduler's queue and
the run's metrics to say pending, running (step, ETA), done or failed (the last line of its log).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, DualPathError
from .sweep import JOB_RECORD, Run, SweepConfig, check_run_folders, plan, prepare_dial_data, read_metrics, \
    record_job, run_command, run_order

LAUNCHERS = ("local", "slurm")
NOT_STARTED = "not started"
_EXTRA_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def slurm_minutes(text: str) -> int:
    """Slurm's time formats (MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes."""
    m = _TIME.match(str(text).strip())
    if not m:
        raise ConfigError(f"--slurm-time must be minutes or [D-]HH:MM[:SS], got '{text}'")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if days is not None:  # D-HH | D-HH:MM | D-HH:MM:SS
        total = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif b is None:  # MINUTES
        total = a * 60
    elif c is None:  # MM:SS
        total = a * 60 + b
    else:  # HH:MM:SS
        total = a * 3600 + b * 60 + c
    minutes = -(-total // 60)
    if minutes < 1:
        raise ConfigError(f"--slurm-time must be at least one minute, got '{text}'")
    return minutes


@dataclass
class SlurmOptions:
    partition: str | None = None
    gpus_per_node: int = 0
    nodes: int = 1
    time: str = "24:00:00"
    account: str | None = None
    extra: list[str] = field(default_factory=list)  # key=value, written as `#SBATCH --key=value`

    def validate(self) -> "SlurmOptions":
        if self.nodes < 1:
            raise ConfigError(f"--slurm-nodes must be at least 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise ConfigError(f"--slurm-gpus-per-node must be 0 or more, got {self.gpus_per_node}")
        slurm_minutes(self.time)
        self.extra_parameters()
        return self

    def extra_parameters(self) -> dict[str, str]:
        out = {}
        for item in self.extra:
            key, sep, value = item.partition("=")
            key = key.strip().lstrip("-")
            if not sep or not _EXTRA_KEY.match(key) or not value:
                raise ConfigError(f"--slurm-extra takes key=value (an sbatch option), got '{item}'")
            out[key.replace("-", "_")] = value
        return out

    @property
    def processes(self) -> int:
        """Training processes of one run: one per GPU on every node (one on a CPU node)."""
        return self.nodes * max(1, self.gpus_per_node)


def torchrun_command(command: list[str], nnodes: int, node_rank: int, nproc_per_node: int, master_addr: str,
                     master_port: int) -> list[str]:
    """`python -m dualpath ...` as the same module under torchrun (static rendezvous at the job's first node)."""
    if command[1:2] != ["-m"]:
        raise ValueError(f"expected a `python -m MODULE` command, got {command[:3]}")
    return [command[0], "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node_rank={node_rank}",
            f"--nproc_per_node={nproc_per_node}", f"--master_addr={master_addr}", f"--master_port={master_port}",
            *command[1:]]


def _ignore_preemption_signal() -> None:
    # Slurm signals every process of the job; only submitit's handler (in the job's own process) acts on it
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class RunJob:
    """One run as a submitit job: the run's child command (under torchrun for several processes), and a
    checkpoint hook that stops it and requeues the job; the run resumes from its own checkpoint folder."""

    def __init__(self, command: list[str], folder: str, threads: int, gpus_per_node: int, nodes: int):
        self.command, self.folder, self.threads = command, folder, threads
        self.gpus_per_node, self.nodes = gpus_per_node, nodes
        self._proc = None

    def __getstate__(self):  # the running child stays behind when submitit pickles the job for its requeue
        return {k: v for k, v in self.__dict__.items() if k != "_proc"}

    def __setstate__(self, state):
        self.__dict__.update(state, _proc=None)

    def __call__(self) -> str:
        import submitit

        env = dict(os.environ)
        procs = max(1, self.gpus_per_node)
        threads = self.threads or int(env.get("SLURM_CPUS_PER_TASK", "0")) // procs
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        cmd, log_name = self.command, "run.log"
        if self.nodes * procs > 1:
            job = submitit.JobEnvironment()
            port = 20000 + int(re.sub(r"\D", "", str(job.job_id))[-4:] or 0)
            cmd = torchrun_command(cmd, job.num_nodes, job.node, procs, job.hostnames[0], port)
            log_name = "run.log" if job.node == 0 else f"run.node{job.node}.log"
        with open(Path(self.folder) / log_name, "a") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          preexec_fn=_ignore_preemption_signal)
            rc = self._proc.wait()
        if rc:
            raise RuntimeError(f"{self.folder}: exit code {rc}: {last_error_line(Path(self.folder) / log_name)}")
        return self.folder

    def checkpoint(self, *args, **kwargs):
        from submitit.helpers import DelayedSubmission

        # this runs in a signal handler that may have interrupted `wait()` on the child (which then holds the
        # child's lock): signal it without waiting; Slurm's requeue ends whatever is left of the job
        if self._proc is not None:
            self._proc.send_signal(signal.SIGTERM)
        return DelayedSubmission(RunJob(self.command, self.folder, self.threads, self.gpus_per_node, self.nodes))


def submit_slurm(sweep: SweepConfig, options: SlurmOptions, threads: int = 0, log=print) -> list[str]:
    """Submit every run that is neither done nor already queued, as one job array; returns the job ids."""
    options.validate()
    if threads < 0:
        raise ConfigError(f"--threads must be 0 (the job's CPUs) or more, got {threads}")
    if shutil.which("sbatch") is None:
        raise ConfigError("--launcher slurm needs Slurm's sbatch on PATH (run it on a login node of the cluster)")
    import submitit

    runs = plan(sweep)
    check_run_folders(runs)
    states = {s["folder"]: s for s in run_states(runs)}
    todo = [r for r in run_order(runs, sweep.seeds) if not _in_flight(states[r.folder])
            and states[r.folder]["state"] in ("pending", "failed")]  # a failed run resumes from its checkpoint
    if not todo:
        log("nothing to submit: every run is done or queued")
        return []
    prepare_dial_data(sweep, log)
    executor = submitit.SlurmExecutor(folder=Path(sweep.out_dir) / "slurm", max_num_timeout=10)
    extra = options.extra_parameters()
    params = dict(job_name=sweep.name, nodes=options.nodes, ntasks_per_node=1, time=slurm_minutes(options.time),
                  signal_delay_s=120, array_parallelism=len(todo), partition=options.partition,
                  account=options.account, gpus_per_node=options.gpus_per_node or None,
                  cpus_per_task=threads * max(1, options.gpus_per_node) if threads else None)
    params = {k: v for k, v in params.items() if v is not None and k not in extra}
    executor.update_parameters(**params, additional_parameters={"requeue": True, **extra})
    jobs = []
    slurm_dir = Path(sweep.out_dir) / "slurm"
    before = set(slurm_dir.rglob("*")) if slurm_dir.is_dir() else set()
    try:
        with executor.batch():
            for r in todo:
                jobs.append(executor.submit(RunJob(run_command(r, sweep), r.config.train.out_dir, threads,
                                                   options.gpus_per_node, options.nodes)))
    except submitit.core.utils.FailedJobError as e:  # sbatch refused: no controller, a bad partition, ...
        for p in sorted(set(slurm_dir.rglob("*")) - before, reverse=True):  # the submission's own files
            p.rmdir() if p.is_dir() else p.unlink()
        text = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        lines = ([ln for ln in text if "fatal" in ln.lower()] or [ln for ln in text if "error" in ln.lower()]
                 or text or ["no message"])
        raise DualPathError(f"sbatch refused the sweep's job array: {lines[-1]}") from None
    for r, job in zip(todo, jobs):
        record_job(r.config.train.out_dir, launcher="slurm", job_id=str(job.job_id), stderr=str(job.paths.stderr))
        log(f"submitted: {r.folder} as Slurm job {job.job_id}")
    return [str(j.job_id) for j in jobs]


# ----------------------------------------------------------------------------------------------
# The state of every run


def _record(run: Run) -> dict | None:
    path = Path(run.config.train.out_dir) / JOB_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def scheduler_states(job_ids: list[str]) -> dict[str, str] | None:
    """Slurm state (PENDING, RUNNING, ...) of each listed job still in the queue; None without squeue."""
    if not job_ids:
        return {}
    if shutil.which("squeue") is None:
        return None
    proc = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(job_ids)], capture_output=True,
                          text=True)
    if proc.returncode and "Invalid job id" not in proc.stderr:
        return None
    states = {}
    for line in proc.stdout.splitlines():
        job, _, state = line.strip().partition("|")
        states[job] = state
    return states


def last_error_line(path: Path) -> str:
    """The last non-blank line of a log (an error message or a traceback's exception line)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return next((ln.strip() for ln in reversed(lines) if ln.strip()), "")


def progress(folder: Path) -> str:
    """'step S/T, ETA ...' from a run's metrics.jsonl."""
    if not (folder / "metrics.jsonl").is_file():
        return "starting"
    start, step, rate = read_metrics(folder)
    total, tokens_per_step = (start or {}).get("total_steps", 0), (start or {}).get("tokens_per_step", 0)
    if total and step >= total:
        return f"step {step}/{total}, evaluating"
    if not (total and rate):
        return f"step {step}/{total or '?'}"
    return f"step {step}/{total}, ETA {_duration((total - step) * tokens_per_step / rate)}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_states(runs: list[Run]) -> list[dict]:
    """{folder, arm, budget, seed, state, detail} of every run: state is pending, running, done or failed."""
    records = {r.folder: _record(r) for r in runs}
    slurm_ids = [str(rec["job_id"]) for rec in records.values() if rec and rec.get("launcher") == "slurm"]
    queue = scheduler_states(slurm_ids)
    out = []
    for r in runs:
        folder = Path(r.config.train.out_dir)
        rec = records[r.folder]
        state, detail = "pending", NOT_STARTED
        if (folder / "eval.json").is_file():
            state, detail = "done", ""
        elif rec and rec.get("launcher") == "slurm":
            job = str(rec["job_id"])
            if queue is None:
                state, detail = "unknown", f"Slurm job {job}: squeue is not available here"
            elif job in queue:
                running = queue[job] in ("RUNNING", "COMPLETING")
                state = "running" if running else "pending"
                detail = f"Slurm job {job}: " + (progress(folder) if running else queue[job].lower())
            else:
                line = last_error_line(folder / "run.log") or last_error_line(Path(rec.get("stderr", "")))
                state, detail = "failed", f"Slurm job {job}: {line or 'left the queue without eval.json'}"
        elif rec and rec.get("launcher") == "local":
            if rec.get("host") == socket.gethostname() and _alive(int(rec.get("pid", 0))):
                state, detail = "running", progress(folder)
            else:
                state, detail = "failed", last_error_line(folder / "run.log") or "stopped without eval.json"
        out.append({"folder": r.folder, "arm": r.arm, "budget": r.budget, "seed": r.seed, "state": state,
                    "detail": detail})
    return out


def status_table(runs: list[Run]) -> str:
    states = run_states(runs)
    lines = ["| run | arm | seed | state | detail |", "|---|---|---|---|---|"]
    lines += [f"| {s['folder']} | {s['arm']} | {s['seed']} | {s['state']} | {s['detail']} |" for s in states]
    counts = {k: sum(s["state"] == k for s in states) for k in ("done", "running", "pending", "failed", "unknown")}
    lines += ["", ", ".join(f"{n} {k}" for k, n in counts.items() if n or k != "unknown")]
    return "\n".join(lines)


def _in_flight(state: dict) -> bool:
    """Running, or queued by a launcher (not merely planned)."""
    return state["state"] == "running" or (state["state"] == "pending" and state["detail"] != NOT_STARTED)


def wait(runs: list[Run], poll_s: float = 10.0, log=print) -> list[dict]:
    """Block until no run is queued or running (e.g. after a submission); returns the final states."""
    last = None
    while True:
        states = run_states(runs)
        summary = ", ".join(f"{sum(s['state'] == k for s in states)} {k}"
                            for k in ("done", "running", "pending", "failed"))
        if summary != last:
            log(summary)
            last = summary
        if not any(_in_flight(s) for s in states):
            return states
        time.sleep(poll_s)


__all__ = ["LAUNCHERS", "RunJob", "SlurmOptions", "last_error_line", "run_states", "scheduler_states",
           "slurm_minutes", "status_table", "submit_slurm", "torchrun_command", "wait"]

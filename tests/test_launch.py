"""Sweep launchers: the Slurm launcher against a real single-node Slurm started here (slurmctld, slurmd, munged;
`.ci/run` installs Debian's slurm-wlm and munge where they are missing), and `sweep --status`."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from dualpath.cli import main
from dualpath.experiments.launch import SlurmOptions, slurm_minutes, torchrun_command
from dualpath.experiments.sweep import JOB_LOCK, load_sweep, plan
from dualpath.fileio import FolderLock

from test_sweep import _sweep_file, data_dir  # noqa: F401 (the prepared corpus fixture)

SLURM_BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "scontrol", "scancel")
SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])  # the daemons live there


def _tiny(tmp_path, data_dir, name):  # noqa: F811
    """Two runs (PureWide and Dual, seed 0) of 256 steps with a checkpoint every 32."""
    path = _sweep_file(tmp_path, data_dir, budgets=[2.0e5], seeds=[0], tokens=[32768], protocol="tokens",
                       out_dir=str(tmp_path / name), evals=[], eval_limit=0)
    cfg = yaml.safe_load(path.read_text())
    cfg["base"]["train"].update(save_every=32, keep_last=20)
    out = tmp_path / f"{name}.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


# ----------------------------------------------------------------------------------------------
# Without a scheduler


def test_slurm_time_formats():
    assert [slurm_minutes(t) for t in ("90", "30:30", "02:00:00", "1-00", "1-02:30", "0-00:00:30")] == \
        [90, 31, 120, 1440, 1590, 1]
    with pytest.raises(Exception, match="--slurm-time"):
        slurm_minutes("soon")


def test_torchrun_inside_a_multi_node_job():
    cmd = ["/venv/bin/python", "-m", "dualpath", "sweep", "run.yaml", "--run-one"]
    assert torchrun_command(cmd, nnodes=2, node_rank=1, nproc_per_node=8, master_addr="gpu01", master_port=29500) == [
        "/venv/bin/python", "-m", "torch.distributed.run", "--nnodes=2", "--node_rank=1", "--nproc_per_node=8",
        "--master_addr=gpu01", "--master_port=29500", "-m", "dualpath", "sweep", "run.yaml", "--run-one"]
    assert SlurmOptions(nodes=2, gpus_per_node=8).processes == 16 and SlurmOptions().processes == 1
    assert SlurmOptions(extra=["qos=high", "--mail-type=END"]).extra_parameters() == {"qos": "high",
                                                                                      "mail_type": "END"}


@pytest.mark.parametrize("flags, message", [
    (["--slurm-time", "soon"], "--slurm-time must be"),
    (["--slurm-extra", "qos"], "--slurm-extra takes key=value"),
    (["--slurm-nodes", "0"], "--slurm-nodes must be at least 1"),
    (["--slurm-gpus-per-node", "-1"], "--slurm-gpus-per-node must be 0 or more"),
])
def test_bad_slurm_flags_fail_before_anything_is_written(tmp_path, data_dir, capsys, flags, message):  # noqa: F811
    path = _tiny(tmp_path, data_dir, "bad")
    assert main(["sweep", str(path), "--launcher", "slurm", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "bad").exists()


def test_slurm_launcher_without_sbatch_fails_clearly(tmp_path, data_dir, capsys, monkeypatch):  # noqa: F811
    path = _tiny(tmp_path, data_dir, "nosbatch")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(["sweep", str(path), "--launcher", "slurm"]) == 2
    assert "needs Slurm's sbatch on PATH" in capsys.readouterr().err
    assert not (tmp_path / "nosbatch").exists()


def test_status_of_local_runs(tmp_path, data_dir, capsys):  # noqa: F811
    path = _tiny(tmp_path, data_dir, "st")
    runs = plan(load_sweep(path))
    done, failed = (Path(r.config.train.out_dir) for r in runs)
    for folder in (done, failed):
        folder.mkdir(parents=True)
    (done / "eval.json").write_text("{}")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (failed / "job.json").write_text(json.dumps({"launcher": "local", "pid": dead.pid,
                                                 "host": socket.gethostname()}))
    (failed / "run.log").write_text("Traceback (most recent call last):\n  ...\nerror: data.path is missing\n\n")
    assert main(["sweep", str(path), "--status"]) == 0
    out = capsys.readouterr().out
    assert f"| {runs[0].folder} | PureWide | 0 | done |" in out
    assert f"| {runs[1].folder} | Dual K=2 α=0.5 | 0 | failed | error: data.path is missing |" in out
    # a live process whose metrics say where it is
    live = subprocess.Popen(["sleep", "30"])
    try:
        (failed / "job.json").write_text(json.dumps({"launcher": "local", "pid": live.pid,
                                                     "host": socket.gethostname()}))
        (failed / "metrics.jsonl").write_text(
            json.dumps({"step": 0, "event": "start", "total_steps": 256, "tokens_per_step": 128}) + "\n"
            + json.dumps({"step": 64, "loss": 3.0, "tokens_per_s": 1280.0}) + "\n")
        assert main(["sweep", str(path), "--status"]) == 0
        assert "| running | step 64/256, ETA 0m19s |" in capsys.readouterr().out
    finally:
        live.kill()
        live.wait()


# ----------------------------------------------------------------------------------------------
# A real single-node Slurm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(check, timeout: float, what: str, poll: float = 0.2):
    end = time.time() + timeout
    while time.time() < end:
        value = check()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _munge_works() -> bool:
    cred = subprocess.run(["munge", "-n"], capture_output=True)
    return cred.returncode == 0 and subprocess.run(["unmunge"], input=cred.stdout, capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """slurmctld + slurmd (and munged, unless one runs) on this machine, on free ports; SLURM_CONF points at
    them for the module's tests. Stopped by their PIDs afterwards."""
    missing = [b for b in SLURM_BINARIES if shutil.which(b, path=SBIN) is None]
    why = (f"Slurm is not installed ({', '.join(missing)} missing; .ci/run installs slurm-wlm and munge)"
           if missing else "starting Slurm's daemons needs root" if os.geteuid() != 0 else "")
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    root = tmp_path_factory.mktemp("slurm")
    pids = []
    if not _munge_works():
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run([shutil.which("munged", path=SBIN), "--force"], check=True, capture_output=True)
        pids.append(int(_wait_for(lambda: Path("/run/munge/munged.pid").is_file() and
                                  Path("/run/munge/munged.pid").read_text().strip(), 10, "munged")))
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=dualpathtest", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}", "AuthType=auth/munge",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "ReturnToService=2",
        f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmdSpoolDir={root}/slurmd", f"StateSaveLocation={root}/state", f"SlurmctldLogFile={root}/ctld.log",
        f"SlurmdLogFile={root}/d.log",
        f"NodeName={host} CPUs={os.cpu_count()} RealMemory=2000 State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([shutil.which(daemon, path=SBIN), "-f", str(conf)], check=True, capture_output=True)
            pids.append(int(_wait_for(lambda: (root / f"{daemon}.pid").is_file() and
                                      (root / f"{daemon}.pid").read_text().strip(), 30, daemon)))
        _wait_for(lambda: "idle" in subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True,
                                                   text=True).stdout, 60, "the node to be idle", poll=0.5)
        yield root
    finally:
        subprocess.run(["scancel", "--full", "-p", "debug"], capture_output=True)
        try:  # the jobs' step daemons report to slurmd before it stops
            _wait_for(lambda: not subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout.strip(),
                      60, "the cancelled jobs to end", poll=0.5)
        except AssertionError:
            pass
        for pid in reversed(pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if before is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = before


def _job(folder: Path) -> str:
    return json.loads((folder / "job.json").read_text())["job_id"]


def _queue_state(job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", job], capture_output=True, text=True).stdout
    return dict(ln.split("|") for ln in out.split()).get(job, "")


def _last_checkpoint(folder: Path) -> bytes:
    latest = (folder / "checkpoints" / "latest").read_text().strip()
    return (folder / "checkpoints" / latest / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_slurm_sweep_equals_local_and_resumes_after_preemption(tmp_path, data_dir, slurm, capsys):  # noqa: F811
    local, on_slurm = _tiny(tmp_path, data_dir, "local"), _tiny(tmp_path, data_dir, "slurm")
    assert main(["sweep", str(local), "--jobs", "2", "--threads", "1"]) == 0
    assert main(["sweep", str(on_slurm), "--launcher", "slurm", "--threads", "1", "--slurm-partition", "debug",
                 "--slurm-time", "30", "--slurm-extra", "job-name=dualpath-test"]) == 0
    out = capsys.readouterr().out
    assert out.count("as Slurm job") == 2
    runs = plan(load_sweep(on_slurm))
    wide, dual = (Path(r.config.train.out_dir) for r in runs)
    assert "#SBATCH --array=0-1%2" in (tmp_path / "slurm" / "slurm" / f"{_job(wide).split('_')[0]}_submission.sh"
                                      ).read_text()

    # preempt the Dual run mid-training: Slurm's preemption signal reaches submitit's checkpoint hook, which
    # stops the run and requeues its job
    # the run is paused at its first checkpoint so that the signal lands mid-training however fast the machine
    # is; a stopped process keeps the SIGTERM of the checkpoint hook pending until it is continued
    _wait_for(lambda: (dual / "checkpoints" / "latest").is_file(), 120, "the Dual run's first checkpoint", 0.01)
    child = int(FolderLock.holder(dual, JOB_LOCK).split()[1])
    os.kill(child, signal.SIGSTOP)
    assert main(["sweep", str(on_slurm), "--status"]) == 0
    status = capsys.readouterr().out
    assert f"| {runs[1].folder} | Dual K=2 α=0.5 | 0 | running | Slurm job {_job(dual)}: step " in status
    assert not (dual / "eval.json").is_file()
    subprocess.run(["scancel", "--signal=USR2", _job(dual)], check=True)
    _wait_for(lambda: _queue_state(_job(dual)) == "PENDING", 120, "the requeued job")
    with contextlib.suppress(ProcessLookupError):  # Slurm may have ended it already
        os.kill(child, signal.SIGCONT)  # its pending SIGTERM ends it
    subprocess.run(["scontrol", "update", f"JobId={_job(dual)}", "StartTime=now"], check=True)  # skip the delay

    # results of whatever is finished, while a job is still queued or running
    assert main(["sweep", str(on_slurm), "--aggregate-only"]) == 0
    capsys.readouterr()
    finished = sum((Path(r.config.train.out_dir) / "eval.json").is_file() for r in runs)
    results = tmp_path / "slurm" / "results.csv"
    assert finished < 2 and len(list(csv.DictReader(open(results))) if results.is_file() else []) == finished

    # nothing new is submitted while both are in flight; --wait waits for them and aggregates
    assert main(["sweep", str(on_slurm), "--launcher", "slurm", "--wait"]) == 0
    out = capsys.readouterr().out
    assert "as Slurm job" not in out and "| PureWide |" in out

    starts = [json.loads(ln) for ln in (dual / "metrics.jsonl").read_text().splitlines() if '"start"' in ln]
    assert starts[0]["resumed_from"] is None and starts[-1]["resumed_from"], "the Dual run was not resumed"
    for r in runs:  # the same weights and numbers as the local launcher's
        here, there = Path(r.config.train.out_dir), tmp_path / "local" / r.folder
        assert _last_checkpoint(here) == _last_checkpoint(there), r.folder
        assert json.loads((here / "eval.json").read_text())["summary"]["val_loss"] == \
            json.loads((there / "eval.json").read_text())["summary"]["val_loss"]
    rows = {name: list(csv.DictReader(open(tmp_path / name / "results.csv"))) for name in ("local", "slurm")}
    assert rows["local"] == rows["slurm"]
    assert main(["sweep", str(on_slurm), "--status"]) == 0
    assert "2 done, 0 running, 0 pending, 0 failed" in capsys.readouterr().out


def test_a_submission_sbatch_refuses_is_one_line_and_leaves_no_submission_files(tmp_path, data_dir, slurm,
                                                                                 capsys):  # noqa: F811
    path = _tiny(tmp_path, data_dir, "refused")
    assert main(["sweep", str(path), "--launcher", "slurm", "--slurm-partition", "nosuch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: sbatch refused the sweep's job array: ") and "partition" in err[-1].lower()
    assert not any("Traceback" in ln for ln in err)
    assert not [p for p in (tmp_path / "refused" / "slurm").rglob("*") if p.is_file()]
    assert not list((tmp_path / "refused").rglob("job.json"))


def test_status_of_a_slurm_job_that_left_the_queue(tmp_path, data_dir, slurm, capsys):  # noqa: F811
    path = _tiny(tmp_path, data_dir, "gone")
    folder = Path(plan(load_sweep(path))[0].config.train.out_dir)
    folder.mkdir(parents=True)
    (folder / "job.json").write_text(json.dumps({"launcher": "slurm", "job_id": "987654_0"}))
    (folder / "run.log").write_text("RuntimeError: CUDA out of memory\n")
    assert main(["sweep", str(path), "--status"]) == 0
    assert "| failed | Slurm job 987654_0: RuntimeError: CUDA out of memory |" in capsys.readouterr().out


def _estimated_hours(out: str) -> float:
    line = out.strip().splitlines()[-1]
    return float(line.split("estimated wall time ")[1].split(" h")[0])


def test_dry_run_estimates_gpu_configs_at_a_gpu_throughput(tmp_path, data_dir, capsys):  # noqa: F811
    from dualpath.perf import GPU_PEAKS

    path = _tiny(tmp_path, data_dir, "gpu")
    runs = plan(load_sweep(path))
    flops = sum(r.target_flops for r in runs)
    assert main(["sweep", str(path), "base.train.device=cuda", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "MFU 0.5 of H100's bf16 spec-sheet peak (989 TFLOP/s)" in out
    assert _estimated_hours(out) == pytest.approx(flops / (0.5 * GPU_PEAKS["H100"]) / 3600, abs=0.06)
    # eight GPUs per run on Slurm, another kind
    assert main(["sweep", str(path), "--dry-run", "--device-kind", "A100", "--launcher", "slurm",
                 "--slurm-gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert "each on 8 process(es) at 156 TFLOP/s: MFU 0.5 of A100's bf16 spec-sheet peak" in out
    assert main(["sweep", str(path), "--dry-run", "--device-kind", "TPU"]) == 2
    assert "--device-kind must be cpu or one of H100" in capsys.readouterr().err


def test_dry_run_uses_the_throughput_its_runs_measured(tmp_path, data_dir, capsys):  # noqa: F811
    path = _tiny(tmp_path, data_dir, "measured")
    runs = plan(load_sweep(path))
    folder = Path(runs[0].config.train.out_dir)
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text(
        json.dumps({"step": 0, "event": "start", "device": "cpu", "train_flops_per_token": 2.0e6,
                    "total_steps": 256, "tokens_per_step": 128}) + "\n"
        + json.dumps({"step": 4, "tokens_per_s": 5000.0}) + "\n")
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "at 0.01 TFLOP/s: measured by 1 run(s) of this sweep on cpu" in out
    expected_minutes = runs[1].target_flops / 1e10 / 60
    assert f"| {expected_minutes:.1f} | to train |" in out

"""The iso-FLOP sweep on a tiny grid: matched FLOPs, resumable runs, aggregation."""

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml

from dualpath.cli import main
from dualpath.errors import ConfigError
from dualpath.experiments.sweep import load_sweep, plan, run_order
from dualpath.experiments.sweep_report import _paired, _paper_columns

from helpers import SHAKESPEARE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    if not SHAKESPEARE.is_file():
        pytest.skip("shared data missing")
    from dualpath.data.prepare import prepare

    root = tmp_path_factory.mktemp("sweepdata")
    src = root / "shakes.txt"
    src.write_text(SHAKESPEARE.read_text()[:150_000])
    prepare([str(src)], root / "data", vocab_size=320, val_fraction=0.1, progress=False)
    return root / "data"


def _sweep_file(tmp_path, data_dir, **extra):
    cfg = {
        "name": "tiny", "out_dir": str(tmp_path / "sweep"), "budgets": [2.0e5, 4.0e5], "match": "true",
        "multiple": 16, "build_multiple": 16, "tokens": [2048], "seeds": [0, 1],
        "arms": [{"arch": "wide"}, {"arch": "dual", "K": [2], "alpha": [0.5]}],
        "evals": [str(data_dir)], "eval_limit": 2,
        "base": {"model": {"vocab_size": 320, "d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1,
                           "seq_len": 32},
                 "data": {"path": str(data_dir), "batch_size": 4},
                 "optim": {"warmup_steps": 2},
                 "train": {"log_every": 4, "eval_every": 0, "save_every": 0, "eval_batches": 2,
                           "progress": False, "tensorboard": False}},
    }
    cfg.update(extra)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_plan_matches_total_flops_per_budget(tmp_path, data_dir):
    sweep = load_sweep(_sweep_file(tmp_path, data_dir))
    runs = plan(sweep)
    assert len(runs) == 2 * 2 * 2  # budgets x arms x seeds
    for budget in sweep.budgets:
        targets = {r.target_flops for r in runs if r.budget == budget}
        assert len(targets) == 1  # every run of a budget gets the same training FLOPs
        wide = next(r for r in runs if r.budget == budget and r.arch == "wide")
        assert targets == {2048 * 3 * wide.flops_per_token}
    assert len({r.config.train.out_dir for r in runs}) == len(runs)


def test_dry_run_prints_the_grid(tmp_path, data_dir, capsys):
    assert main(["sweep", str(_sweep_file(tmp_path, data_dir)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("| PureWide |") == 4 and out.count("| Dual K=2 α=0.5 |") == 4
    assert out.count("| to train |") == 8 and "8 runs, 0 done; estimated wall time" in out


def test_results_md_columns_are_the_papers_layout():
    keys = ["budget", "arm", "val_bpb", "mix/bpb", "mix/loss", "wikitext-2/test/bpb", "wikitext-2/test/loss",
            "gsm8k/test/bpb", "gsm8k/test/loss", "gsm8k/test/answer_loss", "synth:examples/bpb",
            "synth:examples/loss", "fact/bpb", "fact/acc", "arith/bpb", "arith/acc"]
    assert _paper_columns(keys) == {
        "val BPB": ("val_bpb",), "mix BPB": ("mix/bpb",), "wikitext-2/test BPB": ("wikitext-2/test/bpb",),
        "gsm8k/test BPB": ("gsm8k/test/bpb",), "gsm8k/test answer loss": ("gsm8k/test/answer_loss",),
        "fact BPB (acc)": ("fact/bpb", "fact/acc"), "arith BPB (acc)": ("arith/bpb", "arith/acc")}


def test_run_order_is_budget_then_seed_with_mismatched_arms_last():
    from dualpath.experiments.sweep import MISMATCH_TOLERANCE, mismatches

    sweep = load_sweep(ROOT / "configs/sweeps/cpu_paper_table.yaml")
    assert sweep.protocol == "tokens" and sweep.build_multiple == 16
    runs = plan(sweep)
    assert {r.tokens for r in runs} == {2_000_000}  # the paper's protocol: the same tokens for every arm and budget
    order = run_order(runs, sweep.seeds)
    assert sorted(r.folder for r in order) == sorted(r.folder for r in runs)
    budgets = [r.budget for r in order]
    assert budgets == sorted(budgets)  # the first budget complete before the second starts
    for budget in set(budgets):
        part = [r for r in order if r.budget == budget]
        over = [r.flops_ratio > 1 + MISMATCH_TOLERANCE for r in part]
        assert over == sorted(over)  # every matched run of the budget first
        cut = over.index(True) if True in over else len(part)
        for group in (part[:cut], part[cut:]):
            seeds = [r.seed for r in group]
            assert seeds == sorted(seeds)  # then seed by seed
    # the arms the solver floor leaves off PureWide's true FLOPs per token, each listed with its ratio
    listed = mismatches(runs)
    off = {(r.budget, r.arm) for r in runs if abs(r.flops_ratio - 1) > MISMATCH_TOLERANCE}
    assert len(listed) == len(off) and all(f"{arm} at {b:.3g}:" in " ".join(listed) for b, arm in off)
    assert {(b, arm) for b, arm in off if b == 3e6} >= {(3e6, "Dual K=4 α=0.25"), (3e6, "Dual K=3 α=0.25")}
    for r in runs:  # within tolerance, or listed
        assert abs(r.flops_ratio - 1) <= MISMATCH_TOLERANCE or (r.budget, r.arm) in off


def test_gate_mode_arms_get_their_own_folders_and_modes():
    sweep = load_sweep(ROOT / "configs/sweeps/gate_modes.yaml")
    runs = plan(sweep)
    modes = {r.config.model.gate_mode for r in runs}
    assert modes == {"two_gates", "convex", "softmax", "fixed"}
    assert len({r.folder for r in runs}) == len(runs) == 4 * len(sweep.seeds)
    assert all(r.folder.split("/")[1].endswith("_" + r.gate_mode) for r in runs)
    assert {r.tokens for r in runs} == {sweep.tokens[0]}
    with pytest.raises(ConfigError, match="gate_mode applies to dual arms only"):
        load_sweep(ROOT / "configs/sweeps/gate_modes.yaml", ["arms=[{arch: loop, K: [2], gate_mode: [convex]}]"])
    with pytest.raises(ConfigError, match="gate_mode must be one of"):
        load_sweep(ROOT / "configs/sweeps/gate_modes.yaml", ["arms=[{arch: dual, gate_mode: [both]}]"])


@pytest.mark.slow
def test_sweep_runs_aggregates_and_resumes(tmp_path, data_dir, capsys):
    path = _sweep_file(tmp_path, data_dir, budgets=[2.0e5])
    assert main(["sweep", str(path)]) == 0
    # seed by seed: every arm of seed 0 starts before any run of seed 1
    started = [ln.split("/seed")[1][0] for ln in capsys.readouterr().out.splitlines() if ln.startswith("started:")]
    assert started == ["0", "0", "1", "1"]
    out_dir = tmp_path / "sweep"
    rows = list(csv.DictReader(open(out_dir / "results.csv")))
    assert len(rows) == 4
    flops = {r["arm"]: float(r["train_flops"]) for r in rows}
    assert all(float(r["val_bpb"]) > 0 for r in rows)
    # every run spends its budget's total (PureWide FLOPs/token x 2048 tokens) without exceeding it, short by
    # less than one of its own steps
    target = 3 * float(next(r for r in rows if r["arm"] == "PureWide")["flops_per_token"]) * 2048
    for r in rows:
        step = 3 * float(r["flops_per_token"]) * 4 * 32
        assert target - step < float(r["train_flops"]) <= target, r["arm"]
    md = (out_dir / "results.md").read_text()
    assert "| PureWide |" in md and "±" in md and "**" in md
    assert "| arm | params | true FLOPs/token (vs PureWide) | tokens | seeds | val BPB | data BPB |" in md
    # each arm's tokens and FLOP ratio, as results.csv has them (equal FLOPs: cheaper arms see more tokens)
    for r in rows:
        ratio = float(r["flops_per_token"]) / float(next(w for w in rows if w["arm"] == "PureWide")["flops_per_token"])
        assert float(r["flops_ratio"]) == pytest.approx(ratio, rel=1e-9)
        assert int(r["tokens"]) == round(float(r["train_flops"]) / (3 * float(r["flops_per_token"])))
        assert f"M ({ratio - 1:+.1%}) | {int(r['tokens']) / 1e6:.3g}M | 2 |" in md
    # the paired table: per seed, Dual minus PureWide, from the same rows
    bpb = {(r["arm"], r["seed"]): float(r["val_bpb"]) for r in rows}
    d = [bpb[("Dual K=2 α=0.5", s)] - bpb[("PureWide", s)] for s in ("0", "1")]
    mean, sd = sum(d) / 2, abs(d[0] - d[1]) / 2 ** 0.5
    assert f"| Dual K=2 α=0.5 | {mean:+.4f} ± {sd:.4f} | {sum(x < 0 for x in d)}/2 |" in md
    assert (out_dir / "bpb_vs_params.png").is_file() and (out_dir / "loss_vs_flops.png").is_file()
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert "4 runs, 4 done; estimated wall time" in capsys.readouterr().out
    # a second call skips every finished run
    stamps = {p: p.stat().st_mtime_ns for p in out_dir.rglob("eval.json")}
    assert main(["sweep", str(path)]) == 0
    assert {p: p.stat().st_mtime_ns for p in out_dir.rglob("eval.json")} == stamps
    ev = json.loads(next(out_dir.rglob("eval.json")).read_text())
    assert "summary" in ev and "eval" in ev


def test_paired_table_gives_no_spread_for_one_seed():
    rows = [{"arm": "PureWide", "seed": 0, "val_bpb": 2.0}, {"arm": "PureWide", "seed": 1, "val_bpb": 2.5},
            {"arm": "A", "seed": 0, "val_bpb": 1.75}, {"arm": "A", "seed": 1, "val_bpb": 2.5},
            {"arm": "B", "seed": 0, "val_bpb": 2.125}]
    lines = _paired(rows, ["PureWide", "A", "B"], "val_bpb")
    assert f"| A | -0.1250 ± {0.25 / 2 ** 0.5:.4f} | 1/2 |" in lines
    assert "| B | +0.1250 | 0/1 |" in lines


def test_sweep_config_errors(tmp_path, data_dir, capsys):
    assert main(["sweep", str(_sweep_file(tmp_path, data_dir)), "--jobs", "0"]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err
    bad = _sweep_file(tmp_path, data_dir, arms=[{"arch": "wid"}])
    assert main(["sweep", str(bad), "--dry-run"]) == 2
    assert "wide, loop or dual" in capsys.readouterr().err
    bad = _sweep_file(tmp_path, data_dir, bugdets=[1.0])
    assert main(["sweep", str(bad), "--dry-run"]) == 2
    assert "budgets" in capsys.readouterr().err


def test_a_folder_trained_under_another_config_is_refused(tmp_path, data_dir, capsys):
    from dualpath.config import to_dict

    path = _sweep_file(tmp_path, data_dir)
    run = plan(load_sweep(path))[1]
    folder = tmp_path / "sweep" / run.folder
    folder.mkdir(parents=True)
    stored = to_dict(run.config)
    del stored["train"]["seed"]  # a field an older version did not write is no mismatch
    (folder / "run.yaml").write_text(yaml.safe_dump(stored))
    assert main(["sweep", str(path), "--aggregate-only"]) == 0
    stored["optim"]["lr"] = 1e-4
    (folder / "run.yaml").write_text(yaml.safe_dump(stored))
    (folder / "eval.json").write_text("{}")
    before = {p: p.read_bytes() for p in folder.iterdir()}
    for argv in (["sweep", str(path)], ["sweep", str(path), "--aggregate-only"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "optim.lr: 0.0001 there" in err and str(folder) in err
    assert {p: p.read_bytes() for p in folder.iterdir()} == before  # nothing trained or overwritten
    (folder / "run.yaml").write_text("- not a mapping\n")
    assert main(["sweep", str(path), "--aggregate-only"]) == 2
    assert "is not a run config" in capsys.readouterr().err


@pytest.mark.slow
def test_a_crashed_run_resumes_from_its_checkpoint(tmp_path, data_dir):
    path = _sweep_file(tmp_path, data_dir, budgets=[2.0e5], seeds=[0],
                       arms=[{"arch": "dual", "K": [2], "alpha": [0.5]}])
    cfg = yaml.safe_load(path.read_text())
    cfg["base"]["train"].update(save_every=4, keep_last=10)
    path.write_text(yaml.safe_dump(cfg))
    assert main(["sweep", str(path)]) == 0
    run = next((tmp_path / "sweep").rglob("eval.json")).parent
    finished = json.loads((run / "eval.json").read_text())
    steps = sorted((run / "checkpoints").glob("step_*"))
    assert len(steps) >= 3
    # the state a crash between two checkpoints leaves: no eval.json, nothing after the middle checkpoint
    (run / "eval.json").unlink()
    middle = steps[len(steps) // 2]
    for later in steps[len(steps) // 2 + 1:]:
        shutil.rmtree(later)
    (run / "checkpoints" / "latest").write_text(middle.name)
    assert main(["sweep", str(path)]) == 0
    starts = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if '"start"' in ln]
    assert starts[-1]["resumed_from"] == str(middle) and starts[-1]["step"] == int(middle.name.split("_")[1])
    resumed = json.loads((run / "eval.json").read_text())
    assert resumed["summary"]["step"] == finished["summary"]["step"]
    for name, res in finished["eval"].items():  # bit-exact resume: the same model, the same numbers
        assert resumed["eval"][name]["loss"] == res["loss"] and resumed["eval"][name]["bpb"] == res["bpb"]


def test_the_kept_results_are_what_their_run_folders_say():
    """results/cpu_paper_table (kept in git, docs/REPRODUCTION.md's source): every row of results.csv is
    rebuilt from its run folder's eval.json, and every folder was trained under the config the sweep plans."""
    from dualpath.experiments.sweep import check_run_folders
    from dualpath.experiments.sweep_report import _collect

    out = ROOT / "results/cpu_paper_table"
    if not (out / "results.csv").is_file():
        pytest.skip("no kept results")
    sweep = load_sweep(ROOT / "configs/sweeps/cpu_paper_table_equal_flops.yaml", [f"out_dir={out}"])
    runs = plan(sweep)
    check_run_folders(runs)
    rows = {(r["arm"], r["budget"], r["seed"]): r for r in _collect(runs)}
    kept = list(csv.DictReader(open(out / "results.csv")))
    assert kept
    for k in kept:
        got = rows[(k["arm"], float(k["budget"]), int(k["seed"]))]
        for key, value in k.items():
            if value and key not in ("arm", "arch"):
                assert float(value) == pytest.approx(float(got[key]), rel=1e-12), (k["arm"], key)


def test_a_run_held_by_another_sweep_process_is_skipped_not_failed(tmp_path, data_dir, capsys):
    """Two sweep processes on one config: a run whose job lock another process holds is skipped (its training
    and evaluation belong to that process), and the next call trains it."""
    import subprocess
    import sys
    import time

    from dualpath.experiments.sweep import JOB_LOCK
    from dualpath.fileio import FolderLock

    path = _sweep_file(tmp_path, data_dir, budgets=[2.0e5], seeds=[0])
    runs = plan(load_sweep(path))
    held = Path(next(r for r in runs if r.arch == "dual").config.train.out_dir)
    assert FolderLock.holder(held, JOB_LOCK) is None and not held.exists()  # asking creates nothing
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom dualpath.fileio import FolderLock\n"
                               f"FolderLock({str(held)!r}, {JOB_LOCK!r}).acquire()\nprint('held', flush=True)\n"
                               "time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert FolderLock.holder(held, JOB_LOCK) == f"pid {holder.pid} on {__import__('os').uname().nodename}"
        assert main(["sweep", str(path)]) == 0
        out = capsys.readouterr().out
        assert f"running elsewhere (pid {holder.pid}" in out and "FAILED" not in out
        assert not (held / "eval.json").exists()
        assert len(list((tmp_path / "sweep").rglob("eval.json"))) == 1  # the other run trained
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert FolderLock.holder(held, JOB_LOCK) is None  # the kernel dropped it with the process
    assert main(["sweep", str(path)]) == 0
    assert (held / "eval.json").is_file() and "running elsewhere" not in capsys.readouterr().out


def test_a_folder_lock_can_wait_for_a_holder_that_is_exiting(tmp_path):
    import subprocess
    import sys

    from dualpath.errors import DualPathError
    from dualpath.fileio import FolderLock

    holder = subprocess.Popen([sys.executable, "-c", "import time\nfrom dualpath.fileio import FolderLock\n"
                               f"FolderLock({str(tmp_path)!r}).acquire()\nprint('held', flush=True)\n"
                               "time.sleep(1.0)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DualPathError, match="is in use by pid"):
            FolderLock(tmp_path).acquire()  # refuses at once by default
        lock = FolderLock(tmp_path).acquire(wait=30)  # gets it once the holder exits
        assert FolderLock.holder(tmp_path) == f"pid {__import__('os').getpid()} on {__import__('os').uname().nodename}"
        lock.release()
    finally:
        holder.kill()
        holder.wait()

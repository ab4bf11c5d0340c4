"""No run lost, mixed or silently changed (issue #26), through the CLI.

Every refusal is checked the same way (`refused`): exit code 2, one line on stderr, no traceback, nothing on
stdout, and the sha256 of every file under the test's folder unchanged (nothing written, nothing added).
Fault tests: a corrupt newest checkpoint is skipped (test_train), two trainers into one folder (one
refuses), a divergence (nothing poisoned is kept), Duo routing noise independent of the batch split.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from dualpath import checkpoint as ckpt_io
from dualpath.cli import main
from dualpath.data.prepare import prepare
from dualpath.data.shards import write_shard
from dualpath.fileio import FolderLock
from dualpath.model import DualPathLM, ModelConfig

from helpers import (SHAKESPEARE, one_thread, patch_training_loss, save_tiny_checkpoint,  # noqa: F401
                     tiny_config, train_tiny_tokenizer)

SRC = Path(__file__).resolve().parents[1] / "src" / "dualpath"
PY = sys.executable
SEQ, VOCAB, B = 32, 384, 4
DUAL = dict(arch="dual", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, seq_len=SEQ,
            d_ffn_deep=64, d_ffn_wide=128, ffn_multiple=16, K=2, max_loops=4)
DUO = dict(arch="duo", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, seq_len=SEQ,
           d_ffn_big=128, d_ffn_small=32, ffn_multiple=16, duo_policy="random", p_big=0.5, p_small=0.5)


# ----------------------------------------------------------------------------------------------
# Fixtures and the one refusal check


def _prepare(root: Path, name: str, chars: slice, vocab: int = VOCAB) -> Path:
    text = root / f"{name}.txt"
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text.write_text(f.read()[chars], encoding="utf-8")
    out = root / name
    prepare([str(text)], out, vocab_size=vocab, max_tokens=25_000, val_fraction=0.1, progress=False)
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"shared data not present: {SHAKESPEARE}")
    return _prepare(tmp_path_factory.mktemp("safety_data"), "prepared", slice(0, 100_000))


@pytest.fixture(scope="module")
def other_tokenizer_data(data_dir) -> Path:
    """The same vocabulary size, another tokenizer (trained on other text)."""
    return _prepare(data_dir.parent, "other", slice(300_000, 400_000))


def write_config(path: Path, data_path: Path, out: Path, /, model: dict = DUAL, **sections) -> Path:
    cfg = {"model": dict(model), "data": {"path": str(data_path), "batch_size": B},
           "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1},
           "train": {"out_dir": str(out), "steps": 3, "device": "cpu", "dtype": "float32", "log_every": 1,
                     "eval_every": 0, "eval_batches": 1, "save_every": 0, "progress": False, "tensorboard": False,
                     "peak_flops": 1e12}}
    for section, values in sections.items():
        cfg[section].update(values)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def sha_tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def refused(argv: list, capsys, *roots: Path) -> str:
    """Run the CLI: exit 2, one line on stderr, no traceback, nothing on stdout, every file under roots unchanged."""
    before = [sha_tree(r) for r in roots]
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert out == "", out
    assert [sha_tree(r) for r in roots] == before
    return lines[0]


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A finished 3-step run (a checkpoint at steps 2 and 3)."""
    root = tmp_path_factory.mktemp("finished")
    cfg = write_config(root / "c.yaml", data_dir, root / "run", train={"save_every": 2})
    assert main(["train", str(cfg)]) == 0
    return cfg, root / "run"


@pytest.fixture
def run_copy(finished, tmp_path) -> tuple[Path, Path]:
    cfg, src = finished
    out = tmp_path / "run"
    shutil.copytree(src, out)
    new_cfg = tmp_path / "c.yaml"
    new_cfg.write_text(cfg.read_text().replace(str(src), str(out)))
    return new_cfg, out


# ----------------------------------------------------------------------------------------------
# Every output goes through the one writer


ALLOWED_WRITES = {  # file: why it may write without fileio's atomic writer
    "train.py": "metrics.jsonl is an append-only log (a torn last line is dropped on resume)",
    "experiments/sweep.py": "run.log is the child process's append-only output",
    "checkpoint.py": "safetensors writes into the checkpoint's temp folder, installed whole",
    "hf/export.py": "safetensors and transformers write into the export's temp folder, installed whole",
}
# (writing into a file object `f` that atomic_open gave is fine)
WRITE = re.compile(r"open\([^)]*['\"][wax]b?\+?['\"]|\.write_(text|bytes)\(|\.savefig\((?!f[,)])"
                   r"|torch\.save\([^,]+,(?!\s*f[,)])|np\.save\w*\((?!f[,)])|save_file\(|save_pretrained\("
                   r"|\.tofile\(|json\.dump\(")


def test_every_writer_goes_through_fileio():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        rel = str(path.relative_to(SRC))
        if rel == "fileio.py" or rel in ALLOWED_WRITES:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if WRITE.search(line) and "atomic_open" not in line:
                offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "write through dualpath.fileio (atomic_open & co):\n" + "\n".join(offenders)


def test_atomic_open_leaves_the_old_file_on_failure(tmp_path):
    from dualpath.fileio import atomic_open

    p = tmp_path / "f.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(p) as f:
            f.write("half")
            raise RuntimeError("crash")
    assert p.read_text() == "old" and [q.name for q in tmp_path.iterdir()] == ["f.txt"]


# ----------------------------------------------------------------------------------------------
# train: validate everything before touching a file


def test_train_refuses_a_folder_holding_a_run(run_copy, capsys):
    cfg, out = run_copy
    line = refused(["train", cfg], capsys, out)
    assert "holds a run" in line and "--resume" in line and "--overwrite" in line


def test_overwrite_replaces_only_after_validation(run_copy, data_dir, capsys):
    cfg, out = run_copy
    line = refused(["train", cfg, "model.vocab_size=256", "--overwrite"], capsys, out)  # invalid: old run kept
    assert "vocabulary mismatch" in line
    line = refused(["train", cfg, "--overwrite", "--resume", "auto"], capsys, out)
    assert "--overwrite" in line and "--resume" in line
    old = ckpt_io.load_config(out / "checkpoints" / "step_00000003")
    assert main(["train", str(cfg), "train.seed=7", "--overwrite"]) == 0
    assert ckpt_io.load_config(out / "checkpoints" / "step_00000003").train.seed == 7 != old.train.seed
    starts = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"start"' in x]
    assert len(starts) == 1  # the old log went with the old run


def test_resume_with_a_changed_config_lists_the_keys(run_copy, capsys):
    cfg, out = run_copy
    line = refused(["train", cfg, "model.K=3", "optim.lr=0.001", "--resume", "auto"], capsys, out)
    assert "model.K (2 -> 3)" in line and "optim.lr" in line
    # a safe change is refused too, unless allowed explicitly; an unsafe one even then
    line = refused(["train", cfg, "--steps", "5", "--resume", "auto"], capsys, out)
    assert "train.steps (3 -> 5)" in line and "--allow-safe-changes" in line
    line = refused(["train", cfg, "model.K=3", "--resume", "auto", "--allow-safe-changes"], capsys, out)
    assert "model.K" in line
    assert main(["train", str(cfg), "--steps", "5", "--resume", "auto", "--allow-safe-changes"]) == 0
    assert ckpt_io.find_resumable(out).name == "step_00000005"


def test_token_ids_beyond_the_vocabulary(data_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    ids = np.arange(2000) % VOCAB
    ids[1234] = VOCAB + 5  # a hand-made shard: its header admits the id, the model does not
    write_shard(data / "train_000.bin", ids, VOCAB + 10)
    for extra in sorted(data.glob("train_*.bin"))[1:]:
        extra.unlink()
    out = tmp_path / "run"
    line = refused(["train", write_config(tmp_path / "c.yaml", data, out)], capsys, tmp_path)
    assert "train_000.bin" in line and f"token id {VOCAB + 5}" in line and str(VOCAB) in line
    assert not out.exists()


def test_bad_output_paths_and_numbers(data_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    cfg = write_config(tmp_path / "c.yaml", data_dir, tmp_path / "afile")
    assert "is not a folder" in refused(["train", cfg], capsys, tmp_path)
    cfg = write_config(tmp_path / "c2.yaml", data_dir, tmp_path / "afile" / "run")
    assert "is a file" in refused(["train", cfg], capsys, tmp_path)
    for bad in ("nan", "inf", "1e999", "-.inf"):
        line = refused(["train", cfg, f"optim.lr={bad}"], capsys, tmp_path)
        assert "optim.lr" in line and "finite" in line


def test_resume_onto_data_of_another_tokenizer(run_copy, other_tokenizer_data, capsys):
    cfg, out = run_copy
    line = refused(["train", cfg, f"data.path={other_tokenizer_data}", "--resume", "auto"], capsys, out,
                   other_tokenizer_data)
    assert "data.path" in line  # a different data path is a config change, so...
    line = refused(["train", cfg, f"data.path={other_tokenizer_data}", "--resume", "auto",
                    "--allow-safe-changes"], capsys, out, other_tokenizer_data)
    assert "data.path" in line  # ...and not a safe one


def test_warmup_longer_than_the_run_is_a_warning(data_dir, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", data_dir, tmp_path / "run", optim={"warmup_steps": 50})
    assert main(["train", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "optim.warmup_steps=50 is longer than the run (3 steps)" in err


# ----------------------------------------------------------------------------------------------
# Round-trip: a run's own config; info on a run folder


def test_a_runs_config_round_trips(finished, tmp_path, capsys):
    _, run = finished
    own = run / "config.yaml"
    assert yaml.safe_load(own.read_text())["config_version"] == 1
    assert main(["info", str(own), "--json"]) == 0
    by_config = json.loads(capsys.readouterr().out)
    assert main(["info", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == by_config
    assert main(["info", str(run / "checkpoints" / "step_00000003")]) == 0
    assert "arch=dual" in capsys.readouterr().out
    line = refused(["train", own], capsys, run)  # the run's own config names its folder: that run
    assert "holds a run" in line
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    assert main(["train", str(copy / "config.yaml"), "--out", str(copy), "--resume", "auto"]) == 0  # finished
    future = tmp_path / "future.yaml"
    future.write_text(own.read_text().replace("config_version: 1", "config_version: 99"))
    assert "upgrade dualpath" in refused(["info", future], capsys, tmp_path)


# ----------------------------------------------------------------------------------------------
# One run per folder: the lock


def test_folder_lock_refuses_a_second_holder_and_frees_on_exit(tmp_path):
    lock = FolderLock(tmp_path / "run").acquire()
    with pytest.raises(Exception, match=f"in use by pid {__import__('os').getpid()}"):
        FolderLock(tmp_path / "run").acquire()
    lock.release()
    FolderLock(tmp_path / "run").acquire().release()  # a lock file left behind is not a lock
    # a holder killed with SIGKILL leaves the file, not the lock
    p = subprocess.run([PY, "-c", "import os, sys; from dualpath.fileio import FolderLock; "
                        "FolderLock(sys.argv[1]).acquire(); os.kill(os.getpid(), 9)", str(tmp_path / "run2")])
    assert p.returncode == -9 and "pid" in (tmp_path / "run2" / ".lock").read_text()
    FolderLock(tmp_path / "run2").acquire().release()


def test_two_trainers_into_one_folder(data_dir, tmp_path, capsys):
    """A trainer holds the folder; a second one (same config, so every other check passes) refuses."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", data_dir, out, train={"steps": 100_000, "log_every": 1000})
    first = subprocess.Popen([PY, "-m", "dualpath", "train", str(cfg)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()
        line = refused(["train", cfg, "--resume", "auto"], capsys, data_dir)
        assert f"in use by pid {first.pid}" in line
        line = refused(["train", cfg, "--overwrite"], capsys, data_dir)
        assert "in use" in line
    finally:
        first.kill()
        first.wait()


# ----------------------------------------------------------------------------------------------
# Divergence: nothing poisoned is kept


def _spike_at(monkeypatch, at_call: int, factor: float):
    patch_training_loss(monkeypatch, lambda loss, m: loss * factor, at_call)


@pytest.mark.parametrize("keep_last", [1, 10])
def test_loss_spike_stops_and_rolls_back(data_dir, tmp_path, capsys, monkeypatch, keep_last):
    """A finite loss 50x its recent mean at step 8: the weights after step 7 produced it, so the checkpoint of
    step 7 goes, `latest` points at step 6, and pruning never left the run without it."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", data_dir, out,
                       train={"steps": 12, "save_every": 1, "keep_last": keep_last})
    _spike_at(monkeypatch, 8, 50.0)
    capsys.readouterr()
    assert main(["train", str(cfg)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert "spiked above 4x its recent mean" in err[0] and "at step 8" in err[0]
    assert "nothing from step 7 on is kept" in err[0] and "step_00000006" in err[0]
    steps = [p.name for p in ckpt_io.step_folders(out)]
    assert steps[-1] == "step_00000006" and (keep_last == 10 or len(steps) <= 2)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    ckpt_io.verify(out / "checkpoints" / "step_00000006")
    assert not (out / "summary.json").exists()


def test_divergence_guard_can_be_turned_off(data_dir, tmp_path, monkeypatch):
    cfg = write_config(tmp_path / "c.yaml", data_dir, tmp_path / "run", train={"steps": 8})
    _spike_at(monkeypatch, 7, 50.0)
    assert main(["train", str(cfg), "train.divergence_factor=0"]) == 0


# ----------------------------------------------------------------------------------------------
# Duo routing noise keyed to the sample


def test_duo_routing_depends_on_the_sample_not_the_split(data_dir, tmp_path):
    """B=8, A=1 and B=4, A=2 route every window alike (keys: seed, step, global window index), so they give the
    same weights (with routing drawn from one global generator they did not)."""
    runs = {}
    for name, (bs, accum) in {"b8": (8, 1), "b4a2": (4, 2)}.items():
        cfg = write_config(tmp_path / f"{name}.yaml", data_dir, tmp_path / name, model=DUO,
                           data={"batch_size": bs}, train={"grad_accum": accum})
        assert main(["train", str(cfg)]) == 0
        runs[name] = load_file(str(ckpt_io.resolve(tmp_path / name) / "model.safetensors"))
    torch.manual_seed(0)
    init = DualPathLM(ModelConfig(**DUO)).state_dict()
    diff = lambda a, b: max((a[k] - b[k]).abs().max().item() for k in a)  # noqa: E731
    assert diff(runs["b8"], runs["b4a2"]) <= 1e-6
    assert diff(runs["b8"], {k: init[k] for k in runs["b8"]}) > 1e-3  # trained, not vacuous


def test_keyed_routing_draws_are_per_sample():
    from dualpath.model import DuoLayer

    layer = DuoLayer(ModelConfig(**DUO), 1)
    keys = torch.tensor([[0, 5, i] for i in range(6)])
    whole = layer.keyed_choice(keys, SEQ)
    assert torch.equal(torch.cat([layer.keyed_choice(keys[:2], SEQ), layer.keyed_choice(keys[2:], SEQ)]), whole)
    big = (whole == 0).float().mean().item()
    assert 0.3 < big < 0.7  # p_big = 0.5
    assert not torch.equal(DuoLayer(ModelConfig(**DUO), 0).keyed_choice(keys, SEQ), whole)  # per layer


@pytest.mark.slow
@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_duo_ddp_two_ranks_equals_single_process_accum(data_dir, tmp_path):
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    single = write_config(tmp_path / "single.yaml", data_dir, tmp_path / "single", model=DUO,
                          train={"grad_accum": 2})
    ddp = write_config(tmp_path / "ddp.yaml", data_dir, tmp_path / "ddp", model=DUO, train={"grad_accum": 1})
    p1 = subprocess.run([PY, "-m", "dualpath", "train", str(single)], env=env, capture_output=True, text=True,
                        timeout=300)
    assert p1.returncode == 0, p1.stderr
    p2 = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                         "dualpath", "train", str(ddp)], env=env, capture_output=True, text=True, timeout=300)
    assert p2.returncode == 0, p2.stdout + p2.stderr
    a = load_file(str(ckpt_io.resolve(tmp_path / "single") / "model.safetensors"))
    b = load_file(str(ckpt_io.resolve(tmp_path / "ddp") / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    la = [json.loads(x)["loss"] for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    np.testing.assert_allclose(la, lb, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Progress without a terminal


def test_plain_progress_lines_without_a_terminal(data_dir, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", data_dir, tmp_path / "run",
                       train={"steps": 4, "log_every": 2, "progress": True})
    assert main(["train", str(cfg)]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    assert len(lines) == 2, lines
    for n, ln in zip((2, 4), lines):
        m = re.fullmatch(rf"step {n}/4  loss (\S+)  ([\d,]+) tok/s  MFU (\S+)%  ETA \d\d:\d\d:\d\d", ln)
        assert m, ln
        assert math.isfinite(float(m.group(1))) and float(m.group(3)) >= 0


# ----------------------------------------------------------------------------------------------
# generate and eval: options checked against the checkpoint, before any output


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("models")
    tok = train_tiny_tokenizer(root / "tok" / "tokenizer.json")
    out = {}
    for arch in ("dual", "wide", "duo"):
        torch.manual_seed(0)
        out[arch] = save_tiny_checkpoint(root / arch, DualPathLM(tiny_config(arch, seq_len=16)), tok)
    return out


@pytest.mark.parametrize("args,needle", [
    (["--gates", "sideways"], "--gates: unknown gate override 'sideways'"),
    (["--gates", "both=7"], "--gates: gate override 'both=7': C must be in [0, 1]"),
    (["--gates", "both=abc"], "--gates: gate override 'both=abc': 'abc' is not a number"),
    (["--max-new-tokens", "-1"], "--max-new-tokens: must be >= 1"),
    (["--temperature", "-0.5"], "--temperature: must be a finite number in [0"),
    (["--temperature", "nan"], "--temperature: must be a finite number"),
    (["--top-p", "2"], "--top-p: must be a finite number in (0, 1]"),
    (["--top-k", "0"], "--top-k: must be >= 1"),
    (["--K", "0"], "--K=0 is outside 1..max_loops"),
    (["--gates", "deep-only,wide-only"], "--gates takes one mode here (eval takes a comma-separated list), got "
                                         "'deep-only,wide-only'"),
    (["--stop", ""], "--stop: is empty"),
    (["--prompt", ""], "--prompt: is empty"),
    (["--prompt", "word " * 40], "the prompt has"),  # longer than the 16-token context: nothing echoed
])
def test_generate_refuses_bad_options(models, args, needle, capsys):
    argv = ["generate", models["dual"], "--prompt", "To be"] + args
    line = refused(argv, capsys, models["dual"].parent)
    assert needle in line, line


@pytest.mark.parametrize("arch,args,needle", [
    ("wide", ["--K", "2"], "--K needs a loop or dual model; this one is wide"),
    ("duo", ["--gates", "deep-only"], "--gates needs a dual model; this one is duo"),
])
def test_generate_refuses_options_the_model_does_not_have(models, arch, args, needle, capsys):
    line = refused(["generate", models[arch], "--prompt", "To be"] + args, capsys, models[arch].parent)
    assert needle in line


def test_eval_checks_out_and_tokenizer_before_evaluating(models, data_dir, tmp_path, capsys):
    wide = models["wide"]
    line = refused(["eval", wide, "--data", data_dir, "--out", tmp_path / "missing" / "r.json"], capsys, tmp_path)
    assert "--out" in line and "does not exist" in line
    line = refused(["eval", wide, "--data", data_dir, "--K", "2"], capsys, tmp_path)
    assert "--K needs a loop or dual model" in line
    line = refused(["eval", models["dual"], "--data", data_dir, "--K", "1,x"], capsys, tmp_path)
    assert "--K: expected comma-separated integers, got '1,x'" in line
    line = refused(["eval", models["dual"], "--data", data_dir, "--gates", "deep-only,sideways"], capsys, tmp_path)
    assert "--gates: unknown gate override 'sideways'" in line
    line = refused(["eval", wide, "--data", data_dir, "--batch-size", "0"], capsys, tmp_path)
    assert "--batch-size" in line
    # a folder prepared with another tokenizer: refused, not a meaningless BPB
    line = refused(["eval", wide, "--data", data_dir, "--limit", "1"], capsys, tmp_path)
    assert "another tokenizer" in line


def test_duo_commands_refuse_an_out_that_is_a_file(models, data_dir, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    duo = models["duo"]
    for argv in (["duo", "oracle", duo, "--data", data_dir, "--out", afile, "--budgets", "1"],
                 ["duo", "train-router", duo, "--data", data_dir, "--out", afile, "--budget", "0.5"],
                 ["analyze", duo, "--data", data_dir, "--out", afile]):
        assert "is not a folder" in refused(argv, capsys, tmp_path)
    line = refused(["duo", "oracle", duo, "--data", data_dir, "--out", tmp_path / "o", "--budgets", "1",
                    "--seq-len", "999"], capsys, tmp_path)
    assert "--seq-len 999 is outside 1..16" in line


# ----------------------------------------------------------------------------------------------
# sweep: a grid that cannot run as planned is refused before anything runs


def _sweep(tmp_path: Path, data: Path, **kw) -> Path:
    cfg = {"name": "t", "out_dir": str(tmp_path / "sweep"), "budgets": [2e5], "match": "true", "multiple": 8,
           "build_multiple": 8, "tokens": [4096], "protocol": "tokens", "seeds": [0],
           "arms": [{"arch": "wide"}, {"arch": "dual", "K": [2], "alpha": [0.5]}],
           "base": {"model": {"vocab_size": VOCAB, "d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2,
                              "seq_len": SEQ},
                    "data": {"path": str(data), "batch_size": B}, "optim": {"warmup_steps": 2},
                    "train": {"device": "cpu", "dtype": "float32", "progress": False, "tensorboard": False}}}
    cfg.update(kw)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.parametrize("change,needle", [
    ({"budgets": []}, "sweep.budgets is empty"),
    ({"seeds": []}, "sweep.seeds is empty"),
    ({"tokens": []}, "sweep.tokens is empty"),
    ({"seeds": [0, 0]}, "sweep.seeds lists a value twice"),
    ({"seeds": [-1]}, "sweep.seeds must be >= 0"),
    ({"eval_limit": -3}, "sweep.eval_limit must be >= 0"),
    ({"arms": [{"arch": "loop", "K": []}]}, "K is an empty list"),
    ({"arms": [{"arch": "dual", "alpha": []}]}, "alpha is an empty list"),
    ({"arms": [{"arch": "wide"}, {"arch": "wide"}]}, "the same arm twice"),
    ({"arms": [{"arch": "dual", "K": [2, 2]}]}, "K lists a value twice"),
    ({"arms": [{"arch": "wide", "alpha": [0.5]}]}, "alpha applies to dual arms only"),
    ({"arms": [{"arch": "wide", "K": [2]}]}, "K applies to loop and dual arms"),
    ({"budgets": [2e5, 2.0001e5]}, "map to one folder"),
    ({"tokens": [128]}, "warmup_steps=2 is longer than run"),
])
def test_sweep_refuses_grids_that_cannot_run(change, needle, data_dir, tmp_path, capsys):
    line = refused(["sweep", _sweep(tmp_path, data_dir, **change), "--dry-run"], capsys, tmp_path)
    assert needle in line, line


def test_sweep_refuses_bad_numbers_and_paths(data_dir, tmp_path, capsys):
    cfg = _sweep(tmp_path, data_dir)
    for bad in ("nan", "1e999"):
        assert "finite" in refused(["sweep", cfg, f"base.optim.lr={bad}", "--dry-run"], capsys, tmp_path)
    (tmp_path / "afile").write_text("x")
    line = refused(["sweep", cfg, f"out_dir={tmp_path / 'afile'}", "--dry-run"], capsys, tmp_path)
    assert "sweep.out_dir" in line and "not a folder" in line


def test_sweep_warns_when_the_solver_floor_breaks_the_budget(data_dir, tmp_path, capsys):
    cfg = _sweep(tmp_path, data_dir, arms=[{"arch": "wide"}, {"arch": "dual", "K": [4], "alpha": [0.1]}])
    assert main(["sweep", str(cfg), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"warning: dual K=4 α=0.1 at 2e\+05: the solver's smallest widths are \+\d+% over", err), err

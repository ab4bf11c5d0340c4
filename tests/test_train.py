"""The trainer: LR schedules, weight-decay groups, gradient accumulation and DDP equivalence, bit-exact resume
after a SIGKILL, checkpoints, horizons, metrics (incl. an independent val BPB), NaN handling, CLI error
paths and a shortened demo.

Tiny dual models (d_model 32, 2 layers, 2 heads, T = 32, vocab = the prepared 512), CPU, fp32, fixed seeds.
The data (a 200 KB slice of tinyshakespeare, 60k tokens) is prepared once per module. Runs that must agree
bit for bit are made in the same kind of process (in-process vs in-process, subprocess vs subprocess with
OMP_NUM_THREADS=1), so they use the same kernels and thread count.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from dualpath import checkpoint as ckpt_io
from dualpath.cli import main as cli_main
from dualpath.config import ModelConfig, OptimConfig
from dualpath.data.prepare import prepare
from dualpath.data.shards import TokenShards, WindowSampler, write_shard
from dualpath.data.tokenizer import load_tokenizer, token_byte_lengths
from dualpath.model import DualPathLM
from dualpath.train import build_optimizer, lr_at, param_groups

from helpers import one_thread, patch_training_loss  # noqa: F401  (autouse: one intra-op thread)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"
PY = sys.executable
SEQ = 32
VOCAB = 512
B = 4
LN2 = math.log(2.0)

MODEL = dict(arch="dual", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, seq_len=SEQ,
             d_ffn_deep=64, d_ffn_wide=128, ffn_multiple=16, K=2, max_loops=4)


# ----------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"shared data not present: {SHAKESPEARE}")
    root = tmp_path_factory.mktemp("train_data")
    with open(SHAKESPEARE, encoding="utf-8") as f:
        (root / "shakespeare.txt").write_text(f.read(200_000), encoding="utf-8")
    out = root / "prepared"
    meta = prepare([str(root / "shakespeare.txt")], out, vocab_size=VOCAB, max_tokens=60_000, val_fraction=0.05,
                   progress=False)
    assert meta["vocab_size"] == VOCAB
    assert meta["val_tokens"] > 8 * B * SEQ  # enough val windows for every eval below
    return out


def base_config(data_path: Path, out: Path, /, **sections) -> dict:
    cfg = {
        "model": dict(MODEL),
        "data": {"path": str(data_path), "batch_size": B},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "train": {"out_dir": str(out), "seed": 0, "steps": 4, "device": "cpu", "dtype": "float32",
                  "log_every": 1, "eval_every": 0, "eval_batches": 2, "save_every": 0, "keep_last": 2,
                  "progress": False, "tensorboard": False, "peak_flops": 1e12},
    }
    for section, values in sections.items():
        cfg[section].update(values)
    return cfg


def write_config(path: Path, data_path: Path, out: Path, /, **sections) -> Path:
    path.write_text(yaml.safe_dump(base_config(data_path, out, **sections), sort_keys=False))
    return path


def train_cli(cfg: Path, *overrides: str, flags: tuple = ()) -> int:
    """`dualpath train CFG key=value ... --flags` in this process (overrides must precede the flags)."""
    return cli_main(["train", str(cfg), *overrides, *flags])


def sub_env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def step_dirs(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step_*") if p.is_dir())


def weights(run_or_ckpt: Path) -> dict:
    return load_file(str(ckpt_io.resolve(run_or_ckpt) / "model.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def snapshot(root: Path) -> dict:
    """Every file under root with its bytes (to show that nothing was written)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def init_weights(cfg_model: dict, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in DualPathLM(ModelConfig(**cfg_model)).state_dict().items()}


# ----------------------------------------------------------------------------------------------
# LR schedules


def test_warmup_is_linear():
    cfg = OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=10)
    assert lr_at(0, 100, cfg) == pytest.approx(1e-2 / 10, rel=1e-12)
    assert lr_at(9, 100, cfg) == pytest.approx(1e-2, rel=1e-12)
    for k in range(10):
        assert lr_at(k, 100, cfg) == pytest.approx(1e-2 * (k + 1) / 10, rel=1e-12)
    for schedule in ("wsd", "constant"):  # every schedule shares the warmup
        c = OptimConfig(lr=1e-2, min_lr=1e-3, warmup_steps=10, schedule=schedule)
        assert [lr_at(k, 100, c) for k in range(10)] == [lr_at(k, 100, cfg) for k in range(10)]


def test_cosine_endpoints_and_midpoint():
    lr, lo, warm, total = 1e-2, 1e-3, 10, 110
    cfg = OptimConfig(lr=lr, min_lr=lo, warmup_steps=warm, schedule="cosine")
    assert lr_at(warm, total, cfg) == pytest.approx(lr, rel=1e-12)  # right after warmup: the peak
    # the last step taken (total-1) is min_lr up to (lr-min_lr)·π²/(4·span²)
    assert abs(lr_at(total - 1, total, cfg) - lo) <= (lr - lo) * 1e-3
    assert lr_at(total - 1, total, cfg) >= lo
    assert lr_at(total, total, cfg) == pytest.approx(lo, rel=1e-12)
    assert lr_at(warm + (total - warm) // 2, total, cfg) == pytest.approx((lr + lo) / 2, rel=1e-9)
    values = [lr_at(k, total, cfg) for k in range(warm, total)]
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly decreasing after warmup
    # no warmup: step 0 is the peak
    assert lr_at(0, 50, OptimConfig(lr=lr, min_lr=lo, warmup_steps=0)) == pytest.approx(lr, rel=1e-12)


def test_wsd_is_flat_then_linear():
    lr, lo, total = 1e-2, 1e-3, 100
    cfg = OptimConfig(lr=lr, min_lr=lo, warmup_steps=5, schedule="wsd", wsd_decay_frac=0.2)
    start = total - 20  # round(0.2 * 100) decay steps
    assert all(lr_at(k, total, cfg) == lr for k in range(5, start))
    decay = [lr_at(k, total, cfg) for k in range(start, total)]
    for i, v in enumerate(decay):
        assert v == pytest.approx(lr + (lo - lr) * (i + 1) / 20, rel=1e-12)
    diffs = np.diff([lr] + decay)
    np.testing.assert_allclose(diffs, -(lr - lo) / 20, rtol=1e-9)
    assert decay[-1] == pytest.approx(lo, rel=1e-12)  # the last step reaches min_lr


def test_constant_schedule():
    cfg = OptimConfig(lr=2e-3, min_lr=1e-4, warmup_steps=3, schedule="constant")
    assert [lr_at(k, 20, cfg) for k in range(3, 25)] == [2e-3] * 22
    cfg0 = OptimConfig(lr=2e-3, min_lr=1e-4, warmup_steps=0, schedule="constant")
    assert lr_at(0, 20, cfg0) == 2e-3


# ----------------------------------------------------------------------------------------------
# Weight decay groups


@pytest.mark.parametrize("tied", [False, True])
def test_param_groups_decay_only_matrices(tied):
    model = DualPathLM(ModelConfig(**{**MODEL, "tie_embeddings": tied}))
    groups = param_groups(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    ids = [{id(p) for p in g["params"]} for g in groups]
    name_of = {id(p): n for n, p in model.named_parameters()}
    decay = {name_of[i] for i in ids[0]}
    no_decay = {name_of[i] for i in ids[1]}
    # every parameter exactly once (a tied head is the embedding, counted once)
    assert not (ids[0] & ids[1])
    assert sum(len(g["params"]) for g in groups) == len({id(p) for p in model.parameters()})
    assert decay | no_decay == set(name_of.values())

    assert "embed.weight" in no_decay
    if tied:
        assert "lm_head.weight" not in decay | no_decay
    for name in decay | no_decay:
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name or leaf in ("step_gain", "beta", "W_g", "b_g", "bias"):
            assert name in no_decay, name
        if re.search(r"\.attn\.w[qkvo]\.weight$|\.ffn\.w[123]\.weight$", name):
            assert name in decay, name
    expected_no = {"embed.weight", "norm.weight"}
    for i in range(MODEL["n_layers"]):
        expected_no |= {f"layers.{i}.deep.step_gain", f"layers.{i}.wide.beta", f"layers.{i}.gate.W_g",
                        f"layers.{i}.gate.b_g", f"layers.{i}.deep.halt.bias"}
        for path in ("deep", "wide"):
            expected_no |= {f"layers.{i}.{path}.block.{n}.weight" for n in ("attn_norm", "ffn_norm", "attn.q_norm",
                                                                            "attn.k_norm")}
    assert expected_no <= no_decay
    n_matrices = sum(1 for n in decay if re.search(r"\.(attn\.w[qkvo]|ffn\.w[123])\.weight$", n))
    assert n_matrices == MODEL["n_layers"] * 2 * 7  # deep and wide: 4 attention + 3 FFN matrices

    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in groups]


# ----------------------------------------------------------------------------------------------
# Gradient accumulation and DDP


def test_grad_accum_equals_larger_batch(data_dir, tmp_path):
    """B=4, A=2 reads windows [w, w+4) then [w+4, w+8) of the global counter: the same 8 windows as B=8, A=1."""
    runs = {}
    for name, (bs, accum) in {"b8a1": (8, 1), "b4a2": (4, 2), "b4a1": (4, 1)}.items():
        out = tmp_path / name
        cfg = write_config(tmp_path / f"{name}.yaml", data_dir, out, data={"batch_size": bs},
                           train={"grad_accum": accum, "steps": 2})
        assert train_cli(cfg) == 0
        runs[name] = out
    a, b = weights(runs["b8a1"]), weights(runs["b4a2"])
    assert max_abs_diff(a, b) <= 1e-6
    # the comparison is not vacuous: the weights moved, and half the data gives other weights
    assert max_abs_diff(a, init_weights(MODEL)) > 1e-3
    assert max_abs_diff(a, weights(runs["b4a1"])) > 1e-4
    for name in ("b8a1", "b4a2"):
        ts = torch.load(ckpt_io.resolve(runs[name]) / "trainer_state.pt", weights_only=True)
        assert (ts["step"], ts["window_counter"], ts["tokens"]) == (2, 16, 2 * 8 * SEQ)
    la = [r["loss"] for r in records(runs["b8a1"]) if "loss" in r]
    lb = [r["loss"] for r in records(runs["b4a2"]) if "loss" in r]
    np.testing.assert_allclose(la, lb, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available")
def test_ddp_two_ranks_equals_single_process_accum(data_dir, tmp_path):
    """2 gloo ranks × A=1 read windows [w, w+4) (rank 0) and [w+4, w+8) (rank 1), like 1 process with A=2."""
    steps = 3
    single = tmp_path / "single"
    cfg1 = write_config(tmp_path / "single.yaml", data_dir, single, train={"grad_accum": 2, "steps": steps})
    ddp = tmp_path / "ddp"
    cfg2 = write_config(tmp_path / "ddp.yaml", data_dir, ddp, train={"grad_accum": 1, "steps": steps})
    p1 = subprocess.run([PY, "-m", "dualpath", "train", str(cfg1)], env=sub_env(), capture_output=True, text=True,
                        timeout=300)
    assert p1.returncode == 0, p1.stderr
    p2 = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                         "-m", "dualpath", "train", str(cfg2)], env=sub_env(), capture_output=True, text=True,
                        timeout=300)
    assert p2.returncode == 0, p2.stdout + p2.stderr
    assert max_abs_diff(weights(single), weights(ddp)) <= 1e-5
    assert max_abs_diff(weights(ddp), init_weights(MODEL)) > 1e-3
    ts = torch.load(ckpt_io.resolve(ddp) / "trainer_state.pt", weights_only=True)
    assert (ts["step"], ts["world"], ts["window_counter"]) == (steps, 2, steps * 8)
    start = records(ddp)[0]
    assert start["event"] == "start" and start["world"] == 2 and start["tokens_per_step"] == 8 * SEQ
    l1 = [r["loss"] for r in records(single) if "loss" in r]
    l2 = [r["loss"] for r in records(ddp) if "loss" in r]
    assert len(l1) == len(l2) == steps
    np.testing.assert_allclose(l1, l2, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Resume after SIGKILL


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_exact(data_dir, tmp_path):
    steps = 40
    sections = dict(train={"steps": steps, "save_every": 4, "keep_last": 2, "eval_every": 10})
    ref = tmp_path / "ref"
    cfg_ref = write_config(tmp_path / "ref.yaml", data_dir, ref, **sections)
    p = subprocess.run([PY, "-m", "dualpath", "train", str(cfg_ref)], env=sub_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr

    run = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", data_dir, run, **sections)
    proc = subprocess.Popen([PY, "-m", "dualpath", "train", str(cfg)], env=sub_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    latest = run / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    try:
        while not latest.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert latest.is_file(), "no checkpoint appeared before the run ended"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run / "summary.json").exists()

    # `latest` names a complete folder; a half-written temp folder is never a checkpoint
    ckpt = run / "checkpoints" / latest.read_text().strip()
    for f in ("model.safetensors", "optimizer.pt", "trainer_state.pt", "config.yaml", "tokenizer.json",
              "data_meta.json"):
        assert (ckpt / f).is_file(), f
    killed_at = torch.load(ckpt / "trainer_state.pt", weights_only=True)["step"]
    assert 4 <= killed_at < steps and killed_at % 4 == 0
    decoy = run / "checkpoints" / f".tmp_step_{steps + 100:08d}"
    decoy.mkdir(exist_ok=True)
    (decoy / "model.safetensors").write_bytes(b"half-written")
    assert ckpt_io.find_latest(run) == ckpt

    p = subprocess.run([PY, "-m", "dualpath", "train", str(cfg), "--resume", "auto"], env=sub_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    start = [r for r in records(run) if r.get("event") == "start"][-1]
    assert start["resumed_from"] == str(ckpt) and start["step"] >= killed_at

    w_ref, w_run = weights(ref), weights(run)
    assert w_ref.keys() == w_run.keys()
    for k in w_ref:
        assert torch.equal(w_ref[k], w_run[k]), k
    o_ref = torch.load(ckpt_io.resolve(ref) / "optimizer.pt", weights_only=True)
    o_run = torch.load(ckpt_io.resolve(run) / "optimizer.pt", weights_only=True)
    for i, st in o_ref["state"].items():
        for k, v in st.items():
            assert torch.equal(v, o_run["state"][i][k]), (i, k)
    # the log reads like one run: every step once, with the reference's values
    ref_steps = {r["step"]: r for r in records(ref) if "loss" in r}
    run_steps = [r for r in records(run) if "loss" in r]
    assert [r["step"] for r in run_steps] == list(range(1, steps + 1))
    for r in run_steps:
        assert (r["loss"], r["lr"], r["grad_norm"]) == tuple(ref_steps[r["step"]][k]
                                                             for k in ("loss", "lr", "grad_norm"))
    s_ref = json.loads((ref / "summary.json").read_text())
    s_run = json.loads((run / "summary.json").read_text())
    assert (s_run["step"], s_run["val_loss"]) == (s_ref["step"], s_ref["val_loss"])
    assert step_dirs(run) == [f"step_{steps - 4:08d}", f"step_{steps:08d}"]
    assert ckpt_io.find_latest(run).name == f"step_{steps:08d}"


def test_resume_in_process_with_tied_embeddings_and_torn_log_line(data_dir, tmp_path):
    """Resume also works for a tied head, and a torn last line in metrics.jsonl does not stop it.

    The first leg stops at 3 of 5 steps by a shorter horizon, so the schedule must not depend on the horizon:
    warmup then constant."""
    tied = {"tie_embeddings": True}
    optim = {"schedule": "constant", "warmup_steps": 2}
    ref = tmp_path / "ref"
    cfg_ref = write_config(tmp_path / "ref.yaml", data_dir, ref, model=tied, optim=optim, train={"steps": 5})
    assert train_cli(cfg_ref) == 0
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", data_dir, run, model=tied, optim=optim, train={"steps": 5})
    assert train_cli(cfg, flags=("--steps", "3")) == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 5.1, "gate_de')  # a write cut short
    # a longer horizon is a change of config: refused unless allowed explicitly
    assert train_cli(cfg, flags=("--steps", "5", "--resume", "auto")) == 2
    assert train_cli(cfg, flags=("--steps", "5", "--resume", "auto", "--allow-safe-changes")) == 0
    w_ref, w_run = weights(ref), weights(run)
    assert "lm_head.weight" not in w_run
    for k in w_ref:
        assert torch.equal(w_ref[k], w_run[k]), k
    assert [r["step"] for r in records(run) if "loss" in r] == [1, 2, 3, 4, 5]
    # resuming a finished run does nothing and returns its summary
    before = snapshot(run)
    assert train_cli(cfg, flags=("--steps", "5", "--resume", "auto")) == 0
    assert snapshot(run) == before


def test_compile_auto_compiles_only_runs_that_repay_it(monkeypatch):
    from dualpath import parallel
    from dualpath.errors import ConfigError

    cpu = torch.device("cpu")
    monkeypatch.setattr(parallel, "compiler_missing", lambda device: None)
    long_run = parallel.COMPILE_AUTO_SECONDS * parallel.NOMINAL_RATE["cpu"]  # on one thread (the autouse fixture)
    assert torch.get_num_threads() == 1
    assert parallel.use_compile("auto", long_run, cpu)[0] is True
    assert parallel.use_compile("auto", 0.99 * long_run, cpu) == (False, "auto: about 29 min of eager training, "
                                                                         "under 30 min")
    assert parallel.use_compile("auto", long_run, torch.device("cuda"))[0] is False  # a GPU's rate
    torch.set_num_threads(2)  # twice the rate: half the time
    try:
        assert parallel.use_compile("auto", 1.9 * long_run, cpu)[0] is False
    finally:
        torch.set_num_threads(1)
    assert parallel.use_compile(False, long_run, cpu)[0] is False
    assert parallel.use_compile(True, 1.0, cpu) == (True, "train.compile=true")
    monkeypatch.setattr(parallel, "compiler_missing", lambda device: "no working C++ compiler (InductorError)")
    assert parallel.use_compile("auto", long_run, cpu) == (False, "auto: no working C++ compiler (InductorError)")
    with pytest.raises(ConfigError, match="train.compile=true, but torch.compile cannot build kernels here"):
        parallel.use_compile(True, 1.0, cpu)
    from dualpath.config import TrainConfig  # a config built in Python: the strings mean what they say

    assert [TrainConfig(compile=v).validate().compile for v in ("true", "false", "auto")] == [True, False, "auto"]


@pytest.fixture
def no_cxx_compiler():
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)}):  # monkeypatch's undo breaks torch's config
        yield


def test_compile_without_a_cxx_compiler(data_dir, tmp_path, no_cxx_compiler, capsys):
    """Inductor needs a C++ compiler on CPU: train.compile=true without one is refused before any file is
    written; auto trains eagerly and says why in the start record."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", data_dir, out, train={"steps": 2, "compile": True})
    assert train_cli(cfg) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.compile=true, but torch.compile cannot build kernels here: no working " \
        "C++ compiler" in err and "Traceback" not in err
    assert not out.exists()
    assert train_cli(cfg, "train.compile=auto") == 0
    start = next(r for r in records(out) if r.get("event") == "start")
    assert (start["compile"], start["compile_reason"]) == (False, "auto: about 0 min of eager training, under 30 min")
    assert train_cli(cfg, "train.compile=perhaps") == 2
    assert "train.compile='perhaps' is not one of true, false, auto" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_training_matches_eager_and_resumes_bit_exact(data_dir, tmp_path):
    """A compiled run trains what an eager run trains (to fp32 rounding); resumed part-way, it ends with the
    same bits as without the interruption. Schedule: warmup then constant (the first leg's horizon is shorter)."""
    optim = {"schedule": "constant", "warmup_steps": 2}
    runs = {}
    for name, compile_ in (("eager", False), ("compiled", True), ("resumed", True)):
        runs[name] = tmp_path / name
        cfg = write_config(tmp_path / f"{name}.yaml", data_dir, runs[name], optim=optim,
                           train={"steps": 5, "compile": compile_})
        if name == "resumed":
            assert train_cli(cfg, flags=("--steps", "3")) == 0
            assert train_cli(cfg, flags=("--steps", "5", "--resume", "auto", "--allow-safe-changes")) == 0
        else:
            assert train_cli(cfg) == 0
    starts = [r for r in records(runs["resumed"]) if r.get("event") == "start"]
    assert [r["compile"] for r in starts] == [True, True] and starts[1]["resumed_from"]
    eager, compiled, resumed = (weights(runs[n]) for n in ("eager", "compiled", "resumed"))
    for k in compiled:
        assert torch.equal(compiled[k], resumed[k]), k
    assert max_abs_diff(compiled, eager) < 1e-4
    losses = {n: [r["loss"] for r in records(runs[n]) if "loss" in r] for n in ("eager", "compiled")}
    np.testing.assert_allclose(losses["compiled"], losses["eager"], rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoints_keep_last_and_load(data_dir, tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", data_dir, out, train={"steps": 7, "save_every": 2, "keep_last": 2})
    assert train_cli(cfg) == 0
    assert step_dirs(out) == ["step_00000006", "step_00000007"]  # saves at 2, 4, 6 and the end
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000007"
    assert not list((out / "checkpoints").glob(".tmp_*"))
    ckpt = out / "checkpoints" / "step_00000007"

    state = load_file(str(ckpt / "model.safetensors"))
    model = DualPathLM(ModelConfig(**MODEL))
    model.load_state_dict(state, strict=True)
    assert "lm_head.weight" in state  # untied: the head is its own tensor

    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(opt["param_groups"]) == 2 and opt["param_groups"][0]["weight_decay"] == 0.1
    n_params = len(list(model.parameters()))
    assert len(opt["state"]) == n_params
    assert all(float(s["step"]) == 7 for s in opt["state"].values())
    ts = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert (ts["step"], ts["window_counter"], ts["world"], ts["tokens"]) == (7, 7 * B, 1, 7 * B * SEQ)
    assert isinstance(ts["rng"]["torch"], torch.Tensor)

    cfg_back = ckpt_io.load_config(ckpt)
    assert cfg_back.model == ModelConfig(**MODEL)
    assert cfg_back.train.steps == 7
    assert (ckpt / "tokenizer.json").read_bytes() == (data_dir / "tokenizer.json").read_bytes()
    assert (ckpt / "data_meta.json").read_bytes() == (data_dir / "meta.json").read_bytes()

    loaded, _, where = ckpt_io.load_model(out)
    assert where == ckpt
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k

    # keep_last=1 keeps only the newest
    out1 = tmp_path / "run1"
    cfg1 = write_config(tmp_path / "c1.yaml", data_dir, out1, train={"steps": 3, "save_every": 1, "keep_last": 1})
    assert train_cli(cfg1) == 0
    assert step_dirs(out1) == ["step_00000003"]


def test_tied_embeddings_saved_once_and_reloaded(data_dir, tmp_path):
    out = tmp_path / "tied"
    cfg = write_config(tmp_path / "t.yaml", data_dir, out, model={"tie_embeddings": True}, train={"steps": 2})
    assert train_cli(cfg) == 0
    state = weights(out)
    assert "embed.weight" in state and "lm_head.weight" not in state
    model, cfg_back, _ = ckpt_io.load_model(out)
    assert cfg_back.model.tie_embeddings
    assert model.lm_head.weight is model.embed.weight
    assert torch.equal(model.embed.weight, state["embed.weight"])
    assert max_abs_diff({"e": state["embed.weight"]}, {"e": init_weights({**MODEL, "tie_embeddings": True})[
        "embed.weight"]}) > 1e-4  # trained, not the init


# ----------------------------------------------------------------------------------------------
# Horizons


def _train_fpt(**model_kw) -> float:
    return DualPathLM(ModelConfig(**{**MODEL, **model_kw})).train_flops_per_token(SEQ)


def test_horizon_steps_flag_replaces_yaml(data_dir, tmp_path):
    out = tmp_path / "s"
    cfg = write_config(tmp_path / "s.yaml", data_dir, out, train={"steps": 50})
    assert train_cli(cfg, flags=("--steps", "3")) == 0
    s = json.loads((out / "summary.json").read_text())
    assert (s["step"], s["tokens"]) == (3, 3 * B * SEQ)
    assert s["flops"] == pytest.approx(3 * B * SEQ * _train_fpt(), rel=1e-12)


def test_horizon_tokens(data_dir, tmp_path):
    out = tmp_path / "t"
    cfg = write_config(tmp_path / "t.yaml", data_dir, out, train={"grad_accum": 2})
    tokens_per_step = B * 2 * SEQ  # 256
    assert train_cli(cfg, flags=("--tokens", "1000")) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["step"] == math.ceil(1000 / tokens_per_step) == 4
    assert s["tokens"] == 4 * tokens_per_step
    assert s["flops"] == pytest.approx(4 * tokens_per_step * _train_fpt(), rel=1e-12)
    assert records(out)[0]["total_steps"] == 4


def test_horizon_target_flops(data_dir, tmp_path):
    fpt = _train_fpt()
    per_step = fpt * B * SEQ
    out = tmp_path / "f"
    cfg = write_config(tmp_path / "f.yaml", data_dir, out)
    assert train_cli(cfg, flags=("--target-flops", repr(5.7 * per_step))) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["step"] == math.floor(5.7 * per_step / per_step) == 5
    assert s["flops"] == pytest.approx(5 * per_step, rel=1e-12)
    assert s["flops"] <= 5.7 * per_step
    assert s["train_flops_per_token"] == pytest.approx(fpt, rel=1e-12)


def test_horizon_errors(data_dir, tmp_path, capsys):
    out = tmp_path / "e"
    cfg = write_config(tmp_path / "e.yaml", data_dir, out, train={"steps": 0})
    assert train_cli(cfg) == 2
    assert "horizon" in one_line_error(capsys.readouterr().err)
    per_step = _train_fpt() * B * SEQ
    assert train_cli(cfg, flags=("--target-flops", repr(0.5 * per_step))) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "less than one step" in line
    assert not (out / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------
# Metrics and val BPB


def test_metrics_and_independent_val_bpb(data_dir, tmp_path):
    steps, eval_batches = 7, 2
    out = tmp_path / "m"
    cfg_path = write_config(tmp_path / "m.yaml", data_dir, out,
                            train={"steps": steps, "eval_every": 3, "eval_batches": eval_batches, "seed": 3})
    assert train_cli(cfg_path) == 0
    recs = records(out)
    start = recs[0]
    assert start["event"] == "start" and start["total_steps"] == steps and start["tokens_per_step"] == B * SEQ
    fpt = _train_fpt()
    assert start["train_flops_per_token"] == pytest.approx(fpt, rel=1e-12)
    optim = OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2)

    train_recs = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train_recs] == list(range(1, steps + 1))
    keys = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"}
    keys |= {f"gate_{p}/{i}" for p in ("deep", "wide") for i in range(MODEL["n_layers"])}
    for r in train_recs:
        assert keys <= r.keys(), keys - r.keys()
        assert math.isfinite(r["loss"]) and 0 < r["loss"] < 2 * math.log(VOCAB)
        assert r["lr"] == lr_at(r["step"] - 1, steps, optim)
        assert r["grad_norm"] > 0 and r["tokens_per_s"] > 0
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * fpt / 1e12, rel=1e-9)
        for i in range(MODEL["n_layers"]):
            assert 0 < r[f"gate_deep/{i}"] < 1 and 0 < r[f"gate_wide/{i}"] < 1
        assert "val_loss" not in r

    val_recs = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in val_recs] == [3, 6, 7]
    for r in val_recs:
        assert {"val_loss", "val_bpb", "val_tokens"} <= r.keys()
        assert r["val_tokens"] == eval_batches * B * SEQ

    # recompute the final eval: val windows 0 .. eval_batches*B-1 of WindowSampler(seed) on the final weights
    model, _, _ = ckpt_io.load_model(out)
    val = TokenShards(data_dir, "val")
    sampler = WindowSampler(val.n_tokens, SEQ, seed=3, split="val")
    w = torch.from_numpy(sampler.batch(val, 0, eval_batches * B))
    x, y = w[:, :-1], w[:, 1:]
    with torch.no_grad():
        logits = model(x).logits
    per_tok = F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1), reduction="none")
    loss_sum = per_tok.double().sum().item()
    tok = load_tokenizer(data_dir)
    lengths = token_byte_lengths(tok)
    n_bytes = int(lengths[y.numpy()].sum())
    # the byte count is the text itself: decode each window's targets and count UTF-8 bytes
    assert n_bytes == sum(len(tok.decode(row.tolist(), skip_special_tokens=True).encode("utf-8")) for row in y)
    final = val_recs[-1]
    assert final["val_loss"] == pytest.approx(loss_sum / y.numel(), rel=1e-6)
    assert final["val_bpb"] == pytest.approx(loss_sum / LN2 / n_bytes, rel=1e-6)
    assert final["val_bpb"] == pytest.approx(final["val_loss"] * final["val_tokens"] / (LN2 * n_bytes), rel=1e-9)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_bpb"] == final["val_bpb"] and summary["loss"] == train_recs[-1]["loss"]


# ----------------------------------------------------------------------------------------------
# Non-finite losses and gradients


def test_nan_loss_from_huge_lr_stops_cleanly(data_dir, tmp_path, capsys):
    out = tmp_path / "nan"
    cfg = write_config(tmp_path / "n.yaml", data_dir, out,
                       optim={"lr": 1e30, "min_lr": 0.0, "warmup_steps": 0},
                       train={"steps": 6, "save_every": 1, "keep_last": 10})
    assert train_cli(cfg) == 2
    line = one_line_error(capsys.readouterr().err)
    m = re.search(r"loss became (nan|inf|-inf) at step (\d+)", line)
    assert m, line
    bad = int(m.group(2))
    assert 1 <= bad <= 6
    saved = [int(n.split("_")[1]) for n in step_dirs(out)]
    assert all(s < bad for s in saved), (saved, bad)
    assert not (out / "summary.json").exists()
    assert all(r["step"] < bad for r in records(out) if "loss" in r)
    if saved:
        assert str(out / "checkpoints" / f"step_{max(saved):08d}") in line
        assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{max(saved):08d}"


def _poison_training_forward(monkeypatch, at_call: int, kind: str):
    """Make the `at_call`-th training forward return a NaN loss (kind='loss') or a finite loss whose
    gradient is NaN (kind='grad': d sqrt(u)/du at u = 0 is inf, times 0 is NaN)."""
    change = ((lambda loss, m: loss * float("nan")) if kind == "loss"
              else (lambda loss, m: loss + 0.0 * torch.sqrt(m.norm.weight.sum() * 0.0)))
    patch_training_loss(monkeypatch, change, at_call, at_call)


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_nan_stops_without_saving_poisoned_state(data_dir, tmp_path, capsys, monkeypatch, kind):
    """The poison comes at step 4, a save step: neither its (NaN-updated) weights nor anything later is saved."""
    out = tmp_path / kind
    cfg = write_config(tmp_path / "p.yaml", data_dir, out, train={"steps": 8, "save_every": 2, "keep_last": 10})
    _poison_training_forward(monkeypatch, at_call=4, kind=kind)  # step 4 (A = 1)
    assert train_cli(cfg) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "at step 4" in line and "nan" in line.lower()
    assert ("loss became" if kind == "loss" else "gradient norm became") in line
    assert str(out / "checkpoints" / "step_00000002") in line  # the last good checkpoint
    assert step_dirs(out) == ["step_00000002"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert not (out / "summary.json").exists()
    state = load_file(str(out / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values())
    assert max(r["step"] for r in records(out) if "loss" in r) == 3


# ----------------------------------------------------------------------------------------------
# Error paths through the CLI


@pytest.fixture
def data_copy(data_dir, tmp_path) -> Path:
    d = tmp_path / "data_copy"
    shutil.copytree(data_dir, d)
    return d


def _expect_error(capsys, cfg, *overrides, flags=()) -> str:
    assert train_cli(cfg, *overrides, flags=flags) == 2
    return one_line_error(capsys.readouterr().err)


def test_error_bad_config_key(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", data_dir, out)
    line = _expect_error(capsys, cfg, "train.stepz=3")
    assert "train.stepz" in line and "'train.steps'" in line
    bad = base_config(data_dir, out)
    bad["optim"]["lrr"] = 0.1
    cfg2 = tmp_path / "bad.yaml"
    cfg2.write_text(yaml.safe_dump(bad))
    line = _expect_error(capsys, cfg2)
    assert "optim.lrr" in line and "'optim.lr'" in line
    assert not out.exists()


def test_error_missing_data_folder(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "nope", out)
    line = _expect_error(capsys, cfg)
    assert "data folder not found" in line and "nope" in line
    assert not out.exists()


def test_error_missing_meta(data_copy, tmp_path, capsys):
    (data_copy / "meta.json").unlink()
    out = tmp_path / "run"
    line = _expect_error(capsys, write_config(tmp_path / "c.yaml", data_copy, out))
    assert "meta.json" in line
    assert not out.exists()


def test_error_empty_data(data_copy, tmp_path, capsys):
    for p in data_copy.glob("train_*.bin"):
        p.unlink()
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", data_copy, out)
    line = _expect_error(capsys, cfg)
    assert "train" in line and "shards" in line
    write_shard(data_copy / "train_000.bin", np.zeros(0, dtype=np.int64), VOCAB)  # present but empty
    line = _expect_error(capsys, cfg)
    assert "train split" in line and "empty" in line
    assert not out.exists()


def test_error_seq_len_longer_than_val_split(data_copy, tmp_path, capsys):
    for p in data_copy.glob("val_*.bin"):
        p.unlink()
    write_shard(data_copy / "val_000.bin", np.arange(20, dtype=np.int64), VOCAB)  # < seq_len + 1 tokens
    out = tmp_path / "run"
    line = _expect_error(capsys, write_config(tmp_path / "c.yaml", data_copy, out))
    assert f"sequence length {SEQ} is longer than the data" in line and "val" in line
    assert not out.exists()


def test_error_vocab_mismatch(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    line = _expect_error(capsys, write_config(tmp_path / "c.yaml", data_dir, out), "model.vocab_size=256")
    assert "vocabulary mismatch" in line and "512" in line and "256" in line
    assert not out.exists()


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("finished")
    out = root / "run"
    cfg = write_config(root / "c.yaml", data_dir, out, train={"steps": 4, "save_every": 2})
    assert train_cli(cfg) == 0
    return cfg, out


CORRUPTIONS = {
    "truncated": lambda b: b[: len(b) // 2],
    "empty": lambda b: b"",
    "same size": lambda b: b[:100] + bytes(x ^ 0xFF for x in b[100:200]) + b[200:],  # undetectable by size
}


def _corrupt_copy(finished_run, tmp_path, victim, how):
    cfg_src, src = finished_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(cfg_src.read_text().replace(str(src), str(out)))
    f = out / "checkpoints" / "step_00000004" / victim
    f.write_bytes(CORRUPTIONS[how](f.read_bytes()))
    return cfg, out


@pytest.mark.parametrize("victim,how", [("model.safetensors", "truncated"), ("model.safetensors", "same size"),
                                        ("optimizer.pt", "empty"), ("trainer_state.pt", "empty")])
def test_error_resume_from_corrupt_checkpoint(finished_run, tmp_path, capsys, victim, how):
    """Resuming from a named corrupt checkpoint: one line naming the file, nothing written."""
    cfg, out = _corrupt_copy(finished_run, tmp_path, victim, how)
    before = snapshot(out)
    line = _expect_error(capsys, cfg, flags=("--resume", str(out / "checkpoints" / "step_00000004")))
    assert "corrupt" in line and victim in line
    assert snapshot(out) == before  # nothing overwritten, nothing added


@pytest.mark.parametrize("victim,how", [("model.safetensors", "truncated"), ("model.safetensors", "same size"),
                                        ("optimizer.pt", "empty"), ("trainer_state.pt", "empty")])
def test_resume_auto_falls_back_past_a_corrupt_newest_checkpoint(finished_run, tmp_path, capsys, victim, how):
    """--resume auto: a one-line warning naming the damage, then the run goes on from step 2 and ends with
    the weights of the uninterrupted run (the damaged step folder is replaced, not trusted)."""
    cfg, out = _corrupt_copy(finished_run, tmp_path, victim, how)
    assert train_cli(cfg, flags=("--resume", "auto")) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("warning: ") and victim in err[0] and "step_00000002" in err[0]
    start = [r for r in records(out) if r.get("event") == "start"][-1]
    assert start["resumed_from"].endswith("step_00000002")
    w_ref, w_run = weights(finished_run[1]), weights(out)
    for k in w_ref:
        assert torch.equal(w_ref[k], w_run[k]), k
    ckpt_io.verify(out / "checkpoints" / "step_00000004")


def test_error_paths_in_a_real_process(data_dir, tmp_path):
    """Exit code 2 and one line, no traceback, from a real `python -m dualpath train` process."""
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", data_dir, out)
    p = subprocess.run([PY, "-m", "dualpath", "train", str(cfg), "model.vocab_size=256"], env=sub_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "vocabulary mismatch" in one_line_error(p.stderr)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# The demo, shortened


@pytest.mark.slow
def test_quick_demo(tmp_path):
    from dualpath.experiments.demo import ARMS, QUICK_TOKENS, run_demo

    lines = []
    result = run_demo(tmp_path / "demo", quick=True, log=lambda *a: lines.append(" ".join(map(str, a))))
    results = result["results"]
    assert [r["arch"] for r in results] == ["wide", "loop", "dual"] == [a[1] for a in ARMS]
    cats = json.loads((tmp_path / "demo" / "results.json").read_text())[0]["categories"]
    assert {"recall", "all"} <= set(cats)
    for r in results:
        assert math.isfinite(r["val_bpb"]) and 0 < r["val_bpb"] < 20
        for cat, c in r["categories"].items():
            # accuracy is a count over the category's examples
            assert c["accuracy"] * c["n"] == pytest.approx(round(c["accuracy"] * c["n"]), abs=1e-9), cat
        assert Path(r["checkpoint"], "model.safetensors").is_file()
    # equal tokens: each arm ran ceil(tokens / tokens per step) whole steps and spent exactly
    # train_flops_per_token(seq_len) * tokens, recomputed here from the checkpoint's model and config
    fpts = []
    for r in results:
        model, cfg, ckpt = ckpt_io.load_model(r["checkpoint"])
        run_dir = tmp_path / "demo" / r["arch"]
        assert ckpt == ckpt_io.resolve(run_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
        start = records(run_dir)[0]
        fpt = model.train_flops_per_token(cfg.model.seq_len)
        fpts.append(fpt)
        tokens_per_step = cfg.data.batch_size * cfg.train.grad_accum * cfg.model.seq_len
        assert cfg.train.tokens == QUICK_TOKENS and not cfg.train.steps and not cfg.train.target_flops
        assert start["train_flops_per_token"] == pytest.approx(fpt, rel=1e-12)
        assert start["tokens_per_step"] == tokens_per_step and start["total_steps"] == summary["step"]
        assert summary["step"] == math.ceil(QUICK_TOKENS / tokens_per_step)
        assert r["tokens"] == summary["tokens"] == summary["step"] * tokens_per_step == results[0]["tokens"]
        assert r["train_flops"] == summary["flops"] == pytest.approx(fpt * r["tokens"], rel=1e-12)
        assert r["flops_per_token"] * 3 == pytest.approx(fpt, rel=1e-12)
    # matched FLOPs per token: within 2.5% of PureWide (width multiples of 8)
    assert max(abs(f / fpts[0] - 1) for f in fpts) < 0.025
    # routing: the dual model reports gates and deep share per layer and category, the loop expected steps
    dual, loop, wide = results[2]["routing"], results[1]["routing"], results[0]["routing"]
    n_layers = len(dual["recall"]["layers"])
    for layer in dual["recall"]["layers"]:
        assert {"gate_deep", "gate_wide", "rho_deep", "expected_steps"} <= set(layer)
        assert 0 < layer["gate_deep"] < 1 and 0 <= layer["rho_deep"] <= 1 and 1 <= layer["expected_steps"] <= 2
    assert all(set(layer) == {"expected_steps"} for layer in loop["recall"]["layers"])
    assert all(not layer for layer in wide["recall"]["layers"]) and n_layers == 4
    assert (tmp_path / "demo" / "results.json").is_file() and (tmp_path / "demo" / "demo.png").is_file()
    assert "| model |" in result["table"] and any("[4/4]" in ln for ln in lines)
    assert "ρ_d" in result["routing"] and "E[steps]" in result["routing"]


def test_demo_tokens_flag_is_checked_before_anything_is_written(tmp_path, capsys):
    from dualpath.cli import main

    assert main(["demo", "--out", str(tmp_path / "demo"), "--tokens", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tokens" in err[0] and not (tmp_path / "demo").exists()


@pytest.mark.slow
def test_demo_trains_every_model_on_the_tokens_asked_for(tmp_path):
    from dualpath.cli import main

    assert main(["demo", "--out", str(tmp_path / "demo"), "--quick", "--tokens", "4096"]) == 0
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert [r["tokens"] for r in results] == [4096] * 3  # 2 steps of 16 x 128 tokens each

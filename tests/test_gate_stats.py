"""Routing statistics in the training log: at every eval, the eval record of metrics.jsonl (and TensorBoard) holds
per-layer gate means / stds / entropies, the deep share ρ_d and the expected loop steps over the val windows.

Each run trains a tiny model a few steps through the real CLI (`dualpath train`), then the logged values are
checked against the analysis pipeline (`capture_ids` + `layer_means` / `collapse_diagnostics`, what
`dualpath analyze` runs) on the saved checkpoint and the very same val windows. Two runs have 2 gloo ranks (DDP,
and FSDP2, marked slow) and an odd number of eval batches, so one rank runs a spare forward: the sums across
ranks.

Tiny models (d_model 32, 2 layers, T = 32, vocab 512), CPU, fp32, fixed seeds; one intra-op thread, so the
forwards of the trainer and of the analysis are the same computation.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dualpath import checkpoint as ckpt_io
from dualpath.analysis import binary_entropy as np_binary_entropy
from dualpath.analysis import capture_ids, collapse_diagnostics, deep_share as np_deep_share, layer_means
from dualpath.analysis.aggregate import nanstd
from dualpath.cli import main as cli_main
from dualpath.data.loader import Batches
from dualpath.data.prepare import prepare
from dualpath.model import LMOutput, binary_entropy, deep_share

from helpers import one_thread  # noqa: F401  (autouse: one intra-op thread)

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
SEQ, VOCAB, B, LAYERS, K = 32, 512, 4, 2, 2
MODEL = dict(vocab_size=VOCAB, d_model=32, n_layers=LAYERS, n_heads=2, n_kv_heads=2, seq_len=SEQ, d_ffn_deep=64,
             d_ffn_wide=128, ffn_multiple=16, K=K, max_loops=4)
DUAL_STATS = ("deep_mean", "deep_std", "wide_mean", "wide_std", "entropy_deep", "entropy_wide", "rho_deep",
              "expected_steps")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"shared data not present: {SHAKESPEARE}")
    root = tmp_path_factory.mktemp("gate_stats_data")
    (root / "s.txt").write_text(SHAKESPEARE.read_text(encoding="utf-8")[:120_000], encoding="utf-8")
    prepare([str(root / "s.txt")], root / "prepared", vocab_size=VOCAB, max_tokens=30_000, val_fraction=0.1,
            progress=False)
    return root / "prepared"


def write_config(tmp: Path, data: Path, arch: str, name: str, **train) -> tuple[Path, Path]:
    out = tmp / name
    cfg = {"model": {"arch": arch, **MODEL},
           "data": {"path": str(data), "batch_size": B},
           "optim": {"lr": 2e-2, "min_lr": 2e-3, "warmup_steps": 1},
           "train": {"out_dir": str(out), "seed": 5, "steps": 4, "device": "cpu", "dtype": "float32",
                     "log_every": 1, "eval_every": 2, "eval_batches": 3, "save_every": 2, "keep_last": 4,
                     "progress": False, "tensorboard": False, "peak_flops": 1e12, **train}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path, out


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def eval_records(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in records(run) if "val_loss" in r}


def gate_keys(rec: dict) -> set[str]:
    return {k for k in rec if k.startswith("gates/")}


def analysis_stats(ckpt: Path, data: Path, seed: int, eval_batches: int) -> dict[str, float]:
    """The logged statistics recomputed by the analysis pipeline on checkpoint `ckpt`, over the trainer's val
    windows (those `evaluate_split` reads: batches of B from window 0), each window one document without BOS."""
    model, _, _ = ckpt_io.load_model(ckpt)
    batches = Batches(str(data), SEQ, seed, VOCAB)
    n = batches.val_sampler.n_windows
    docs = []
    for i in range(min(eval_batches, math.ceil(n / B))):
        x, _ = batches.get("val", i * B, min(B, n - i * B), "cpu")
        docs += [row.numpy() for row in x]
    cap = capture_ids(model, docs, bos=None, chunk_len=SEQ, batch_size=B)
    assert cap["ids"].size == len(docs) * SEQ
    out = {}
    for row in layer_means(cap):
        i = row["layer"]
        if "gate_deep" in cap:
            out[f"gates/{i}/deep_mean"] = row["gate_deep"]
            out[f"gates/{i}/deep_std"] = nanstd(cap["gate_deep"][i])
            out[f"gates/{i}/wide_mean"] = row["gate_wide"]
            out[f"gates/{i}/wide_std"] = nanstd(cap["gate_wide"][i])
            out[f"gates/{i}/rho_deep"] = row["rho_deep"]
        if "expected_steps" in cap:
            out[f"gates/{i}/expected_steps"] = row["expected_steps"]
    for row in collapse_diagnostics(cap):
        out[f"gates/{row['layer']}/entropy_deep"] = row["gate_entropy_deep"]
        out[f"gates/{row['layer']}/entropy_wide"] = row["gate_entropy_wide"]
    return out


def assert_matches_analysis(logged: dict, expected: dict):
    assert gate_keys(logged) == set(expected)
    for key, want in expected.items():
        # ρ_d: the analysis rounds it to float32 (error < 2^-25 for ρ_d < 1); the log sums the float64 values.
        # The rest are the same float64 sums in another order.
        tol = 3e-8 if key.endswith("rho_deep") else 1e-11
        assert logged[key] == pytest.approx(want, rel=0, abs=tol), key


# ----------------------------------------------------------------------------------------------
# Through the trainer


def test_dual_run_logs_gate_stats_equal_to_the_analysis(data_dir, tmp_path):
    cfg, out = write_config(tmp_path, data_dir, "dual", "dual", tensorboard=True)
    assert cli_main(["train", str(cfg)]) == 0
    evals = eval_records(out)
    assert sorted(evals) == [2, 4]
    want_keys = {f"gates/{i}/{s}" for i in range(LAYERS) for s in DUAL_STATS}
    for step, rec in evals.items():
        assert gate_keys(rec) == want_keys
        assert rec["val_tokens"] == 3 * B * SEQ
        for i in range(LAYERS):
            for s in ("deep_mean", "wide_mean", "rho_deep"):
                assert 0 < rec[f"gates/{i}/{s}"] < 1
            assert 0 <= rec[f"gates/{i}/deep_std"] < 0.5 and 0 <= rec[f"gates/{i}/entropy_deep"] <= 1
            assert 1 <= rec[f"gates/{i}/expected_steps"] <= K
        # the same checkpoint (saved right after the eval), the same windows, the analysis's definitions
        ckpt = out / "checkpoints" / f"step_{step:08d}"
        assert_matches_analysis(rec, analysis_stats(ckpt, data_dir, seed=5, eval_batches=3))
    # the gates start at exactly 0.5 (std 0, entropy 1 bit) and have moved by the evals
    for i in range(LAYERS):
        assert evals[4][f"gates/{i}/deep_mean"] != evals[2][f"gates/{i}/deep_mean"]
        assert evals[4][f"gates/{i}/deep_std"] > 0 and evals[4][f"gates/{i}/entropy_deep"] < 1
    # the per-log-step summary on one training window stays; the eval statistics are in eval records only
    for r in records(out):
        if "loss" in r:
            assert {f"gate_deep/{i}" for i in range(LAYERS)} <= r.keys() and not gate_keys(r)
    assert {k for k in json.loads((out / "summary.json").read_text()) if k.startswith("gates/")} == want_keys

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert want_keys <= set(acc.Tags()["scalars"])
    events = acc.Scalars("gates/1/rho_deep")
    assert [e.step for e in events] == [2, 4]
    assert events[-1].value == pytest.approx(evals[4]["gates/1/rho_deep"], rel=1e-6)


@pytest.mark.parametrize("arch", ["loop", "wide"])
def test_loop_run_logs_expected_steps_only_and_wide_run_no_gate_stats(arch, data_dir, tmp_path):
    cfg, out = write_config(tmp_path, data_dir, arch, arch, steps=2, eval_batches=2)
    assert cli_main(["train", str(cfg)]) == 0
    evals = eval_records(out)
    assert sorted(evals) == [2]
    rec = evals[2]
    if arch == "wide":
        assert not any(k.startswith("gate") for r in records(out) for k in r)
        return
    assert gate_keys(rec) == {f"gates/{i}/expected_steps" for i in range(LAYERS)}
    assert all(1 <= rec[k] <= K for k in gate_keys(rec))
    assert_matches_analysis(rec, analysis_stats(out, data_dir, seed=5, eval_batches=2))


@pytest.mark.parametrize("fsdp", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["ddp", "fsdp"])
def test_two_ranks_sum_the_stats_over_ranks_and_spare_forwards(fsdp, data_dir, tmp_path):
    """2 ranks, 3 eval batches: rank 0 scores batches 0 and 2, rank 1 batch 1 and a spare forward that counts 0."""
    cfg, out = write_config(tmp_path, data_dir, "dual", "ranks", steps=2, save_every=0, fsdp=fsdp)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dualpath", "train", str(cfg)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if p.returncode != 0 and ("address already in use" in p.stderr.lower() or "rendezvous" in p.stderr.lower()):
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # a port taken meanwhile
    assert p.returncode == 0, p.stdout + p.stderr
    rec = eval_records(out)[2]
    assert rec["val_tokens"] == 3 * B * SEQ
    assert_matches_analysis(rec, analysis_stats(out, data_dir, seed=5, eval_batches=3))


# ----------------------------------------------------------------------------------------------
# The model's sums and the single definitions


def test_sums_over_batches_equal_the_stats_of_the_whole_and_skip_nan():
    from dualpath.model import DualPathLM, ModelConfig

    torch.manual_seed(0)
    model = DualPathLM(ModelConfig(arch="dual", **MODEL)).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.gate.W_g.normal_(0, 1.0)
            layer.deep.step_gain.fill_(0.0)
            layer.wide.beta.fill_(0.0)
    x = torch.randint(0, VOCAB, (5, SEQ), generator=torch.Generator().manual_seed(1))
    whole = model.summary_from_sums(model.summary_sums(model(x, return_diagnostics=True)))
    parts: dict = {}
    for xb in (x[:2], x[2:]):
        for k, v in model.summary_sums(model(xb, return_diagnostics=True)).items():
            parts[k] = parts.get(k, 0.0) + v
    split = model.summary_from_sums(parts)
    assert split.keys() == whole.keys() == {f"gates/{i}/{s}" for i in range(LAYERS) for s in DUAL_STATS}
    for k in whole:
        assert split[k] == pytest.approx(whole[k], rel=1e-12, abs=1e-12), k
    diag = model(x, return_diagnostics=True).diagnostics[1]
    g = diag["gate_deep"].double()
    assert whole["gates/1/deep_mean"] == pytest.approx(g.mean().item(), rel=1e-12)
    assert whole["gates/1/deep_std"] == pytest.approx(g.std(correction=0).item(), rel=1e-9)
    assert whole["gates/1/deep_std"] > 0.01

    # NaN values are skipped per statistic (as the analysis's nanmean): a position whose ρ_d is 0/0, a NaN gate
    one = {"gate_deep": torch.tensor([[0.5, 0.25, math.nan]]), "gate_wide": torch.tensor([[0.5, 0.5, 0.5]]),
           "delta_norm_deep": torch.tensor([[0.0, 2.0, 1.0]]), "delta_norm_wide": torch.tensor([[0.0, 1.0, 1.0]]),
           "expected_steps": torch.tensor([[1.0, 2.0, 1.5]])}
    st = model.summary_from_sums(model.summary_sums(LMOutput(logits=torch.zeros(1), diagnostics=[one])))
    assert st["gates/0/deep_mean"] == pytest.approx(0.375) and st["gates/0/deep_std"] == pytest.approx(0.125)
    assert st["gates/0/wide_mean"] == pytest.approx(0.5) and st["gates/0/wide_std"] == 0
    assert st["gates/0/entropy_deep"] == pytest.approx((1 + 0.8112781244591328) / 2)
    assert st["gates/0/entropy_wide"] == pytest.approx(1.0)  # the NaN-gate position is left out of both
    assert st["gates/0/rho_deep"] == pytest.approx(0.5)  # only position 1 has a ρ_d: 0.5·2 / (0.5·2 + 0.5·1)
    assert st["gates/0/expected_steps"] == pytest.approx(1.5)
    empty = model.summary_from_sums({k: 0.0 for k in model.summary_sums(LMOutput(torch.zeros(1), diagnostics=[one]))})
    assert all(math.isnan(v) for v in empty.values())


def test_the_analysis_uses_the_model_definitions():
    p = np.array([0.0, 0.11, 0.5, 0.9, 1.0, math.nan])
    h = np_binary_entropy(p)
    assert h.dtype == np.float64 and np.array_equal(h, binary_entropy(torch.from_numpy(p)).numpy(), equal_nan=True)
    np.testing.assert_allclose(h[:5], [0.0, 0.4999160, 1.0, 0.4689956, 0.0], atol=1e-6)
    assert math.isnan(h[5]) and not np.signbit(h[0])
    gd, gw = np.array([0.5, 0.0, 1.0]), np.array([0.5, 0.0, 0.0])
    nd, nw = np.array([3.0, 1.0, 0.0]), np.array([1.0, 1.0, 2.0])
    rho = np_deep_share(gd, gw, nd, nw)
    assert rho.dtype == np.float32
    np.testing.assert_array_equal(rho, deep_share(*map(torch.from_numpy, (gd, gw, nd, nw))).float().numpy())
    assert rho[0] == pytest.approx(0.75) and math.isnan(rho[1]) and math.isnan(rho[2])

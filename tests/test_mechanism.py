"""The mechanism tooling: routing by category, the tokens protocol, the dose-response sweep, the study."""

import csv
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dualpath import ModelConfig
from dualpath.analysis.by_category import answer_positions, routing_by_category, seed_intervals
from dualpath.cli import main
from dualpath.data.tokenizer import eos_id, train_tokenizer
from dualpath.experiments.sweep import load_sweep, plan

from helpers import perturb_


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["zamo : 41\nkelu : 7\n3 + 4 = 7 ; b = a ; a = 5 ; b ?"] * 50, vocab_size=300)


def _examples():
    texts = [("recall", "zamo : ", "41"), ("recall", "kelu : ", "7"), ("chain", "3 + 4 = ", "7"),
             ("chain", "b = a ; a = 5 ; b ? ", "5")]
    return [{"category": c, "text": p + a, "prompt": p, "answer": a, "answer_start": len(p),
             "answer_end": len(p) + len(a)} for c, p, a in texts]


def test_routing_by_category_equals_the_model_diagnostics_at_answer_producing_positions(tok):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="dual", vocab_size=320, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, seq_len=32,
                      d_ffn_deep=64, d_ffn_wide=128, ffn_multiple=16, K=2)
    model = cfg.build().eval()
    perturb_(model, 3)  # gates away from 0.5
    exs = _examples()
    got = routing_by_category(model, tok, exs)
    # independently: one forward per example, with EOS first; the position before each answer token
    want: dict = {}
    for ex in exs:
        enc = tok.encode(ex["text"])
        ids = [eos_id(tok)] + enc.ids
        with torch.no_grad():
            diags = model(torch.tensor([ids]), return_diagnostics=True).diagnostics
        for j, (s, e) in enumerate(enc.offsets):
            if e > ex["answer_start"] and s < ex["answer_end"]:  # an answer token; predicted at input j
                for li, d in enumerate(diags):
                    rec = want.setdefault(ex["category"], {}).setdefault(li, {"gate_deep": [], "rho": []})
                    rec["gate_deep"].append(float(d["gate_deep"][0, j]))
                    gd, gw = d["gate_deep"][0, j].double(), d["gate_wide"][0, j].double()
                    nd, nw = d["delta_norm_deep"][0, j].double(), d["delta_norm_wide"][0, j].double()
                    rec["rho"].append(float(gd * nd / (gd * nd + gw * nw)))
    for cat, layers in want.items():
        n = len(layers[0]["gate_deep"])
        assert got[cat]["positions"] == n > 0
        for li, rec in layers.items():
            assert got[cat]["layers"][li]["gate_deep"] == pytest.approx(np.mean(rec["gate_deep"]), rel=1e-5)
            assert got[cat]["layers"][li]["rho_deep"] == pytest.approx(np.mean(rec["rho"]), rel=1e-5)
    assert got["recall"]["layers"][0]["gate_deep"] != pytest.approx(0.5, abs=1e-3)


def test_answer_positions_mark_the_input_before_each_answer_token(tok):
    ex = _examples()[0]
    ids, predicts = answer_positions(tok, ex)
    enc = tok.encode(ex["text"])
    answer = [e > ex["answer_start"] and s < ex["answer_end"] for s, e in enc.offsets]
    assert ids == enc.ids and predicts.tolist() == answer[1:] + [False]
    assert predicts.sum() == sum(answer) - answer[0]


def test_seed_intervals_are_the_t_interval():
    st = seed_intervals([1.0, 2.0, 4.0])
    sd = statistics.stdev([1.0, 2.0, 4.0])
    assert st["mean"] == pytest.approx(7 / 3) and st["std"] == pytest.approx(sd)
    assert st["ci95"] == pytest.approx(4.303 * sd / 3 ** 0.5) and st["n"] == 3
    assert np.isnan(seed_intervals([1.0])["ci95"])


# ----------------------------------------------------------------------------------------------


def _dial_sweep(tmp_path, **extra):
    cfg = {
        "name": "dose", "out_dir": str(tmp_path / "dose"), "budgets": [2.0e5], "match": "true", "multiple": 8,
        "build_multiple": 8, "tokens": [1024], "seeds": [0, 1], "protocol": "tokens",
        "arms": [{"arch": "wide"}, {"arch": "loop", "K": [2]}],
        "synthetic": {"dial": "recall_facts", "values": [20, 40],
                      "settings": {"mix_facts": 0, "mix_arith": 0, "mix_programs": 0, "mix_gsm": 0, "mix_recall": 1,
                                   "mix_chain": 1, "chain_steps_min": 1, "chain_steps_max": 2},
                      "vocab_size": 300, "max_tokens": 20000, "eval_per_category": 8},
        "eval_limit": 8,
        "base": {"model": {"vocab_size": 320, "d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1,
                           "seq_len": 32},
                 "data": {"batch_size": 4}, "optim": {"warmup_steps": 2},
                 "train": {"log_every": 4, "eval_every": 0, "save_every": 0, "eval_batches": 2, "progress": False,
                           "tensorboard": False}},
    }
    cfg.update(extra)
    path = tmp_path / "dose.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_tokens_protocol_gives_every_arm_the_same_tokens(tmp_path):
    sweep = load_sweep(_dial_sweep(tmp_path))
    runs = plan(sweep)
    assert len(runs) == 2 * 2 * 2  # dial values x arms x seeds
    for r in runs:
        assert r.config.train.tokens == 1024 and not r.config.train.target_flops and r.tokens == 1024
        assert r.target_flops == pytest.approx(3 * r.flops_per_token * 1024)
        assert r.config.data.path.endswith(f"recall_facts={r.dial_value:g}")
        assert r.folder.startswith(f"recall_facts={r.dial_value:g}/F2e+05/")
    wide = next(r for r in runs if r.arch == "wide")
    assert wide.flops_ratio == 1.0
    assert len({r.config.train.out_dir for r in runs}) == len(runs)


@pytest.mark.parametrize("extra, words", [
    ({"protocol": "steps"}, "sweep.protocol"),
    ({"protocol": "tokens", "tokens": [1024, 2048], "budgets": [2e5, 4e5]}, "same tokens"),
])
def test_bad_protocols_are_one_line_errors(tmp_path, capsys, extra, words):
    assert main(["sweep", str(_dial_sweep(tmp_path, **extra)), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]
    assert not (tmp_path / "dose").exists()


def test_a_bad_dial_is_refused_before_any_file_is_written(tmp_path, capsys):
    path = _dial_sweep(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["synthetic"]["dial"] = "recall_fact"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "recall_fact" in err[0] and "recall_facts" in err[0]
    assert not (tmp_path / "dose").exists()


@pytest.mark.slow
def test_dose_response_sweep_prepares_trains_and_draws(tmp_path):
    path = _dial_sweep(tmp_path)
    assert main(["sweep", str(path)]) == 0
    out = tmp_path / "dose"
    for v in (20, 40):
        meta = json.loads((out / "data" / f"recall_facts={v}" / "meta.json").read_text())
        assert meta["vocab_size"] <= 300
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 8 and {r["dial"] for r in rows} == {"20.0", "40.0"}
    assert {int(r["tokens"]) for r in rows} == {1024}
    dose = json.loads((out / "dose_response.json").read_text())
    # the capacity panel: mean and std over seeds of each arm's recall accuracy at each dial value
    for arm, points in dose["capacity"]["points"].items():
        for x, mean, sd, n in points:
            vals = [float(r["recall/acc"]) for r in rows if r["arm"] == arm and float(r["dial"]) == x]
            assert n == 2 and mean == pytest.approx(statistics.mean(vals))
            assert sd == pytest.approx(statistics.stdev(vals))
    # the compute panel: per chain step count, pooled over dial values and seeds
    for arm, points in dose["compute"]["points"].items():
        assert [x for x, *_ in points] == [1.0, 2.0]
        for x, mean, sd, n in points:
            vals = [float(r[f"chain@steps={x:g}/acc"]) for r in rows if r["arm"] == arm]
            assert n == 4 and mean == pytest.approx(statistics.mean(vals))
    assert (out / "dose_response.png").is_file()
    md = (out / "results.md").read_text()
    assert "### recall_facts = 20, Budget" in md and "protocol: tokens" in md


@pytest.mark.slow
def test_mechanism_command_writes_consistent_tables(tmp_path):
    out = tmp_path / "mech"
    assert main(["mechanism", str(out), "--quick", "--seeds", "0,1", "--tokens", "4096", "--skip-gate-study",
                 "--world-seed", "0"]) == 0
    res = json.loads((out / "routing.json").read_text())
    per_seed, summary = res["per_seed"], res["summary"]
    assert set(per_seed) == {"wide", "loop", "dual"}
    for arch, by_seed in per_seed.items():
        for cat, st in summary[arch]["accuracy"].items():
            vals = [by_seed[s]["categories"][cat]["accuracy"] for s in ("0", "1")]
            assert st["mean"] == pytest.approx(statistics.mean(vals)) and st["n"] == 2
        assert {by_seed[s]["tokens"] for s in by_seed} == {per_seed["wide"]["0"]["tokens"]}
    for cat, st in summary["dual"]["paired_vs_wide"]["answer_bits"].items():
        d = [per_seed["dual"][s]["categories"][cat]["answer_bits"] - per_seed["wide"][s]["categories"][cat]["answer_bits"]
             for s in ("0", "1")]
        assert st["mean"] == pytest.approx(statistics.mean(d))
    assert set(summary["dual"]["forced"]) == {"deep-favoured", "wide-favoured", "swapped", "share-shuffled",
                                              "deep-only", "wide-only", "shuffled"}
    md = (out / "routing.md").read_text()
    assert "cost of forcing the gates" in md and "| recall | ρ_d |" in md
    assert "| deep-favoured (keeps g_d + g_w) |" in md and "| deep-only (rescales the residual) |" in md
    # a second call reuses every finished run
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")}
    assert main(["mechanism", str(out), "--quick", "--seeds", "0,1", "--tokens", "4096", "--skip-gate-study",
                 "--world-seed", "0"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("summary.json")} == stamps


def test_the_shipped_dose_response_sweep_is_the_demos_setup():
    from dualpath.experiments.demo import BACKBONE, BUDGET, DEMO_SYNTHETIC, TOKENS, solve_arms
    from dualpath.experiments.sweep import load_sweep, mismatches, plan

    sweep = load_sweep(Path(__file__).parent.parent / "configs/sweeps/mechanism_dose_response.yaml")
    assert sweep.synthetic.settings == DEMO_SYNTHETIC and sweep.synthetic.dial == "recall_facts"
    assert sweep.budgets == [BUDGET] and sweep.tokens == [TOKENS] and sweep.protocol == "tokens"
    assert sweep.seeds == [0, 1, 2] and len(sweep.synthetic.values) >= 3
    runs = plan(sweep)
    assert len(runs) == 3 * 3 * len(sweep.synthetic.values) and not mismatches(runs)
    demo = {r["config"].arch: r["config"] for r in solve_arms()}
    for r in runs:  # the demo's models, widths included
        assert r.config.model == demo[r.config.model.arch] and r.tokens == TOKENS, r.folder
        assert r.config.model.d_model == BACKBONE["d_model"] and r.config.model.seq_len == BACKBONE["seq_len"]


@pytest.mark.slow
def test_gate_study_applies_one_knob_at_a_time_and_reuses_the_routing_baseline(tmp_path):
    out = tmp_path / "mech"
    assert main(["mechanism", str(out), "--quick", "--seeds", "0", "--tokens", "4096", "--world-seed", "0"]) == 0
    res = json.loads((out / "gate_study.json").read_text())
    from dualpath.experiments.mechanism import GATE_STUDY
    assert [r["variant"] for r in res] == [name for name, _ in GATE_STUDY]
    by = {r["variant"]: r for r in res}
    # the baseline is the routing study's Dual seed-0 run, not a second training
    assert not (out / "gate_study" / "baseline").exists()
    routing_dual = json.loads((out / "routing" / "dual" / "seed0" / "summary.json").read_text())
    assert by["baseline"]["val_loss"] == routing_dual["val_loss"]
    assert by["3x tokens"]["tokens"] == 3 * by["baseline"]["tokens"]
    # each variant's run carries its knob and nothing else
    cfg = {p.parent.name: yaml.safe_load((p.parent / "config.yaml").read_text())
           for p in (out / "gate_study").glob("*/summary.json")}
    assert cfg["plain_init"]["model"]["init"] == "plain" and cfg["gate-gain_LR_x10"]["optim"]["gate_lr_mult"] == 10
    assert cfg["gate-gain_LR_x30"]["optim"]["gate_lr_mult"] == 30
    assert cfg["reference_decay"]["optim"]["decay_gates_and_norms"] is True
    assert cfg["reference_decay"]["optim"]["weight_decay"] == 0.3
    assert cfg["gain_start_0"]["model"]["branch_scale_init"] == 0
    base_cfg = yaml.safe_load((out / "routing" / "dual" / "seed0" / "config.yaml").read_text())
    assert base_cfg["model"]["init"] == "scaled" and base_cfg["optim"]["gate_lr_mult"] == 1
    assert cfg["plain_init"]["optim"] == base_cfg["optim"]
    md = (out / "gate_study.md").read_text()
    for name, _ in GATE_STUDY:
        assert md.count(f"| {name} | ") == 1, name
    for r in res:
        assert r["val_loss"] > 0 and r["trajectory"] and set(r["accuracy"]) == {"recall", "chain"}

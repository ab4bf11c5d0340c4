"""Config loading (YAML, dotted overrides, validation) and the `dualpath` command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dualpath import ConfigError, DualPathLM, ModelConfig, load_config
from dualpath.cli import main
from dualpath.config import RunConfig, apply_overrides, from_dict, load_yaml
from dualpath.solver import solve

DUALPATH_BIN = Path(sys.executable).parent / "dualpath"  # the console script of the venv running the tests

TINY_YAML = """\
model:
  arch: dual
  vocab_size: 128
  d_model: 32
  n_layers: 2
  n_heads: 4
  n_kv_heads: 2
  seq_len: 64
  d_ffn_deep: 96
  d_ffn_wide: 192
  ffn_multiple: 16
  K: 3
  max_loops: 6
"""


@pytest.fixture
def tiny_yaml(tmp_path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY_YAML)
    return p


def one_line(err: Exception | str) -> str:
    s = str(err)
    assert s and "\n" not in s, f"not one line: {s!r}"
    return s


# ----------------------------------------------------------------------------------------------
# Loading and overrides


def test_load_yaml_file(tiny_yaml):
    cfg = load_config(RunConfig, tiny_yaml)
    m = cfg.model
    assert isinstance(m, ModelConfig)
    assert (m.arch, m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads) == ("dual", 128, 32, 2, 4, 2)
    assert (m.d_ffn_deep, m.d_ffn_wide, m.ffn_multiple, m.K, m.max_loops, m.seq_len) == (96, 192, 16, 3, 6, 64)
    # keys absent from the file keep their defaults
    assert m.rope_base == ModelConfig.rope_base and m.qk_norm is True and m.gate_mode == "two_gates"
    DualPathLM(m)  # a loaded config builds


def test_empty_yaml_gives_defaults(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    assert load_yaml(p) == {}
    with pytest.raises(ConfigError):  # defaults alone have no FFN widths: d_ffn_deep = 0
        load_config(RunConfig, p)
    cfg = load_config(RunConfig, p, ["model.d_ffn_deep=1024", "model.d_ffn_wide=2048"])
    assert cfg.model == ModelConfig(d_ffn_deep=1024, d_ffn_wide=2048)


def test_dotted_overrides_are_typed(tiny_yaml):
    cfg = load_config(RunConfig, tiny_yaml, [
        "model.d_model=64", "model.init_std=0.01", "model.rope_base=1e4", "model.qk_norm=false",
        "model.tie_embeddings=yes", "model.arch=loop", "model.K=4", "model.ponder_weight=0.5",
        "model.fixed_gate_deep=1", "model.n_layers=3.0"])
    m = cfg.model
    assert m.d_model == 64 and type(m.d_model) is int
    assert m.init_std == 0.01 and type(m.init_std) is float
    assert m.rope_base == 10000.0 and type(m.rope_base) is float
    assert m.qk_norm is False and m.tie_embeddings is True
    assert m.arch == "loop" and m.K == 4 and m.ponder_weight == 0.5
    assert m.fixed_gate_deep == 1.0 and type(m.fixed_gate_deep) is float
    assert m.n_layers == 3 and type(m.n_layers) is int
    # overrides win over the file, later overrides over earlier ones
    assert load_config(RunConfig, tiny_yaml, ["model.K=2", "model.K=5"]).model.K == 5


def test_overrides_apply_in_place_to_a_tree():
    cfg = RunConfig()
    out = apply_overrides(cfg, ["model.vocab_size=300", "model.gate_mode=softmax"])
    assert out is cfg and cfg.model.vocab_size == 300 and cfg.model.gate_mode == "softmax"


@pytest.mark.parametrize("override,unknown,nearest", [
    ("model.d_modle=64", "model.d_modle", "model.d_model"),
    ("model.n_head=4", "model.n_head", "model.n_heads"),
    ("model.max_loop=8", "model.max_loop", "model.max_loops"),
    ("modle.d_model=64", "modle", "model"),  # the first unknown part of the path is named
])
def test_unknown_override_key_names_nearest_valid_key(tiny_yaml, override, unknown, nearest):
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, tiny_yaml, [override])
    msg = one_line(e.value)
    assert f"'{unknown}'" in msg
    assert f"'{nearest}'" in msg


def test_unknown_yaml_key_names_nearest_valid_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(TINY_YAML + "  d_modle: 64\n")
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, p)
    msg = one_line(e.value)
    assert "model.d_modle" in msg and "'model.d_model'" in msg
    p.write_text("modl:\n  d_model: 64\n")
    with pytest.raises(ConfigError, match="'model'"):
        load_config(RunConfig, p)


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        from_dict(ModelConfig, {"zzzzzz": 1}, prefix="model.")
    msg = one_line(e.value)
    assert "model.zzzzzz" in msg and "d_model" in msg and "n_heads" in msg


@pytest.mark.parametrize("override,words", [
    ("model.n_heads=5", ["n_heads", "d_model"]),  # 5 does not divide 32
    ("model.n_kv_heads=3", ["n_kv_heads", "n_heads"]),  # 3 does not divide 4
    ("model.K=0", ["K"]),
    ("model.max_loops=2", ["max_loops", "K"]),  # K=3 in the file
    ("model.n_heads=32", ["head dim"]),  # head dim 1 is odd: no RoPE
    ("model.arch=transformer", ["model.arch"]),
    ("model.gate_mode=convx", ["convex"]),
    ("model.d_ffn_wide=0", ["d_ffn_wide"]),
    ("model.vocab_size=0", ["vocab_size"]),
    ("model.ponder_weight=-1", ["ponder_weight"]),
    ("model.rope_base=0", ["rope_base"]),
    ("train.seed=-1", ["train.seed", ">= 0"]),
])
def test_inconsistent_values_raise_one_line_config_error(tiny_yaml, override, words):
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, tiny_yaml, [override])
    msg = one_line(e.value)
    for w in words:
        assert w in msg


@pytest.mark.parametrize("override", [
    "model.d_model=abc", "model.d_model=64.5", "model.d_model=true", "model.d_model=[1, 2]",
    "model.init_std=small", "model.init_std=false", "model.qk_norm=maybe", "model.qk_norm=2",
    "model.arch={a: 1}", "model=3", "model.d_model.x=1", "model.K", "model.d_model=",
])
def test_wrong_types_raise_one_line_config_error(tiny_yaml, override):
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, tiny_yaml, [override])
    one_line(e.value)


@pytest.mark.parametrize("body", ["model:\n  d_model: [1, 2]\n", "model:\n  qk_norm: sometimes\n",
                                  "model: 7\n", "- a\n- b\n", "model:\n  d_model: 32\n   n_heads: 4\n"])
def test_bad_yaml_contents_raise_one_line_config_error(tmp_path, body):
    p = tmp_path / "bad.yaml"
    p.write_text(body)
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, p)
    one_line(e.value)


def test_missing_config_file_raises_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(RunConfig, tmp_path / "nope.yaml")


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError):
        ModelConfig(n_heads=5, d_ffn_deep=1, d_ffn_wide=1).validate()


# ----------------------------------------------------------------------------------------------
# CLI, in-process


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_solve_json_fields(capsys):
    code, out, err = run_cli(capsys, "solve", "--arch", "dual", "--K", "3", "--alpha", "0.5", "--json")
    assert code == 0 and err == ""
    r = json.loads(out)
    for key in ("d_ffn_deep", "d_ffn_wide", "hidden_deep", "hidden_wide", "params", "flops_paper_per_layer",
                "flops_true_per_token", "mismatch"):
        assert key in r
    # the paper row dual K=3 alpha=0.5 (defaults: d 768, 16 layers, 12 heads, vocab 50304, F_M 80e6)
    assert (r["d_ffn_deep"], r["d_ffn_wide"], r["hidden_deep"], r["hidden_wide"]) == (2752, 11392, 2048, 7680)
    assert round(r["params"] / 1e6) == 511
    ref = solve(ModelConfig(d_model=768, n_layers=16, n_heads=12, n_kv_heads=12, vocab_size=50304, seq_len=4096),
                80e6, "dual", K=3, alpha=0.5)
    for key in ("params", "flops_paper_per_layer", "flops_true_per_token", "mismatch"):
        assert r[key] == ref[key]
    assert r["mismatch"] == pytest.approx((r["flops_paper_per_layer"] - 80e6) / 80e6)


def test_solve_json_backbone_arguments(capsys):
    code, out, _ = run_cli(capsys, "solve", "--d-model", "256", "--n-layers", "4", "--n-heads", "4",
                           "--n-kv-heads", "2", "--vocab-size", "1000", "--budget", "12e6", "--arch", "loop",
                           "--K", "2", "--match", "true", "--seq-len", "512", "--multiple", "32",
                           "--build-multiple", "32", "--json")
    assert code == 0
    r = json.loads(out)
    bb = ModelConfig(d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=1000, seq_len=512)
    ref = solve(bb, 12e6, "loop", K=2, multiple=32, build_multiple=32, match="true", seq_len=512)
    assert r["d_ffn_deep"] == ref["d_ffn_deep"] and r["d_ffn_wide"] is None and r["params"] == ref["params"]
    assert r["match"] == "true" and r["seq_len"] == 512


def test_solve_table_prints_13_rows(capsys):
    code, out, err = run_cli(capsys, "solve", "--table")
    assert code == 0 and err == ""
    lines = out.strip().splitlines()
    rows = [ln for ln in lines if ln.startswith("|") and not ln.startswith(("| arch", "|---"))]
    assert len(rows) == 13
    assert sum(r.startswith("| PureWide") for r in rows) == 1
    assert sum(r.startswith("| PureLoop") for r in rows) == 3
    assert sum(r.startswith("| Dual") for r in rows) == 9
    assert "| 2752 | 11392 |" in out  # dual K=3 alpha=0.5


def test_solve_table_json(capsys):
    code, out, _ = run_cli(capsys, "solve", "--table", "--json")
    assert code == 0
    rows = json.loads(out)
    assert len(rows) == 13 and all("config" not in r for r in rows)


def test_info_json(capsys, tiny_yaml):
    code, out, err = run_cli(capsys, "info", str(tiny_yaml), "--json")
    assert code == 0 and err == ""
    info = json.loads(out)
    cfg = load_config(RunConfig, tiny_yaml).model
    model = DualPathLM(cfg)
    assert info["arch"] == "dual" and info["seq_len"] == 64
    assert info["params"] == model.param_counts()
    assert info["params"]["total"] == sum(p.numel() for p in model.parameters())
    assert info["flops_paper_per_layer"] == [layer.flops_per_token(64, "paper") for layer in model.layers]
    assert info["flops_paper_total"] == model.flops_per_token(64, "paper")
    assert info["flops_true_forward_per_token"] == model.flops_per_token(64, "true")
    assert info["flops_true_train_per_token"] == 3 * model.flops_per_token(64, "true")
    assert (info["hidden_deep"], info["hidden_wide"]) == (64, 128)


def test_info_with_overrides(capsys, tiny_yaml):
    code, out, _ = run_cli(capsys, "info", str(tiny_yaml), "model.arch=wide", "model.d_ffn_wide=384", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["arch"] == "wide" and info["hidden_deep"] is None and info["hidden_wide"] == 256


def test_info_human_readable(capsys, tiny_yaml):
    code, out, err = run_cli(capsys, "info", str(tiny_yaml))
    assert code == 0 and err == ""
    assert "arch=dual" in out and "deep=64" in out and "wide=128" in out


def test_info_of_a_wide_model_does_not_print_K(capsys, tiny_yaml):
    _, dual, _ = run_cli(capsys, "info", str(tiny_yaml))
    code, wide, err = run_cli(capsys, "info", str(tiny_yaml), "model.arch=wide")
    assert code == 0 and err == ""
    assert "  K=3  " in dual.splitlines()[0] and "K=" not in wide and "arch=wide" in wide


def test_solve_states_its_rounding_multiples(capsys):
    for argv in (["solve"], ["solve", "--table"], ["solve", "--build-multiple", "128", "--multiple", "32"]):
        code, out, _ = run_cli(capsys, *argv)
        multiple, build = ("32", "128") if "--multiple" in argv else ("64", "256")
        assert code == 0 and out.strip().splitlines()[-1] == (
            f"d_ffn solved in multiples of {multiple} (--multiple); the built SwiGLU hidden widths are multiples "
            f"of {build} (--build-multiple)")


def test_version(capsys):
    from dualpath import __version__

    assert run_cli(capsys, "--version") == (0, f"dualpath {__version__}\n", "")


def test_every_subcommands_help_shows_its_defaults(capsys):
    import argparse

    from dualpath.cli import build_parser

    def commands(parser, prefix=()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from commands(sub, prefix + (name,))
        if prefix:
            yield prefix, parser

    seen = 0
    for names, parser in commands(build_parser()):
        if names == ("lm-eval",):
            continue  # its --help is lm_eval's own
        code, out, _ = run_cli(capsys, *names, "--help")
        assert code == 0, names
        text = " ".join(out.split())
        for action in parser._actions:
            d = action.default
            if not action.option_strings or action.help == argparse.SUPPRESS or d in (None, argparse.SUPPRESS) \
                    or d is False or d == []:
                continue
            if "default" in (action.help or ""):
                continue  # its help text states it in words
            assert f"(default: {d})" in text, (names, action.option_strings, d)
            seen += 1
    assert seen > 50


def assert_one_line_error(code, out, err):
    assert code == 2
    assert out == ""
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error:")
    assert "Traceback" not in err
    return lines[0]


def test_cli_unknown_key_exits_2_with_one_line(capsys, tiny_yaml):
    line = assert_one_line_error(*run_cli(capsys, "info", str(tiny_yaml), "model.d_modle=64"))
    assert "model.d_modle" in line and "'model.d_model'" in line


def test_cli_unknown_key_in_yaml_exits_2(capsys, tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(TINY_YAML + "  n_head: 4\n")
    line = assert_one_line_error(*run_cli(capsys, "info", str(p)))
    assert "'model.n_heads'" in line


@pytest.mark.parametrize("argv", [
    ["solve", "--K", "abc"],
    ["solve", "--bogus"],
    ["solve", "--arch", "transformer"],
    ["solve", "--match", "exact"],
    ["frobnicate"],
    [],
    ["info"],
    ["solve", "--budget", "1e3"],  # too small: ConfigError from the solver
    ["solve", "--alpha", "1.5"],
    ["solve", "--n-heads", "5"],  # 5 does not divide 768
])
def test_cli_bad_arguments_exit_2_with_one_line(capsys, argv):
    assert_one_line_error(*run_cli(capsys, *argv))


def test_cli_missing_config_file_exits_2(capsys, tmp_path):
    line = assert_one_line_error(*run_cli(capsys, "info", str(tmp_path / "missing.yaml")))
    assert "missing.yaml" in line


def test_cli_bad_value_exits_2(capsys, tiny_yaml):
    line = assert_one_line_error(*run_cli(capsys, "info", str(tiny_yaml), "model.n_heads=5"))
    assert "n_heads" in line


# ----------------------------------------------------------------------------------------------
# CLI, as a real process (one call: exit code and stderr of the installed entry point)


@pytest.mark.skipif(not DUALPATH_BIN.exists(), reason="entry point not installed")
def test_installed_entry_point_exits_2_without_traceback(tmp_path):
    p = subprocess.run([str(DUALPATH_BIN), "info", str(tmp_path / "missing.yaml"), "model.K=2"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stdout == ""
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing.yaml" in lines[0]


def test_output_piped_into_a_closed_reader_stops_quietly():
    # `dualpath info ... | head` must not end in a BrokenPipeError traceback once the reader has gone
    cmd = f"{sys.executable} -m dualpath info configs/tiny_dual.yaml | true"
    res = subprocess.run(cmd, shell=True, cwd=Path(__file__).parent.parent, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr

"""The code's shape: one-way imports, the README runs as written, old checkpoints load, parameter roles."""

import ast
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dualpath import ModelConfig
from dualpath.checkpoint import load_model
from dualpath.train import param_groups

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "dualpath"
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "old_layout_ckpt"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every dualpath module a file imports (top level or inside functions), resolved to a module name."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("dualpath")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("dualpath"):
                # `from .pkg import sub` imports the submodule when one exists
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    out.add(sub if (PKG.parent / Path(*sub.split("."))).with_suffix(".py").is_file()
                            or (PKG.parent / Path(*sub.split("."))).is_dir() else target)
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for t in _imports(path):
            while t and t not in files:  # a name inside a module counts as the module
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name and not name.startswith(t + ".") and t != "dualpath":
                deps.add(t)
        graph[name] = deps
    return graph


def test_no_import_circles():
    graph = _graph()
    index, low, stack, on, circles = {}, {}, [], set(), []

    def connect(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            connect(v)
    assert len(graph) > 40 and graph["dualpath.train"]  # the walk saw the package
    assert circles == []


def test_the_model_file_imports_only_torch_the_standard_library_and_errors():
    tree = ast.parse((PKG / "model.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    assert names - set(sys.stdlib_module_names) - {"__future__"} == {"torch", ".errors"}


def test_the_trainer_names_no_architecture():
    text = (PKG / "train.py").read_text()
    for word in ("DualPathLM", ".gate.", "model.layers", ".arch"):
        assert word not in text, word
    assert not re.findall(r"\b(dual|duo|deep|wide)\b", text)


# ----------------------------------------------------------------------------------------------


def _readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_every_readme_python_block_runs(capsys):
    blocks = _readme_blocks("python")
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out
    assert "4864 11392 558654544" in printed  # the paper's F80M widths, as the README says


def test_every_readme_shell_command_that_needs_no_training_runs():
    long = {"make demo", "make test"}  # a demo training run, and this very suite
    commands = [line.split("#")[0].strip() for block in _readme_blocks("bash") for line in block.splitlines()]
    commands = [c for c in commands if c and c not in long]
    assert commands and set(c for block in _readme_blocks("bash") for c in long if c in block) == long
    exe = Path(sys.executable).parent / "dualpath"
    for c in commands:
        argv = shlex.split(c)
        assert argv[0] == "dualpath", c
        p = subprocess.run([str(exe), *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, (c, p.stderr)
        assert p.stdout.strip(), c


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["dual", "duo"])
def test_checkpoints_written_before_the_restructuring_still_load(arch):
    """The fixture was written by the code before the restructuring (tests/fixtures/make_old_layout_ckpt.py)."""
    expected = json.loads((FIXTURE / "expected.json").read_text())[arch]
    model, cfg, ckpt = load_model(FIXTURE / arch)
    assert cfg.model.arch == arch and ckpt.name == "step_00000001"
    with torch.no_grad():
        logits = model(torch.tensor(expected["idx"])).logits
    torch.testing.assert_close(logits, torch.tensor(expected["logits"]), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------


def _tiny(arch: str, **kw) -> ModelConfig:
    widths = {"wide": dict(d_ffn_wide=64), "loop": dict(d_ffn_deep=32), "dual": dict(d_ffn_deep=32, d_ffn_wide=64),
              "duo": dict(d_ffn_big=64)}[arch]
    return ModelConfig(arch=arch, vocab_size=40, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, seq_len=16,
                       ffn_multiple=8, K=2, **widths, **kw)


def _by_name_rule(model):
    """The rule the trainer used to apply by name: decay matrices except embeddings and gates."""
    return {n for n, p in model.named_parameters() if p.ndim >= 2 and not n.startswith("embed.") and ".gate." not in n}


@pytest.mark.parametrize("arch", ["wide", "loop", "dual", "duo"])
@pytest.mark.parametrize("tie", [False, True])
def test_weight_decay_by_role_equals_the_old_name_rule(arch, tie):
    model = _tiny(arch, tie_embeddings=tie).build()
    groups = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    assert decayed == _by_name_rule(model)
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("arch", ["wide", "loop", "dual", "duo"])
def test_param_counts_by_role_equal_the_old_name_rule(arch):
    model = _tiny(arch).build()
    parts = {"embeddings": 0, "deep": 0, "wide": 0, "gates": 0, "routers": 0, "duo": 0, "other": 0}
    for name, p in model.named_parameters():
        if name.startswith(("embed.", "lm_head.")):
            parts["embeddings"] += p.numel()
        elif ".deep.halt." in name or ".router." in name:
            parts["routers"] += p.numel()
        elif ".deep." in name:
            parts["deep"] += p.numel()
        elif ".wide." in name:
            parts["wide"] += p.numel()
        elif ".gate." in name:
            parts["gates"] += p.numel()
        elif name.startswith("layers.") and arch == "duo":
            parts["duo"] += p.numel()
        else:
            parts["other"] += p.numel()
    counts = model.param_counts()
    assert {k: counts[k] for k in parts} == parts
    assert counts["total"] == sum(p.numel() for p in model.parameters())

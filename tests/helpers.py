"""Small builders shared by the tests: tiny tokenizers, models and checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dualpath.checkpoint import save_checkpoint
from dualpath.config import ModelConfig, RunConfig
from dualpath.model import DualPathLM

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"


def train_tiny_tokenizer(path: Path, vocab_size: int = 300, chars: int = 200_000) -> Path:
    from dualpath.data.prepare import train_tokenizer

    text = SHAKESPEARE.read_text()[:chars]
    tok = train_tokenizer([text[i:i + 2000] for i in range(0, len(text), 2000)], vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def tiny_config(arch: str, vocab_size: int = 320, **kw) -> ModelConfig:
    base = dict(arch=arch, vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=64,
                d_ffn_deep=64, d_ffn_wide=128, d_ffn_big=128, ffn_multiple=16, K=2)
    base.update(kw)
    return ModelConfig(**base).validate()


@torch.no_grad()
def perturb_(model: DualPathLM, seed: int, gates: bool = True, routers: bool = True) -> DualPathLM:
    """Replace every parameter by a random value of a scale at which every branch, gate and halting router
    matters (at initialisation the branch gains are softplus(-7) and would hide a broken branch)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=gen)
        leaf = name.rsplit(".", 1)[-1]
        if ".router." in name and not routers:
            continue  # Duo routers stay as initialised (zero): P_big = 0.5
        if leaf in ("step_gain", "beta"):
            p.copy_(0.5 * r)  # gains softplus(.) ~ 0.4 .. 1.1
        elif leaf in ("W_g", "b_g"):
            if gates:
                p.copy_(r / math.sqrt(p.shape[0]) if leaf == "W_g" else 0.5 * r)
        elif ".halt." in name:
            p.copy_(2.0 * r / math.sqrt(p.shape[-1]) if leaf == "weight" else 0.5 * r)
        elif "norm" in name:
            p.copy_(1.0 + 0.1 * r)
        elif p.dim() == 2:
            p.copy_(r / math.sqrt(p.shape[1]))
        else:
            p.copy_(r)
    return model


def perturbed_model(cfg: ModelConfig, seed: int = 0) -> DualPathLM:
    return perturb_(DualPathLM(cfg), seed + 1000).eval()


def save_tiny_checkpoint(run_dir: Path, model: DualPathLM, tokenizer_json: Path | None) -> Path:
    files = {"tokenizer.json": tokenizer_json} if tokenizer_json else {}
    return save_checkpoint(run_dir, 1, model.state_dict(), RunConfig(model=model.cfg), files=files)


def patch_training_loss(monkeypatch, change, first: int, last: int | None = None) -> None:
    """Training forwards number first..last (1-based, counting forwards with targets in training mode; last
    None: all later ones) return the loss `change(loss, model)` instead (a NaN, a spike, a NaN gradient)."""
    orig = DualPathLM.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None, **kw):
        out = orig(self, idx, targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] >= first and (last is None or calls["n"] <= last):
                out.loss = change(out.loss, self)
        return out

    monkeypatch.setattr(DualPathLM, "forward", forward)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: tiny matmuls are faster that way, and in-process runs are deterministic.
    A test module opts in by importing it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

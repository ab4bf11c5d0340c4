"""Small builders shared by the tests: tiny tokenizers, models and checkpoints."""

from __future__ import annotations

from pathlib import Path

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


def perturbed_model(cfg: ModelConfig, seed: int = 0, scale: float = 0.5) -> DualPathLM:
    """A model whose gates, gains and routers are away from their initial values."""
    torch.manual_seed(seed)
    model = DualPathLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "step_gain" in name or name.endswith("beta"):
                p.copy_(torch.randn_like(p) * 0.5)
            elif "W_g" in name or "b_g" in name or "router" in name:
                p.add_(torch.randn_like(p) * scale)
    return model.eval()


def save_tiny_checkpoint(run_dir: Path, model: DualPathLM, tokenizer_json: Path | None) -> Path:
    files = {"tokenizer.json": tokenizer_json} if tokenizer_json else {}
    return save_checkpoint(run_dir, 1, model.state_dict(), RunConfig(model=model.cfg), files=files)

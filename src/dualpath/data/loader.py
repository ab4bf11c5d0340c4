"""Windows of tokens for training and evaluation: the trainer's seeded train/val batches (`Batches`), the
routing tools' consecutive evaluation windows of a prepared folder or a text file (`load_windows`), and
seeded train windows for router training (`train_window_fn`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .shards import TokenShards, WindowSampler
from .tokenizer import (check_folder_vocab, check_same_tokenizer, check_tokenizer, eos_id, load_tokenizer,
                        token_byte_lengths)


def check_seq_len(model, seq_len: int | None) -> int:
    T = int(seq_len or model.cfg.seq_len)
    if not 1 <= T <= model.cfg.seq_len:
        raise ConfigError(f"sequence length {T} is outside 1..{model.cfg.seq_len} (the model's context)")
    return T


def load_windows(data: str | Path, model, *, tokenizer_dir: str | Path | None = None, split: str = "val",
                 max_sequences: int | None = 64, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (N, T) int64, from consecutive windows of T + 1 tokens (consecutive windows
    share their boundary token, so every token is a target once).

    data: a prepared folder (its `split` shards), or a UTF-8 text file tokenized with the tokenizer in
    `tokenizer_dir` (the checkpoint folder); the text is prefixed with EOS like `dualpath eval`, and its last,
    shorter window is padded (input 0, target -1 = ignored).
    """
    T = check_seq_len(model, seq_len)
    if max_sequences is not None and max_sequences < 1:
        raise ConfigError(f"--max-sequences must be >= 1, got {max_sequences}")
    p = Path(data)
    if p.is_dir():
        check_folder_vocab(p, model.cfg.vocab_size)
        if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").is_file():
            check_same_tokenizer(p, Path(tokenizer_dir) / "tokenizer.json", f"the checkpoint {tokenizer_dir}")
        shards = TokenShards(p, split)
        shards.check_ids(model.cfg.vocab_size)
        n = (shards.n_tokens - 1) // T
        if n < 1:
            raise DataError(f"the {split} split of {p} has {shards.n_tokens} tokens, fewer than the window + 1 "
                            f"({T + 1})")
        n = min(n, max_sequences) if max_sequences else n
        rows = np.stack([shards.get(w * T, T + 1) for w in range(n)])
        w = torch.from_numpy(rows.astype(np.int64))
        x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
    elif p.is_file():
        if tokenizer_dir is None:
            raise DataError(f"{p} is a text file: a tokenizer (the checkpoint's tokenizer.json) is needed")
        tok = load_tokenizer(tokenizer_dir)
        check_tokenizer(tok, model)
        ids = [eos_id(tok)] + tok.encode(p.read_text(encoding="utf-8", errors="replace")).ids
        if len(ids) < 2:
            raise DataError(f"{p} is too short to evaluate (fewer than 2 tokens)")
        xs, ys = [], []
        for s in range(0, len(ids) - 1, T):
            chunk = ids[s:s + T + 1]
            if len(chunk) < 2:
                break
            xr = torch.zeros(T, dtype=torch.long)
            yr = torch.full((T,), -1, dtype=torch.long)
            xr[:len(chunk) - 1] = torch.tensor(chunk[:-1])
            yr[:len(chunk) - 1] = torch.tensor(chunk[1:])
            xs.append(xr)
            ys.append(yr)
            if max_sequences and len(xs) >= max_sequences:
                break
        x, y = torch.stack(xs), torch.stack(ys)
    else:
        raise DataError(f"data not found: {p} (expected a prepared folder or a text file)")
    hi = int(x.max())
    if hi >= model.cfg.vocab_size:
        raise DataError(f"token id {hi} in {p} is out of range for the model's vocabulary ({model.cfg.vocab_size})")
    return x, y


def make_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int = 8, device="cpu") -> list:
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    return [(x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)) for i in range(0, x.shape[0], batch_size)]


class Windows:
    """Seeded windows of T + 1 tokens of one split of a prepared folder, addressed by a window counter."""

    def __init__(self, folder: str | Path, split: str, seq_len: int, seed: int):
        self.shards = TokenShards(folder, split)
        if self.shards.n_tokens == 0:
            raise DataError(f"the {split} split in {folder} is empty")
        self.sampler = WindowSampler(self.shards.n_tokens, seq_len, seed, split=split)

    def get(self, start: int, count: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of windows start .. start + count - 1."""
        w = torch.from_numpy(np.asarray(self.sampler.batch(self.shards, start, count), dtype=np.int64))
        return w[:, :-1].to(device, non_blocking=True), w[:, 1:].to(device, non_blocking=True)


class Batches:
    """Train and val windows of a prepared folder for the trainer, and its bytes per token (exact BPB)."""

    def __init__(self, path: str, seq_len: int, seed: int, model_vocab: int):
        root = Path(path)
        if not path or not root.is_dir():
            raise DataError(f"data folder not found: '{path}' (set data.path to a folder made by `dualpath prepare`)")
        if not (root / "meta.json").is_file():
            raise DataError(f"{root} has no meta.json: prepare it with `dualpath prepare`")
        self.meta = check_folder_vocab(root, model_vocab)
        self.root, self.seq_len = root, seq_len
        self.train = Windows(root, "train", seq_len, seed)
        self.val = Windows(root, "val", seq_len, seed)
        for w in (self.train, self.val):
            w.shards.check_ids(model_vocab)
        self.val_sampler = self.val.sampler
        tok = root / "tokenizer.json"
        self.byte_lengths = (torch.from_numpy(np.asarray(token_byte_lengths(tok), dtype=np.int64))
                             if tok.is_file() else None)

    def get(self, split: str, start: int, count: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.train if split == "train" else self.val).get(start, count, device)


def train_window_fn(folder: str | Path, model, *, batch_size: int = 8, seq_len: int | None = None, seed: int = 0,
                    device="cpu"):
    """step -> (inputs, targets): random train-split windows of a prepared folder (a seeded, stateless order)."""
    p = Path(folder)
    if not p.is_dir():
        raise DataError(f"router training needs a prepared data folder (made by `dualpath prepare`), got {p}")
    T = check_seq_len(model, seq_len)
    check_folder_vocab(p, model.cfg.vocab_size)
    windows = Windows(p, "train", T, seed)
    return lambda step: windows.get(step * batch_size, batch_size, device)

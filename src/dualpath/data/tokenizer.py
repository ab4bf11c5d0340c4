"""Tokenizers: the byte-level BPE that `prepare` trains, loading, the end-of-text token (one list of
candidates), vocabulary checks against a model, and the UTF-8 byte length of every token (exact BPB).

Every other module asks this one; none repeats the lookups.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import DataError

EOS_TOKEN = "<|endoftext|>"
EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")


def new_bpe_tokenizer():
    """An untrained byte-level BPE tokenizer (ByteLevel pre-tokenizer without prefix space, ByteLevel decoder)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterator[str], vocab_size: int, *, show_progress: bool = False):
    """Train a byte-level BPE on an iterator of texts; `<|endoftext|>` is special token 0.

    Decoding `encode(text).ids` with `skip_special_tokens=False` gives back `text` exactly.
    """
    from tokenizers import pre_tokenizers, trainers

    if vocab_size < 257:
        raise DataError(f"vocab_size must be >= 257 for a byte-level BPE (256 bytes + EOS), got {vocab_size}")
    tok = new_bpe_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.encode_special_tokens = True
    return tok


def load_tokenizer(path: str | os.PathLike):
    """Load a tokenizer.json (or a folder holding one). Special-token strings inside text are encoded as
    plain text (`encode_special_tokens=True`), so only the EOS that prepare inserts is ever an EOS id."""
    from tokenizers import Tokenizer

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise DataError(f"tokenizer file not found: {p}")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{p}: not a valid tokenizer.json ({msg})") from None
    tok.encode_special_tokens = True
    return tok


def find_eos(tok, where: str = "tokenizer") -> tuple[int, str]:
    """(id, string) of the tokenizer's end-of-text token, the first of EOS_CANDIDATES it has."""
    for name in EOS_CANDIDATES:
        i = tok.token_to_id(name)
        if i is not None:
            return i, name
    raise DataError(f"{where} has no end-of-text token (looked for {', '.join(EOS_CANDIDATES)})")


def eos_id(tok, default: int | None = 0) -> int | None:
    """The id documents are prefixed with when scored: the end-of-text token, else `default`."""
    for name in EOS_CANDIDATES:
        i = tok.token_to_id(name)
        if i is not None:
            return int(i)
    return default


def check_vocab(n_ids: int, model_vocab: int, what: str) -> None:
    """DataError unless token ids 0..n_ids-1 (of `what`) fit a model vocabulary of model_vocab."""
    if n_ids > model_vocab:
        raise DataError(f"vocabulary mismatch: {what} uses {n_ids} token ids but the model's vocabulary is "
                        f"{model_vocab}: they do not belong together")


def check_tokenizer(tokenizer, model, where: str = "the tokenizer") -> None:
    check_vocab(tokenizer.get_vocab_size(), model.cfg.vocab_size, where)


def fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides the token ids (the model: vocabulary and merges; the added tokens), so the same
    tokenizer saved twice, or re-indented, has the same fingerprint. `tokenizer`: a Tokenizer or a path."""
    import hashlib

    if not hasattr(tokenizer, "to_str"):
        tokenizer = load_tokenizer(tokenizer)
    spec = json.loads(tokenizer.to_str())
    added = sorted((int(a["id"]), str(a["content"])) for a in spec.get("added_tokens") or [])
    key = json.dumps({"model": spec.get("model"), "added": added}, sort_keys=True)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def check_same_tokenizer(data_folder: str | os.PathLike, tokenizer: Any, owner: str) -> None:
    """DataError unless the tokenizer.json of a prepared folder (when it has one) is `tokenizer` (the one
    `owner`, e.g. a checkpoint, was trained with): ids of one tokenizer mean nothing to a model of another."""
    path = Path(data_folder) / "tokenizer.json"
    if tokenizer is None or not path.is_file():
        return
    if fingerprint(path) != fingerprint(tokenizer):
        raise DataError(f"{data_folder} was prepared with another tokenizer than {owner}: its token ids mean "
                        "other text to this model")


def check_folder_vocab(folder: str | os.PathLike, model_vocab: int) -> dict:
    """The meta.json of a prepared folder ({} if it has none), after checking its vocabulary fits."""
    meta_path = Path(folder) / "meta.json"
    if not meta_path.is_file():
        return {}
    try:
        meta = json.loads(meta_path.read_text())
        vocab = int(meta.get("vocab_size", 0))
    except (json.JSONDecodeError, ValueError, TypeError, AttributeError):
        raise DataError(f"corrupt meta.json in {folder}") from None
    check_vocab(vocab, model_vocab, f"the data in {folder}")
    return meta


def check_dense_vocab(tok, where: str) -> int:
    size = tok.get_vocab_size(with_added_tokens=True)
    top = max(tok.get_vocab(with_added_tokens=True).values(), default=-1)
    if top >= size:
        raise DataError(f"{where}: token id {top} is out of range for vocab size {size} (ids must be 0..{size - 1})")
    return size


# ---------------------------------------------------------------------------------------------------------
# Bytes per token, for exact bits-per-byte.

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-char table, as used by the ByteLevel pre-tokenizer."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_CHARS = frozenset(bytes_to_unicode().values())
_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _has_type(node: Any, name: str) -> bool:
    if isinstance(node, dict):
        if node.get("type") == name:
            return True
        return any(_has_type(v, name) for v in node.values())
    if isinstance(node, list):
        return any(_has_type(v, name) for v in node)
    return False


def is_byte_level(tokenizer) -> bool:
    """Whether the tokenizer maps bytes to GPT-2's printable characters (ByteLevel decoder or pre-tokenizer)."""
    spec = json.loads(tokenizer.to_str())
    return _has_type(spec.get("decoder"), "ByteLevel") or _has_type(spec.get("pre_tokenizer"), "ByteLevel")


def token_byte_lengths(tokenizer: Any) -> np.ndarray:
    """UTF-8 byte length of every token id (0 for special tokens), as an int64 array of vocab size.

    `tokenizer` is a `tokenizers.Tokenizer` or a path to a tokenizer.json (or a folder holding one).
    Exact for byte-level BPE (the tokenizers `prepare` trains): the bytes of a token sequence are then
    sum(lengths[ids]), so bits-per-byte on any subset of target tokens is
    sum(loss_nats) / ln(2) / sum(lengths[targets]). For other tokenizers it is a best effort
    (SentencePiece '▁' counts as one space, '<0xNN>' byte-fallback tokens as one byte).
    """
    if not hasattr(tokenizer, "get_vocab"):
        tokenizer = load_tokenizer(tokenizer)
    spec = json.loads(tokenizer.to_str())
    byte_level = is_byte_level(tokenizer)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    size = max(tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
    out = np.zeros(size, dtype=np.int64)
    for token, i in vocab.items():
        if byte_level and all(c in _BYTE_CHARS for c in token):
            out[i] = len(token)
        elif _BYTE_FALLBACK.match(token):
            out[i] = 1
        else:
            out[i] = len(token.replace("\u2581", " ").encode("utf-8"))
    for added in spec.get("added_tokens") or []:
        i = added["id"]
        out[i] = 0 if added.get("special") else len(added["content"].encode("utf-8"))
    return out

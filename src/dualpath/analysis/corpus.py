"""Analysis inputs as documents of text with token ids and exact character offsets.

A `Corpus` is a list of documents. Each document has its text, its token ids, the character span
`[start, end)` of every token in that text, and which tokens are special. Three sources:

* a text file: documents are separated by runs of blank lines (paragraphs), as `prepare --doc-split
  blank` makes them;
* a JSONL file: one document per record (`field`, see `record_text`);
* a prepared data folder: the token shards (val split, else train), cut into documents at EOS tokens;
  the text is rebuilt from the tokens.

Every document is scored on its own, after a BOS (the tokenizer's end-of-text token), like
`dualpath eval` scores raw text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.tokenizer import bytes_to_unicode, eos_id, is_byte_level
from ..errors import DataError

DOC_SEPARATOR = "\n\n"  # between documents in the joined text of a corpus (report and arrays.npz)
DEFAULT_DATA_TOKENS = 32768  # tokens read from a prepared folder when max_tokens is not given


@dataclass
class Corpus:
    name: str
    texts: list[str]
    ids: list[np.ndarray]  # int64 per document
    offsets: list[np.ndarray]  # (n, 2) int64 character spans into texts[d]
    special: list[np.ndarray]  # bool per token
    bos: int | None = None  # prepended to every document when scoring
    offsets_ok: bool = True  # the offsets cover every document's text exactly
    source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return int(sum(len(i) for i in self.ids))

    @property
    def n_docs(self) -> int:
        return len(self.texts)

    def joined(self) -> tuple[str, np.ndarray]:
        """All documents joined by DOC_SEPARATOR, and the character offset where each starts."""
        starts, pos = [], 0
        for t in self.texts:
            starts.append(pos)
            pos += len(t) + len(DOC_SEPARATOR)
        return DOC_SEPARATOR.join(self.texts), np.asarray(starts, dtype=np.int64)

    def flat(self) -> dict[str, np.ndarray]:
        """Token-level arrays over the whole corpus: ids, doc, start/end (into the joined text), special."""
        _, doc_start = self.joined()
        n = self.n_tokens
        doc = np.concatenate([np.full(len(i), d, dtype=np.int32) for d, i in enumerate(self.ids)]) if n else \
            np.zeros(0, np.int32)
        offs = np.concatenate(self.offsets) if n else np.zeros((0, 2), np.int64)
        return {
            "ids": np.concatenate(self.ids) if n else np.zeros(0, np.int64),
            "doc": doc,
            "start": offs[:, 0] + doc_start[doc],
            "end": offs[:, 1] + doc_start[doc],
            "special": np.concatenate(self.special) if n else np.zeros(0, bool),
        }


# ----------------------------------------------------------------------------------------------
# Tokenizer helpers


def special_ids(tokenizer) -> set[int]:
    spec = json.loads(tokenizer.to_str())
    return {int(t["id"]) for t in spec.get("added_tokens") or [] if t.get("special")}


def bos_id(tokenizer) -> int | None:
    return eos_id(tokenizer, default=None)


def offsets_reproduce(text: str, offsets) -> bool:
    """True when the spans, in order, cover `text` with no gap and nothing outside it.

    Byte-level BPE splits a multi-byte character over several tokens that all report that character's
    span; such repeated spans are allowed, gaps and out-of-order spans are not.
    """
    cursor = 0
    for s, e in offsets:
        s, e = int(s), int(e)
        if s > cursor or e < s or e > len(text) or s < 0:
            return False
        cursor = max(cursor, e)
    return cursor == len(text)


def encode_with_offsets(tokenizer, text: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """Token ids, (n, 2) character offsets from `tokenizer.encode(text)`, and whether they reproduce the text.

    The check: the spans cover the text in order with no gap, and every token whose span is its own
    decodes (on its own) to exactly the text of its span (unless it holds only part of a character).
    """
    enc = tokenizer.encode(text)
    ids = np.asarray(enc.ids, dtype=np.int64)
    offs = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
    ok = offsets_reproduce(text, offs)
    if ok and len(ids):
        shared = np.zeros(len(ids), bool)
        same = (offs[1:] == offs[:-1]).all(axis=1)
        shared[1:] |= same
        shared[:-1] |= same
        for i in np.flatnonzero(~shared):
            s, e = offs[i]
            piece = tokenizer.decode([int(ids[i])], skip_special_tokens=False)
            if piece != text[s:e] and "\ufffd" not in piece:  # U+FFFD: part of a split character
                ok = False
                break
    return ids, offs, ok




def decode_with_offsets(tokenizer, ids) -> tuple[str, np.ndarray]:
    """Rebuild the text of a token sequence and each token's character span in it.

    Byte-level BPE: exact. The bytes of all tokens are decoded at once (a character split over tokens
    is kept whole and belongs to every token holding one of its bytes); an invalid byte becomes U+FFFD.
    Other tokenizers: the concatenation of the tokens decoded one by one.
    """
    ids = [int(i) for i in ids]
    if not ids:
        return "", np.zeros((0, 2), np.int64)
    if is_byte_level(tokenizer):
        inv = {c: b for b, c in bytes_to_unicode().items()}
        specials = special_ids(tokenizer)
        pieces = []
        for i in ids:
            tok = tokenizer.id_to_token(i) or ""
            if i not in specials and all(c in inv for c in tok):
                pieces.append(bytes(inv[c] for c in tok))
            else:
                pieces.append(tok.encode("utf-8"))
        data = b"".join(pieces)
        raw = data.decode("utf-8", errors="surrogateescape")
        char_of_byte = np.empty(len(data) + 1, dtype=np.int64)
        pos = 0
        for ci, ch in enumerate(raw):
            n = len(ch.encode("utf-8", errors="surrogateescape"))
            char_of_byte[pos:pos + n] = ci
            pos += n
        char_of_byte[pos] = len(raw)
        text = "".join("\ufffd" if "\udc80" <= ch <= "\udcff" else ch for ch in raw)
        offs = np.zeros((len(ids), 2), np.int64)
        b = 0
        for k, p in enumerate(pieces):
            if p:
                offs[k] = (char_of_byte[b], char_of_byte[b + len(p) - 1] + 1)
            else:
                offs[k] = (char_of_byte[b], char_of_byte[b])
            b += len(p)
        return text, offs
    pieces = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    lens = np.array([len(p) for p in pieces], dtype=np.int64)
    ends = np.cumsum(lens)
    return "".join(pieces), np.stack([ends - lens, ends], axis=1)


# ----------------------------------------------------------------------------------------------
# Reading documents


def split_paragraphs(text: str) -> list[str]:
    """Documents of a text file: runs of blank (whitespace-only) lines separate them; blank documents go."""
    docs = re.split(r"\n[ \t\r\f\v]*\n(?:[ \t\r\f\v]*\n)*", text)
    return [d.strip("\n") for d in docs if d.strip()]


def read_text_file(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"file not found: {p}")
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not valid UTF-8 ({e.reason})") from None
    except OSError as e:
        raise DataError(f"cannot read {p}: {e.strerror or e}") from None


def record_text(rec, field: str | None, where: str) -> str:
    """The text of one JSONL record.

    field None: `text` if the record has it, else `question` + newline + `answer` (GSM8K), as
    `dualpath eval` builds Q/A examples. field "a,b": those fields joined by newlines.
    """
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if field is None:
        if "text" in rec:
            names = ["text"]
        elif "question" in rec and "answer" in rec:
            names = ["question", "answer"]
        else:
            raise DataError(f"{where}: no 'text' or 'question'/'answer' fields (keys: "
                            f"{', '.join(map(str, rec)) or 'none'}); pass --field")
    else:
        names = [f.strip() for f in field.split(",") if f.strip()]
    parts = []
    for name in names:
        if name not in rec:
            raise DataError(f"{where}: field {name!r} is missing (keys: {', '.join(map(str, rec)) or 'none'})")
        v = rec[name]
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str):
            raise DataError(f"{where}: field {name!r} is a {type(v).__name__}, not a string")
        parts.append(v)
    return "\n".join(parts)


def read_jsonl_texts(path: str | Path, field: str | None = None) -> list[str]:
    p = Path(path)
    raw = read_text_file(p)
    out = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{n}: invalid JSON ({e.msg})") from None
        text = record_text(rec, field, f"{p}:{n}")
        if text.strip():
            out.append(text)
    if not out:
        raise DataError(f"{p} holds no records with text")
    return out


# ----------------------------------------------------------------------------------------------
# Building corpora


def corpus_from_texts(name: str, texts: list[str], tokenizer, *, max_tokens: int | None = None,
                      source: str = "") -> Corpus:
    """Tokenize documents (with offsets); stop once `max_tokens` tokens are taken (the last document is cut)."""
    specials = special_ids(tokenizer)
    c = Corpus(name=name, texts=[], ids=[], offsets=[], special=[], bos=bos_id(tokenizer), source=source)
    total = 0
    for text in texts:
        if max_tokens is not None and total >= max_tokens:
            c.notes.append(f"stopped at max_tokens={max_tokens}")
            break
        ids, offs, ok = encode_with_offsets(tokenizer, text)
        if not len(ids):
            continue
        if max_tokens is not None and total + len(ids) > max_tokens:
            keep = max_tokens - total
            ids, offs = ids[:keep], offs[:keep]
            text = text[:int(offs[-1, 1])]
            c.notes.append(f"stopped at max_tokens={max_tokens}")
        c.offsets_ok &= ok
        c.texts.append(text)
        c.ids.append(ids)
        c.offsets.append(offs)
        c.special.append(np.isin(ids, list(specials)) if specials else np.zeros(len(ids), bool))
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    if not c.texts:
        raise DataError(f"{source or name}: no tokens to analyse")
    return c


def corpus_from_shards(name: str, folder: str | Path, tokenizer, *, max_tokens: int | None = None) -> Corpus:
    """The first `max_tokens` tokens (default DEFAULT_DATA_TOKENS) of a prepared folder's val split
    (train if it has no val shards), cut into documents at EOS tokens; the text is rebuilt from the tokens."""
    from ..data.shards import TokenShards, find_shards
    from ..data.tokenizer import check_same_tokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder not found: {folder}")
    check_same_tokenizer(folder, tokenizer, "the checkpoint")
    split = "val" if find_shards(folder, "val") else "train"
    shards = TokenShards(folder, split)
    n = min(shards.n_tokens, max_tokens or DEFAULT_DATA_TOKENS)
    tokens = shards.get(0, n)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if len(tokens) and int(tokens.max()) >= vocab:
        raise DataError(f"{folder}: token id {int(tokens.max())} is outside the tokenizer's vocabulary ({vocab})")
    eos = bos_id(tokenizer)
    specials = special_ids(tokenizer)
    c = Corpus(name=name, texts=[], ids=[], offsets=[], special=[], bos=eos, source=f"{folder} ({split})")
    cuts = np.flatnonzero(tokens == eos) if eos is not None else np.zeros(0, np.int64)
    bounds = [0, *(cuts + 1).tolist(), len(tokens)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        doc = tokens[a:b]
        if eos is not None and len(doc) and doc[-1] == eos:
            doc = doc[:-1]
        if not len(doc):
            continue
        text, offs = decode_with_offsets(tokenizer, doc)
        c.texts.append(text)
        c.ids.append(doc.astype(np.int64))
        c.offsets.append(offs)
        c.special.append(np.isin(doc, list(specials)) if specials else np.zeros(len(doc), bool))
    if not c.texts:
        raise DataError(f"{folder}: no tokens to analyse in the {split} split")
    if n < shards.n_tokens:
        c.notes.append(f"first {n} of {shards.n_tokens} {split} tokens")
    return c


def load_corpus(*, text=None, data=None, jsonl=None, field: str | None = None, tokenizer,
                max_tokens: int | None = None, name: str | None = None) -> Corpus:
    given = [(k, v) for k, v in (("text", text), ("data", data), ("jsonl", jsonl)) if v is not None]
    if len(given) != 1:
        raise DataError("give exactly one of --text FILE, --data DIR or --jsonl FILE")
    kind, path = given[0]
    p = Path(path)
    if field is not None and kind != "jsonl":
        raise DataError("--field applies to --jsonl only")
    if kind == "data":
        return corpus_from_shards(name or p.name or str(p), p, tokenizer, max_tokens=max_tokens)
    if kind == "jsonl":
        texts = read_jsonl_texts(p, field)
    else:
        texts = split_paragraphs(read_text_file(p))
        if not texts:
            raise DataError(f"{p} holds no text")
    return corpus_from_texts(name or p.stem, texts, tokenizer, max_tokens=max_tokens, source=str(p))


def corpus_from_path(path: str | Path, tokenizer, *, field: str | None = None, max_tokens: int | None = None,
                     name: str | None = None) -> Corpus:
    """A folder is prepared data, `.jsonl` is JSONL, anything else is a text file."""
    p = Path(path)
    if p.is_dir():
        return load_corpus(data=p, tokenizer=tokenizer, max_tokens=max_tokens, name=name)
    if p.suffix == ".jsonl":
        return load_corpus(jsonl=p, field=field, tokenizer=tokenizer, max_tokens=max_tokens, name=name)
    return load_corpus(text=p, tokenizer=tokenizer, max_tokens=max_tokens, name=name)

"""`prepare`: text sources -> byte-level BPE tokenizer + train/val token shards + meta.json (docs/DATA.md).

Output folder (written into a temporary sibling folder and renamed into place at the end, so a failed or
interrupted run never leaves a half-written output folder):

    tokenizer.json        the tokenizer (trained here, or a copy of the one given)
    train_000.bin ...     train token shards (see shards.py for the byte layout)
    val_000.bin ...       val token shards
    meta.json             what was done (sources, counts, vocab, dtype, val_bytes, seed, ...)
    eval_examples.jsonl   only with the synthetic source: held-out examples for per-category evaluation
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import DataError
from ..fileio import check_out_dir, install_dir
from .shards import FORMAT_VERSION, HEADER_BYTES, ShardWriter, atomic_write_bytes, default_mode, token_dtype
from .tokenizer import check_dense_vocab, find_eos, load_tokenizer, token_byte_lengths, train_tokenizer
from .sources import Source, SyntheticSource, iter_specs, mixed_documents

_BATCH_BYTES = 1 << 18  # text per encode_batch call
_BATCH_DOCS = 1024


# ---------------------------------------------------------------------------------------------------------
# Val selection

class ValSelector:
    """Deterministic, seeded choice of val documents at rate `fraction`, in one pass over a stream.

    Documents are cut into consecutive blocks of 1/fraction documents (block k ends at
    floor((k+1)/fraction)); one document at a uniformly random position of each block (drawn from
    np.random.default_rng([seed, 0x76616C, k])) goes to val. So after n documents there are about
    n*fraction val documents, spread over the whole stream, with no aliasing against periodic mixing.
    """

    def __init__(self, fraction: float, seed: int):
        if not (0.0 < fraction < 1.0):
            raise DataError(f"val_fraction must be in (0, 1), got {fraction}")
        self.block = 1.0 / fraction
        self.seed = int(seed)
        self.k = -1
        self.end = 0
        self.pos = -1
        self.j = 0

    def __call__(self) -> bool:
        j = self.j
        self.j += 1
        while j >= self.end:
            self.k += 1
            start, self.end = self.end, math.floor((self.k + 1) * self.block)
            if self.end > start:
                self.pos = start + int(np.random.default_rng([self.seed, 0x76616C, self.k]).integers(self.end - start))
        return j == self.pos


def _labelled(sources: list[Source], seed: int, val_fraction: float, until: str) -> Iterator[tuple[str, str, bool]]:
    pick = ValSelector(val_fraction, seed)
    for name, doc in mixed_documents(sources, seed, until=until):
        yield name, doc, pick()


# ---------------------------------------------------------------------------------------------------------
# Output folder handling

def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=False)


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}P"


# ---------------------------------------------------------------------------------------------------------
# prepare

def prepare(sources: list[str], out_dir: str | os.PathLike, *, vocab_size: int = 8192, tokenizer: str | None = None,
            val_fraction: float = 0.01, max_tokens: int | None = None, shard_tokens: int = 2**24,
            field: str | None = None, template: str | None = None, split: str = "train",
            doc_split: str | None = None, mix_until: str = "first", synthetic: Any = None,
            synthetic_eval_per_category: int = 200, tokenizer_train_bytes: int = 50_000_000, seed: int = 0,
            overwrite: bool = False, progress: bool = True) -> dict:
    """Tokenize text sources into train/val token shards; returns the meta dict (also saved as meta.json).

    Args:
        sources: source specs (see `dualpath.data.sources.parse_source`), e.g.
            ["data/tinyshakespeare.txt@3", "gsm8k/train.jsonl@1", "synthetic@0.5"].
        out_dir: output folder; must not exist or be empty unless `overwrite`.
        vocab_size: size of the byte-level BPE to train (>= 257); ignored when `tokenizer` is given. The
            trained vocabulary can come out smaller on tiny data; meta.json has the real size.
        tokenizer: path to an existing tokenizer.json (or a folder with one) instead of training.
        val_fraction: share of documents (0 < f < 1) that go to val, chosen by a seeded stratified draw.
        max_tokens: stop after this many tokens in total (train + val, EOS included). Required when every
            source is unlimited (synthetic). The document that would cross the limit is truncated so that
            it still ends with EOS (its bytes are then the bytes of its kept tokens).
        shard_tokens: tokens per shard file.
        field / template: default record text for jsonl, datasets: and hf: sources (default field "text").
        split: dataset split read by datasets: and hf: sources (not an output split).
        doc_split: default document splitting of text files (chunk | blank | heading | line | file).
        mix_until: "first" (stop when the first finite source is exhausted) or "all".
        synthetic: a SyntheticConfig for the `synthetic` source (default SyntheticConfig()).
        synthetic_eval_per_category: held-out examples per category written to eval_examples.jsonl when the
            synthetic source is used (0: none).
        tokenizer_train_bytes: the tokenizer is trained on the first min(this, 8*max_tokens) bytes of train
            text of the mixed stream (streamed, so memory stays flat).
        seed: seeds mixing tie-breaks and the val choice.
        overwrite: replace a non-empty output folder (only once the new one is complete).
        progress: show a rich progress bar on stderr.

    Raises DataError (one line) on bad input; on any failure no output folder is left behind.
    """
    out = Path(os.path.expanduser(str(out_dir))).absolute()
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise DataError("no sources given")
    if max_tokens is not None and max_tokens < 2:
        raise DataError(f"max_tokens must be >= 2, got {max_tokens}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}")
    if tokenizer_train_bytes < 1:
        raise DataError(f"tokenizer_train_bytes must be >= 1, got {tokenizer_train_bytes}")
    if mix_until not in ("first", "all"):
        raise DataError(f"mix_until must be 'first' or 'all', got {mix_until!r}")
    if not (0.0 < val_fraction < 1.0):
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if tokenizer is None and vocab_size < 257:
        raise DataError(f"vocab_size must be >= 257 for a byte-level BPE (256 bytes + EOS), got {vocab_size}")
    check_out_dir(out, overwrite, DataError)
    srcs = iter_specs(sources, field=field, template=template, split=split, doc_split=doc_split, synthetic=synthetic)
    if max_tokens is None and not any(s.finite for s in srcs):
        raise DataError("every source is unlimited (synthetic): set max_tokens")
    tok = None
    if tokenizer is not None:  # fail fast on a bad tokenizer before creating anything
        tok = load_tokenizer(tokenizer)
        check_dense_vocab(tok, str(tokenizer))
        find_eos(tok, str(tokenizer))

    # Create the temp folder next to the output (same file system, so the final rename is atomic).
    created: list[Path] = []
    parent = out.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        os.chmod(tmp, default_mode(directory=True))
        meta = _prepare_into(tmp, srcs, tok, tokenizer, vocab_size=vocab_size, val_fraction=val_fraction,
                             max_tokens=max_tokens, shard_tokens=shard_tokens, mix_until=mix_until,
                             synthetic_eval_per_category=synthetic_eval_per_category,
                             tokenizer_train_bytes=tokenizer_train_bytes, seed=seed, progress=progress)
        check_out_dir(out, overwrite, DataError)  # someone may have written there meanwhile
        install_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # parents we made, innermost first
            try:
                d.rmdir()
            except OSError:
                break
        raise
    return meta


def _prepare_into(tmp: Path, srcs: list[Source], tok, tokenizer_path, *, vocab_size: int, val_fraction: float,
                  max_tokens: int | None, shard_tokens: int, mix_until: str, synthetic_eval_per_category: int,
                  tokenizer_train_bytes: int, seed: int, progress: bool) -> dict:
    with _progress(progress) as bar:
        # 1. Tokenizer: load, or train on a streamed sample of the train documents.
        if tok is not None:
            size = check_dense_vocab(tok, str(tokenizer_path))
            tok_meta = {"origin": "file", "path": str(Path(tokenizer_path).absolute())}
        else:
            cap = tokenizer_train_bytes if max_tokens is None else min(tokenizer_train_bytes, 8 * max_tokens)
            task = bar.add_task("tokenizer sample", total=cap, info="")
            sample = {"bytes": 0, "documents": 0}

            def texts() -> Iterator[str]:
                for _, doc, is_val in _labelled(srcs, seed, val_fraction, mix_until):
                    if is_val:
                        continue
                    n = len(doc.encode("utf-8"))
                    sample["bytes"] += n
                    sample["documents"] += 1
                    bar.update(task, advance=n, info=f"{_human(sample['bytes'])}B")
                    yield doc
                    if sample["bytes"] >= cap:
                        return

            tok = train_tokenizer(texts(), vocab_size, show_progress=False)
            bar.update(task, completed=cap)
            if sample["bytes"] == 0:
                raise DataError("no training text found in the sources (they are empty or only whitespace)")
            size = check_dense_vocab(tok, "trained tokenizer")
            tok_meta = {"origin": "trained", "type": "byte-level BPE", "requested_vocab_size": vocab_size,
                        "train_bytes": sample["bytes"], "train_documents": sample["documents"]}
        eos_id, eos_token = find_eos(tok, tok_meta.get("path", "tokenizer"))
        dtype = token_dtype(size)
        tb = token_byte_lengths(tok)
        atomic_write_bytes(tmp / "tokenizer.json", [tok.to_str(pretty=True).encode("utf-8")])

        # 2. Tokenize the mixed stream into train and val shards.
        writers = {s: ShardWriter(tmp, s, size, shard_tokens) for s in ("train", "val")}
        per_src = {s.name: {"documents": 0, "tokens": 0, "bytes": 0, "val_documents": 0, "val_tokens": 0,
                            "val_bytes": 0} for s in srcs}
        splits = {s: {"documents": 0, "tokens": 0, "bytes": 0, "token_bytes": 0} for s in ("train", "val")}
        total = 0
        stopped_by = ""
        task = bar.add_task("tokenizing", total=max_tokens, info="")
        eos = np.array([eos_id], dtype=np.uint32)
        batch: list[tuple[str, str, bool]] = []
        batch_bytes = 0
        done = False

        def flush() -> None:
            nonlocal total, done, stopped_by, batch, batch_bytes
            encs = tok.encode_batch([d for _, d, _ in batch], add_special_tokens=False)
            parts: dict[str, list[np.ndarray]] = {"train": [], "val": []}
            for (name, doc, is_val), enc in zip(batch, encs):
                ids = np.array(enc.ids, dtype=np.uint32)  # tokenizers ids are u32; range-checked below
                n_bytes = len(doc.encode("utf-8"))
                if ids.size and int(ids.max()) >= size:
                    raise DataError(f"tokenizer produced token id {int(ids.max())}, out of range for vocab size {size}")
                need = ids.size + 1
                if max_tokens is not None and total + need > max_tokens:
                    stopped_by = "max_tokens"
                    done = True
                    room = max_tokens - total
                    if room < 2:
                        break
                    ids = ids[:room - 1]
                    n_bytes = int(tb[ids].sum())
                    need = room
                split = "val" if is_val else "train"
                parts[split].append(ids)
                parts[split].append(eos)
                st = splits[split]
                st["documents"] += 1
                st["tokens"] += need
                st["bytes"] += n_bytes
                st["token_bytes"] += int(tb[ids].sum()) if split == "val" else 0
                ps = per_src[name]
                ps["documents"] += 1
                ps["tokens"] += need
                ps["bytes"] += n_bytes
                if is_val:
                    ps["val_documents"] += 1
                    ps["val_tokens"] += need
                    ps["val_bytes"] += n_bytes
                total += need
                if done:
                    break
            for split, arrs in parts.items():
                if arrs:
                    writers[split].write(np.concatenate(arrs))
            bar.update(task, completed=total,
                       info=f"{_human(total)} tokens, {_human(splits['train']['bytes'] + splits['val']['bytes'])}B")
            batch, batch_bytes = [], 0

        for item in _labelled(srcs, seed, val_fraction, mix_until):
            batch.append(item)
            batch_bytes += len(item[1])
            if batch_bytes >= _BATCH_BYTES or len(batch) >= _BATCH_DOCS:
                flush()
                if done:
                    break
        if batch and not done:
            flush()
        paths = {s: [p.name for p in w.close()] for s, w in writers.items()}

    if splits["train"]["documents"] + splits["val"]["documents"] == 0:
        raise DataError("no text found in the sources (they are empty or only whitespace)")
    if splits["val"]["tokens"] == 0:
        n = splits["train"]["documents"]
        raise DataError(f"the val split is empty ({n} documents at val_fraction={val_fraction}): "
                        f"use more data, a larger val_fraction or smaller documents (doc_split / chunk_bytes)")
    if splits["train"]["tokens"] == 0:
        raise DataError("the train split is empty: use more data or a smaller val_fraction")
    if stopped_by != "max_tokens":
        stopped_by = "a finite source was exhausted" if mix_until == "first" else "all sources exhausted"

    # 3. Synthetic held-out examples.
    eval_file = None
    n_eval = 0
    synth = [s for s in srcs if isinstance(s, SyntheticSource)]
    synth_cfg = None
    if synth:
        cfg = synth[0].resolved_config()
        synth_cfg = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else repr(cfg)
        if synthetic_eval_per_category > 0:
            examples = synth[0].synthetic_module().eval_examples(cfg, synthetic_eval_per_category)
            lines = [json.dumps(ex, ensure_ascii=False) + "\n" for ex in examples]
            atomic_write_bytes(tmp / "eval_examples.jsonl", ["".join(lines).encode("utf-8")])
            eval_file, n_eval = "eval_examples.jsonl", len(lines)

    weights = np.array([s.weight for s in srcs], dtype=np.float64)
    total_bytes = max(1, sum(v["bytes"] for v in per_src.values()))
    src_meta = []
    for s, w in zip(srcs, weights / weights.sum()):
        d = s.describe()
        d["target_share"] = float(w)
        d.update(per_src[s.name])
        d["byte_share"] = per_src[s.name]["bytes"] / total_bytes
        src_meta.append(d)
    meta = {
        "format_version": FORMAT_VERSION,
        "header_bytes": HEADER_BYTES,
        "vocab_size": size,
        "eos_id": eos_id,
        "eos_token": eos_token,
        "dtype": dtype.name,
        "token_bytes": dtype.itemsize,
        "train_tokens": splits["train"]["tokens"],
        "val_tokens": splits["val"]["tokens"],
        "train_documents": splits["train"]["documents"],
        "val_documents": splits["val"]["documents"],
        "train_bytes": splits["train"]["bytes"],
        "val_bytes": splits["val"]["bytes"],
        "val_token_bytes": splits["val"]["token_bytes"],
        "total_tokens": total,
        "shards": paths,
        "shard_tokens": shard_tokens,
        "tokenizer": {"file": "tokenizer.json", **tok_meta},
        "sources": src_meta,
        "mixing": {"shares_of": "bytes", "until": mix_until, "stopped_by": stopped_by},
        "val_fraction": val_fraction,
        "max_tokens": max_tokens,
        "seed": seed,
        "synthetic": synth_cfg,
        "eval_examples": eval_file,
        "eval_examples_count": n_eval,
    }
    atomic_write_bytes(tmp / "meta.json", [(json.dumps(meta, indent=2) + "\n").encode("utf-8")])
    return meta


def load_meta(directory: str | os.PathLike) -> dict:
    """Read a prepared folder's meta.json (DataError if missing or invalid)."""
    p = Path(directory) / "meta.json"
    try:
        with open(p, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{p} not found: run `dualpath prepare` first") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(meta, dict) or "vocab_size" not in meta:
        raise DataError(f"{p}: not a dualpath meta.json (no vocab_size)")
    return meta

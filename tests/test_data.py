"""Tests of the data layer: shards, sources, mixing, tokenizer, prepare, window sampler, bytes per token."""

from __future__ import annotations

import json
import struct
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import dualpath.data.prepare as prep_mod
import dualpath.data.shards as shards_mod
import dualpath.data.sources as src_mod
from dualpath.data.prepare import ValSelector, load_meta, prepare
from dualpath.data.tokenizer import load_tokenizer, token_byte_lengths, train_tokenizer
from dualpath.data.shards import (HEADER_BYTES, MAGIC, ShardWriter, TokenShards, WindowSampler, read_shard,
                                  write_shard)
from dualpath.data.sources import (DatasetsSource, HFSource, JsonlSource, SyntheticSource, TextSource,
                                   decode_escapes, mixed_documents, parse_source)
from dualpath.errors import DataError

DATA = Path("/work/shared/data")
needs_data = pytest.mark.skipif(not (DATA / "tinyshakespeare.txt").exists(), reason="shared data not present")
TEMPLATE = "Question: {question}\nAnswer: {answer}"


# ---------------------------------------------------------------------------------------------------------
# fixtures: small copies of the real data

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    if not (DATA / "tinyshakespeare.txt").exists():
        pytest.skip("shared data not present")
    d = tmp_path_factory.mktemp("small")
    with open(DATA / "tinyshakespeare.txt", encoding="utf-8") as f:
        (d / "shakespeare.txt").write_text(f.read(120_000), encoding="utf-8")
    with open(DATA / "gsm8k" / "train.jsonl", encoding="utf-8") as f:
        lines = [next(f) for _ in range(200)]
    (d / "gsm8k.jsonl").write_text("".join(lines), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def tokenizer_file(small, tmp_path_factory):
    tok = train_tokenizer(iter([(small / "shakespeare.txt").read_text(encoding="utf-8")]), 512)
    p = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(p))
    return p


def _no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], list(parent.iterdir())


def _docs(tokens: np.ndarray, eos: int) -> list[np.ndarray]:
    """Split a token stream at EOS; the stream must end with EOS."""
    assert tokens.size and tokens[-1] == eos
    cuts = np.flatnonzero(tokens == eos)
    out, start = [], 0
    for c in cuts:
        out.append(tokens[start:c])
        start = c + 1
    return out


# ---------------------------------------------------------------------------------------------------------
# shards

@pytest.mark.parametrize("vocab,dtype", [(512, np.uint16), (65536, np.uint16), (70000, np.uint32)])
def test_shard_round_trip(tmp_path, vocab, dtype):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=1000)
    tokens[0] = vocab - 1
    p = write_shard(tmp_path / "a.bin", tokens, vocab)
    assert p.stat().st_size == HEADER_BYTES + 1000 * np.dtype(dtype).itemsize
    back = read_shard(p)
    assert isinstance(back, np.memmap)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, tokens)
    assert not [q for q in tmp_path.iterdir() if q.name != "a.bin"]  # no temp files left


def test_shard_header_validation(tmp_path):
    p = write_shard(tmp_path / "a.bin", np.arange(100), 512)
    raw = p.read_bytes()

    bad = tmp_path / "magic.bin"
    bad.write_bytes(b"NOTTOKEN" + raw[8:])
    with pytest.raises(DataError, match="magic"):
        read_shard(bad)

    bad = tmp_path / "trunc.bin"
    bad.write_bytes(raw[:-7])
    with pytest.raises(DataError, match="truncated"):
        read_shard(bad)

    bad = tmp_path / "head.bin"
    bad.write_bytes(raw[:20])
    with pytest.raises(DataError, match="truncated shard header"):
        read_shard(bad)

    bad = tmp_path / "version.bin"
    bad.write_bytes(raw[:8] + struct.pack("<I", 99) + raw[12:])
    with pytest.raises(DataError, match="version 99"):
        read_shard(bad)

    bad = tmp_path / "width.bin"
    bad.write_bytes(raw[:12] + struct.pack("<I", 3) + raw[16:])
    with pytest.raises(DataError, match="width"):
        read_shard(bad)

    with pytest.raises(DataError, match="not found"):
        read_shard(tmp_path / "missing.bin")
    with pytest.raises(DataError, match="out of range"):
        write_shard(tmp_path / "x.bin", np.array([1, 512]), 512)
    assert not (tmp_path / "x.bin").exists()
    assert raw[:8] == MAGIC


def test_shard_writer_and_token_shards(tmp_path):
    w = ShardWriter(tmp_path, "train", 1000, shard_tokens=7)
    data = np.arange(50) % 1000
    for a, b in [(0, 3), (3, 4), (4, 20), (20, 50)]:
        w.write(data[a:b])
    paths = w.close()
    assert [p.name for p in paths] == [f"train_{i:03d}.bin" for i in range(8)]
    ts = TokenShards(tmp_path, "train")
    assert ts.n_tokens == len(ts) == 50
    for start, length in [(0, 50), (5, 9), (6, 1), (13, 15), (49, 1), (7, 0)]:
        np.testing.assert_array_equal(ts.get(start, length), data[start:start + length])
    assert ts.get(0, 3).dtype == np.int64
    np.testing.assert_array_equal(ts[12:30], data[12:30])
    with pytest.raises(IndexError):
        ts.get(45, 6)
    with pytest.raises(DataError, match="no val shards"):
        TokenShards(tmp_path, "val")


def test_shard_numeric_order(tmp_path):
    for i in (2, 10, 999, 1000):  # train_1000.bin sorts after train_999.bin
        write_shard(tmp_path / f"train_{i:03d}.bin", np.array([i, i]), 2000)
    write_shard(tmp_path / "train_x.bin", np.array([7]), 2000)  # not a shard name: ignored
    write_shard(tmp_path / "val_train_000.bin", np.array([7]), 2000)
    ts = TokenShards(tmp_path, "train")
    np.testing.assert_array_equal(ts[:], [2, 2, 10, 10, 999, 999, 1000, 1000])


# ---------------------------------------------------------------------------------------------------------
# window sampler

def test_window_sampler_deterministic_and_stateless(tmp_path):
    n, seq = 1001, 10
    write_shard(tmp_path / "train_000.bin", np.arange(400), 2000)
    write_shard(tmp_path / "train_001.bin", np.arange(400, n), 2000)
    ts = TokenShards(tmp_path, "train")
    s = WindowSampler(ts.n_tokens, seq, seed=3)
    assert s.n_windows == 100
    full = s.batch(ts, 0, 8)
    assert full.shape == (8, seq + 1) and full.dtype == np.int64
    np.testing.assert_array_equal(WindowSampler(n, seq, seed=3).batch(ts, 5, 3), full[5:8])
    np.testing.assert_array_equal(s.batch(ts, 5, 3), full[5:8])  # call history does not matter
    # rows are contiguous windows starting at multiples of seq_len, crossing the shard boundary when needed
    for row in full:
        assert row[0] % seq == 0
        np.testing.assert_array_equal(row, np.arange(row[0], row[0] + seq + 1))
    # every window exactly once per epoch, epochs differ, and spanning an epoch boundary is seamless
    e0, e1 = s.windows(0, 100), s.windows(100, 100)
    assert sorted(e0.tolist()) == list(range(100)) == sorted(e1.tolist())
    assert not np.array_equal(e0, e1)
    np.testing.assert_array_equal(s.windows(95, 10), np.concatenate([e0[95:], e1[:5]]))
    np.testing.assert_array_equal(s.windows(10**9 + 7, 4), WindowSampler(n, seq, seed=3).windows(10**9 + 7, 4))
    assert not np.array_equal(WindowSampler(n, seq, seed=4).windows(0, 100), e0)
    # disjoint rank slices cover the same set as one sequential pass
    ranks = np.concatenate([s.windows(r * 25, 25) for r in range(4)])
    np.testing.assert_array_equal(ranks, e0)


def test_window_sampler_too_short():
    with pytest.raises(DataError, match=r"sequence length 64 is longer than the data \(50 tokens in split val\)"):
        WindowSampler(50, 64, 0, split="val")


# ---------------------------------------------------------------------------------------------------------
# tokenizer and bytes per token

def test_tokenizer_training_round_trip(tokenizer_file):
    tok = load_tokenizer(tokenizer_file)
    assert tok.get_vocab_size() == 512
    assert tok.token_to_id("<|endoftext|>") == 0
    text = "ROMEO:\n  Good  morrow, wörld — naïve café 😀\n\n\tend <|endoftext|> tail"
    ids = tok.encode(text).ids
    assert max(ids) < 512
    assert 0 not in ids  # a literal "<|endoftext|>" in the text is not the EOS id
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_token_byte_lengths(tokenizer_file, small):
    tok = load_tokenizer(tokenizer_file)
    lengths = token_byte_lengths(tok)
    assert lengths.shape == (512,)
    assert lengths[0] == 0  # EOS
    assert (lengths[1:] >= 1).all()
    sample = (small / "shakespeare.txt").read_text(encoding="utf-8")[5000:9000] + " Grüße, 東京 🙂 end"
    ids = np.array(tok.encode(sample).ids)
    assert lengths[ids].sum() == len(sample.encode("utf-8"))
    # on any subset: bytes of a slice of tokens = bytes of its decoded text (when cut on a char boundary)
    part = ids[100:300]
    assert lengths[part].sum() == len(tok.decode(part.tolist()).encode("utf-8"))
    np.testing.assert_array_equal(token_byte_lengths(tokenizer_file), lengths)


# ---------------------------------------------------------------------------------------------------------
# sources and mixing

def test_parse_source_specs(small):
    s = parse_source(f"{small}/shakespeare.txt@2.5")
    assert isinstance(s, TextSource) and s.weight == 2.5 and s.finite and s.name == "shakespeare.txt"
    s = parse_source(f"{small}/gsm8k.jsonl@0.5::template={{question}}\\n{{answer}}", field="text")
    assert isinstance(s, JsonlSource) and s.template == "{question}\n{answer}" and s.field is None
    assert s.weight == 0.5
    s = parse_source(f"{small}/gsm8k.jsonl", field="question")
    assert s.field == "question" and s.template is None
    assert next(s.documents()).startswith("Natalia")
    s = parse_source(f"{small}/*.txt::doc_split=blank")
    assert isinstance(s, TextSource) and s.doc_split == "blank" and len(s.paths) == 1
    s = parse_source(str(small))  # folder: all *.txt
    assert isinstance(s, TextSource) and [p.name for p in s.paths] == ["shakespeare.txt"]
    s = parse_source("hf:roneneldan/TinyStories::split=validation::field=story@3")
    assert isinstance(s, HFSource) and s.dataset == "roneneldan/TinyStories" and s.split == "validation"
    assert s.field == "story" and s.weight == 3.0  # the weight may also close the spec
    s = parse_source("hf:roneneldan/TinyStories@3::split=validation", field="text")
    assert s.weight == 3.0 and s.field == "text" and s.finite
    s = parse_source("synthetic@0.2")
    assert isinstance(s, SyntheticSource) and not s.finite and s.weight == 0.2
    assert decode_escapes(r"a\nb\tc\\n") == "a\nb\tc\\n"


@pytest.mark.parametrize("spec,match", [
    ("nope/missing.txt", "file not found"),
    ("nope/*.txt", "matches no files"),
    ("wat", "unknown source spec"),
    ("s3://bucket/x", "unknown source spec"),
    ("datasets:nope/none", "datasets folder not found"),
    ("hf:", "needs a dataset name"),
    ("synthetic@-1", "weight must be a positive"),
    ("synthetic::bogus=1", "bad option"),
    ("synthetic@2::name=s@3", "weight given twice"),
])
def test_parse_source_errors(spec, match):
    with pytest.raises(DataError, match=match):
        parse_source(spec)


def test_parse_source_option_errors(small):
    with pytest.raises(DataError, match="doc_split"):
        parse_source(f"{small}/shakespeare.txt::doc_split=pages")
    with pytest.raises(DataError, match="not both"):
        parse_source(f"{small}/gsm8k.jsonl", field="q", template="{q}")
    with pytest.raises(DataError, match="positional"):
        parse_source(f"{small}/gsm8k.jsonl", template="{} {}")
    with pytest.raises(DataError, match="unknown source option"):
        parse_source(f"{small}/gsm8k.jsonl", colour="red")


def test_text_doc_splitting(tmp_path):
    text = (" = Alpha = \n \n a1 a1 .\n \n = = Sub = = \n a2 .\n \n"
            " = Beta = \n \n b1 .\n\n\n")
    p = tmp_path / "wiki.txt"
    p.write_text(text, encoding="utf-8")
    docs = list(parse_source(f"{p}::doc_split=heading").documents())
    assert docs == [" = Alpha = \n \n a1 a1 .\n \n = = Sub = = \n a2 .\n", " = Beta = \n \n b1 .\n"]
    assert list(parse_source(f"{p}::doc_split=blank").documents())[:2] == [" = Alpha = \n", " a1 a1 .\n"]
    assert len(list(parse_source(f"{p}::doc_split=line").documents())) == 6
    assert list(parse_source(f"{p}::doc_split=file").documents()) == [text.rstrip("\n") + "\n"]
    # chunk: ends at the first blank line after chunk_bytes, never later than 2*chunk_bytes
    paras = "".join(f"line {i} xxxxxxxxxx\n" + ("\n" if i % 3 == 2 else "") for i in range(300))
    p2 = tmp_path / "book.txt"
    p2.write_text(paras, encoding="utf-8")
    docs = list(parse_source(f"{p2}::chunk_bytes=200").documents())
    assert all(len(d.encode()) <= 400 for d in docs)
    assert all(len(d.encode()) >= 200 for d in docs[:-1])
    assert "".join(docs).replace("\n\n", "\n") == paras.replace("\n\n", "\n")
    # a file without newlines comes in bounded pieces; a BOM is dropped
    p3 = tmp_path / "long.txt"
    p3.write_text("\ufeff" + "x" * 300_000, encoding="utf-8")
    docs = list(parse_source(f"{p3}::doc_split=file::max_doc_bytes=100000").documents())
    assert "".join(docs) == "x" * 300_000 and max(map(len, docs)) <= 100_000
    # gzip, and CRLF line endings normalised
    import gzip
    gz = tmp_path / "sub" / "a.txt.gz"
    gz.parent.mkdir()
    with gzip.open(gz, "wt", encoding="utf-8", newline="") as f:
        f.write("one\r\ntwo\r\n\r\nthree\r\n")
    assert list(parse_source(f"{gz.parent}::doc_split=blank").documents()) == ["one\ntwo\n", "three\n"]
    (tmp_path / "bad.txt.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read .*bad.txt.gz"):
        list(parse_source(str(tmp_path / "bad.txt.gz")).documents())
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(DataError, match="has no"):
        parse_source(str(tmp_path / "empty_folder"))


def test_jsonl_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"question": "q1", "answer": "a1"}\n\n{"question": "q2"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d.jsonl line 3: template key 'answer' is missing"):
        list(parse_source(str(p), template=TEMPLATE).documents())
    with pytest.raises(DataError, match=r"line 1: field 'text' is missing"):
        list(parse_source(str(p)).documents())
    p.write_text('{"text": "ok"}\n{"text": "ok"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d.jsonl line 2: invalid JSON"):
        list(parse_source(str(p)).documents())
    p.write_text('{"text": ["a"]}\n', encoding="utf-8")
    with pytest.raises(DataError, match="is a list, not a string"):
        list(parse_source(str(p)).documents())
    p.write_text('[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match="expected a JSON object"):
        list(parse_source(str(p)).documents())
    p.write_bytes(b'{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match="not valid UTF-8"):
        list(parse_source(str(p)).documents())


def test_mixing_semantics(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": f"a{i:03d}" + "x" * 96}) + "\n" for i in range(200)))  # 100 B docs
    b.write_text("".join(json.dumps({"text": f"b{i:03d}" + "y" * 20}) + "\n" for i in range(400)))  # 24 B docs
    sa, sb = parse_source(f"{a}@3"), parse_source(f"{b}@1")
    mixed = list(mixed_documents([sa, sb], seed=0))
    assert mixed == list(mixed_documents([sa, sb], seed=0))  # deterministic
    by = {"a.jsonl": 0, "b.jsonl": 0}
    for name, doc in mixed:
        by[name] += len(doc)
    assert by["a.jsonl"] == 200 * 100  # a runs out first: the stream stops there
    assert abs(by["a.jsonl"] / sum(by.values()) - 0.75) < 0.01
    # order inside a source is kept
    docs_b = [d for n, d in mixed if n == "b.jsonl"]
    assert docs_b == [f"b{i:03d}" + "y" * 20 for i in range(len(docs_b))]
    # until="all" continues with what is left
    assert len(list(mixed_documents([sa, sb], seed=0, until="all"))) == 600


def test_val_selector():
    pick = ValSelector(0.1, seed=1)
    flags = [pick() for _ in range(1000)]
    assert sum(flags) == 100
    assert all(sum(flags[i:i + 10]) == 1 for i in range(0, 1000, 10))
    again = ValSelector(0.1, seed=1)
    assert [again() for _ in range(1000)] == flags
    other = ValSelector(0.1, seed=2)
    assert [other() for _ in range(1000)] != flags
    pick = ValSelector(0.03, seed=0)
    assert abs(sum(pick() for _ in range(10_000)) - 300) <= 1


def test_datasets_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"q": ["1+1", "2+2"], "a": ["2", "4"]})})
    ds.save_to_disk(str(tmp_path / "saved"))
    s = parse_source(f"datasets:{tmp_path / 'saved'}", template="{q}={a}")
    assert isinstance(s, DatasetsSource)
    assert list(s.documents()) == ["1+1=2", "2+2=4"]
    with pytest.raises(DataError, match="column 'text' not found"):
        list(parse_source(f"datasets:{tmp_path / 'saved'}").documents())
    with pytest.raises(DataError, match="no split 'test'"):
        list(parse_source(f"datasets:{tmp_path / 'saved'}::split=test::field=q").documents())


def test_datasets_missing_package(tmp_path, monkeypatch):
    (tmp_path / "saved").mkdir()
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    s = parse_source(f"datasets:{tmp_path / 'saved'}")
    with pytest.raises(DataError, match="pip install datasets"):
        list(s.documents())


# ---------------------------------------------------------------------------------------------------------
# prepare

@pytest.fixture(scope="module")
def prepared(small, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "out"
    meta = prepare([f"{small}/shakespeare.txt@2", f"{small}/gsm8k.jsonl@1"], out, vocab_size=512,
                   template=TEMPLATE, val_fraction=0.05, shard_tokens=10_000, seed=1, progress=False)
    return out, meta


def test_prepare_meta_consistent_with_shards(prepared, small):
    out, meta = prepared
    assert load_meta(out) == json.loads(json.dumps(meta))
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".bin")) == ["meta.json", "tokenizer.json"]
    assert meta["vocab_size"] == 512 and meta["dtype"] == "uint16" and meta["eos_id"] == 0
    assert meta["tokenizer"]["origin"] == "trained"
    train, val = TokenShards(out, "train"), TokenShards(out, "val")
    assert len(meta["shards"]["train"]) > 1  # shard_tokens=10_000 forces several shards
    assert train.n_tokens == meta["train_tokens"] and val.n_tokens == meta["val_tokens"]
    assert meta["total_tokens"] == train.n_tokens + val.n_tokens
    srcs = meta["sources"]
    assert [s["name"] for s in srcs] == ["shakespeare.txt", "gsm8k.jsonl"]
    assert sum(s["tokens"] for s in srcs) == meta["total_tokens"]
    assert sum(s["val_tokens"] for s in srcs) == meta["val_tokens"]
    assert sum(s["val_bytes"] for s in srcs) == meta["val_bytes"]
    assert sum(s["documents"] for s in srcs) == meta["train_documents"] + meta["val_documents"]
    assert abs(srcs[0]["byte_share"] - 2 / 3) < 0.02  # weights are byte shares
    assert srcs[1]["template"] == TEMPLATE

    tok = load_tokenizer(out)
    eos = meta["eos_id"]
    shakespeare = (small / "shakespeare.txt").read_text(encoding="utf-8")
    gsm = [json.loads(line) for line in (small / "gsm8k.jsonl").read_text(encoding="utf-8").splitlines()]
    gsm_docs = {TEMPLATE.format(**r) for r in gsm}
    for split, shards, n_docs in [("train", train, meta["train_documents"]), ("val", val, meta["val_documents"])]:
        docs = _docs(shards[:], eos)  # EOS after every document, so EOS separates documents
        assert len(docs) == n_docs
        texts = [tok.decode(d.tolist(), skip_special_tokens=False) for d in docs]
        assert all(texts)
        for t in texts:
            assert t in gsm_docs or t in shakespeare
        if split == "val":
            # val_bytes = UTF-8 bytes of the val documents, EOS excluded
            assert meta["val_bytes"] == sum(len(t.encode("utf-8")) for t in texts) == meta["val_token_bytes"]
            lengths = token_byte_lengths(tok)
            assert lengths[shards[:]].sum() == meta["val_bytes"]
    assert meta["val_documents"] >= 1


def test_prepare_deterministic_and_given_tokenizer(prepared, small, tmp_path):
    out, meta = prepared
    again = prepare([f"{small}/shakespeare.txt@2", f"{small}/gsm8k.jsonl@1"], tmp_path / "again",
                    tokenizer=str(out / "tokenizer.json"), template=TEMPLATE, val_fraction=0.05,
                    shard_tokens=10_000, seed=1, progress=False)
    assert again["tokenizer"]["origin"] == "file"
    for split in ("train", "val"):
        np.testing.assert_array_equal(TokenShards(out, split)[:], TokenShards(tmp_path / "again", split)[:])
    assert (tmp_path / "again" / "tokenizer.json").exists()


def test_prepare_max_tokens(small, tmp_path):
    meta = prepare([f"{small}/shakespeare.txt"], tmp_path / "o", vocab_size=300, val_fraction=0.2,
                   max_tokens=5000, progress=False, doc_split="blank")
    assert meta["total_tokens"] <= 5000 and meta["total_tokens"] >= 4900
    assert meta["mixing"]["stopped_by"] == "max_tokens"
    train = TokenShards(tmp_path / "o", "train")[:]
    assert train[-1] == meta["eos_id"]


def test_prepare_overwrite(small, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    args = ([f"{small}/shakespeare.txt"],)
    kw = dict(vocab_size=300, val_fraction=0.2, max_tokens=3000, progress=False, doc_split="blank")
    with pytest.raises(DataError, match="exists and is not empty"):
        prepare(*args, out, **kw)
    assert (out / "keep.txt").read_text() == "old"
    prepare(*args, out, overwrite=True, **kw)
    assert not (out / "keep.txt").exists() and (out / "meta.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["o"]
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare(*args, empty, **kw)  # an existing empty folder is fine
    assert (empty / "train_000.bin").exists()


def test_prepare_streams_in_bounded_memory(tmp_path, tokenizer_file, monkeypatch):
    monkeypatch.setattr(shards_mod.os, "fsync", lambda fd: None)  # speed only: many small shards
    # a ~3.3 MB file; the Python heap must stay far below that (very long lines: test_text_doc_splitting)
    line = "the quick brown fox jumps over the lazy dog, said Grüße to nobody.\n"
    p = tmp_path / "big.txt"
    with open(p, "w", encoding="utf-8") as f:
        for i in range(50_000):
            f.write(line if i % 20 else "\n")
    size = p.stat().st_size
    assert size > 3_000_000
    longest = [0]
    orig = src_mod._read_lines

    def spy(path):
        for piece in orig(path):
            longest[0] = max(longest[0], len(piece))
            yield piece

    # import everything prepare uses first: module imports are Python allocations too
    warm = tmp_path / "warm.txt"
    warm.write_text(line * 50)
    prepare([str(warm)], tmp_path / "warm", tokenizer=str(tokenizer_file), val_fraction=0.1, progress=False,
            doc_split="line")
    monkeypatch.setattr(src_mod, "_read_lines", spy)
    monkeypatch.setattr(prep_mod, "_BATCH_BYTES", 1 << 13)  # the encode batch is the largest transient
    tracemalloc.start()
    try:
        meta = prepare([str(p)], tmp_path / "o", tokenizer=str(tokenizer_file), val_fraction=0.01,
                       shard_tokens=20_000, progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert meta["train_bytes"] + meta["val_bytes"] > 3_000_000
    assert 0 < longest[0] <= src_mod.LINE_LIMIT
    assert peak < size / 6, f"peak Python memory {peak} for a {size} byte file"


# ---------------------------------------------------------------------------------------------------------
# prepare errors: one-line DataError, and no output folder left behind

def _prepare_fails(tmp_path, sources, match, **kw):
    kw.setdefault("vocab_size", 300)
    kw.setdefault("progress", False)
    with pytest.raises(DataError, match=match) as info:
        prepare(sources, tmp_path / "out", **kw)
    assert "\n" not in str(info.value)
    _no_leftovers(tmp_path, "out")
    return info


def test_prepare_errors(tmp_path, small):
    _prepare_fails(tmp_path, [str(tmp_path / "missing.txt")], "file not found")
    _prepare_fails(tmp_path, [str(tmp_path / "nothing" / "*.txt")], "matches no files")
    _prepare_fails(tmp_path, ["what:ever"], "unknown source spec")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n")
    _prepare_fails(tmp_path, [str(blank)], "no training text")
    _prepare_fails(tmp_path, [f"{small}/gsm8k.jsonl"], r"gsm8k.jsonl line 1: field 'text' is missing")
    _prepare_fails(tmp_path, [f"{small}/gsm8k.jsonl"], r"template key 'answr' is missing",
                   template="{question} {answr}")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Just one short document.\n")
    info = _prepare_fails(tmp_path, [str(tiny)], "val split is empty")
    assert "val_fraction" in str(info.value)
    _prepare_fails(tmp_path, ["synthetic"], "set max_tokens")
    _prepare_fails(tmp_path, [str(tiny)], "val_fraction must be in", val_fraction=0.0)
    _prepare_fails(tmp_path, [str(tiny)], "vocab_size must be >= 257", vocab_size=100)
    _prepare_fails(tmp_path, [str(tiny)], "tokenizer file not found", tokenizer=str(tmp_path / "nope.json"))
    bad_tok = tmp_path / "bad.json"
    bad_tok.write_text("{not json")
    _prepare_fails(tmp_path, [str(tiny)], "not a valid tokenizer.json", tokenizer=str(bad_tok))


def test_prepare_fails_late_without_leftovers(tmp_path, small):
    # the bad record comes after many good ones, when shards are already being written
    lines = (small / "gsm8k.jsonl").read_text(encoding="utf-8").splitlines()
    bad = tmp_path / "late.jsonl"
    bad.write_text("\n".join(lines[:150] + ['{"question": "q", "answer": '] + lines[150:]) + "\n")
    _prepare_fails(tmp_path, [str(bad)], r"late.jsonl line 151: invalid JSON", template=TEMPLATE,
                   tokenizer_train_bytes=2000)
    # the parent folders prepare had to create are removed too
    with pytest.raises(DataError):
        prepare([str(bad)], tmp_path / "a" / "b" / "out", vocab_size=300, template=TEMPLATE, progress=False)
    assert not (tmp_path / "a").exists()


def test_prepare_out_of_range_tokenizer(tmp_path, tokenizer_file, small):
    spec = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    token = next(t for t, i in vocab.items() if i == max(vocab.values()))
    vocab[token] = 70_000  # a sparse id: the embedding table (vocab size 512) has no row for it
    bad = tmp_path / "sparse.json"
    bad.write_text(json.dumps(spec), encoding="utf-8")
    _prepare_fails(tmp_path, [f"{small}/shakespeare.txt"], r"token id 70000 is out of range", tokenizer=str(bad))


def test_prepare_tokenizer_without_eos(tmp_path, tokenizer_file, small):
    spec = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    spec["added_tokens"] = []
    spec["model"]["vocab"].pop("<|endoftext|>")
    spec["model"]["vocab"]["<|zzz|>"] = 0
    bad = tmp_path / "noeos.json"
    bad.write_text(json.dumps(spec), encoding="utf-8")
    _prepare_fails(tmp_path, [f"{small}/shakespeare.txt"], "no end-of-text token", tokenizer=str(bad))


# ---------------------------------------------------------------------------------------------------------
# synthetic source (written in parallel; skipped until it exists)

def test_prepare_synthetic(tmp_path, small):
    synthetic = pytest.importorskip("dualpath.data.synthetic")
    cfg = synthetic.SyntheticConfig()
    meta = prepare(["synthetic@1", f"{small}/shakespeare.txt@1"], tmp_path / "o", vocab_size=400,
                   val_fraction=0.05, synthetic=cfg, synthetic_eval_per_category=3, progress=False)
    assert meta["eval_examples"] == "eval_examples.jsonl"
    rows = [json.loads(line) for line in (tmp_path / "o" / "eval_examples.jsonl").read_text().splitlines()]
    assert rows and len(rows) == meta["eval_examples_count"]
    for r in rows:
        assert {"category", "text", "prompt", "answer", "answer_start", "answer_end"} <= set(r)
    names = {s["name"]: s for s in meta["sources"]}
    assert names["synthetic"]["documents"] > 0 and names["synthetic"]["finite"] is False
    only = prepare(["synthetic"], tmp_path / "s", vocab_size=400, val_fraction=0.1, max_tokens=20_000,
                   synthetic=cfg, synthetic_eval_per_category=0, progress=False)
    assert only["total_tokens"] <= 20_000 and only["eval_examples"] is None

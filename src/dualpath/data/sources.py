"""Streaming text sources and their weighted mixing (see docs/DATA.md).

A source spec is ``BODY[@WEIGHT][::KEY=VALUE]...`` (the ``@WEIGHT`` may also close the whole spec):

    data/tinyshakespeare.txt            a text file (also ``.txt.gz``)
    data/*.txt                          a glob (sorted)
    data/books/                         a folder: every ``*.txt`` inside, sorted
    gsm8k/train.jsonl::template={question}\\n{answer}
                                        JSON lines; ``field=NAME`` (default ``text``) or ``template=...``
    datasets:path/to/saved              a folder written by ``datasets.Dataset.save_to_disk``
    hf:roneneldan/TinyStories::split=train::field=text
                                        a Hugging Face hub dataset, streamed (needs internet)
    synthetic                           the synthetic task generator (unlimited)

Options after ``::`` override the keyword defaults given to `parse_source`; in inline values the escapes
``\\n``, ``\\t`` and ``\\\\`` are decoded. Every source is streamed: files are read line by line with a bounded
line length and documents have a bounded size, so memory stays flat on files larger than RAM.
"""

from __future__ import annotations

import abc

import glob as _glob
import gzip
import io
import json
import math
import os
import re
import string
import zlib
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from ..errors import DataError

DOC_SPLITS = ("chunk", "blank", "heading", "line", "file")
LINE_LIMIT = 1 << 16  # characters per read: a file without newlines is still read in bounded pieces
DEFAULT_CHUNK_BYTES = 8192
DEFAULT_MAX_DOC_BYTES = 1 << 20
_OPTION_KEYS = ("weight", "field", "template", "split", "config", "doc_split", "chunk_bytes", "max_doc_bytes",
                "synthetic", "name")
_WIKI_HEADING = re.compile(r"^ ?= [^=].* = ?$")  # wikitext top-level heading " = Title = "


def decode_escapes(s: str) -> str:
    r"""Decode ``\n``, ``\t`` and ``\\`` (as typed on a command line) into the characters they stand for."""
    return re.sub(r"\\(\\|n|t)", lambda m: {"\\": "\\", "n": "\n", "t": "\t"}[m.group(1)], s)


def _check_template(template: str, where: str) -> list[str]:
    try:
        keys = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise DataError(f"{where}: bad template {template!r}: {e}") from None
    for k in keys:
        if k == "" or k.isdigit():
            raise DataError(f"{where}: template {template!r} uses a positional field; name the record key, "
                            f"e.g. {{question}}")
    return keys


def _record_text(record: Any, field: str | None, template: str | None, where: str) -> str:
    """The document text of one record (a JSON object / dataset row)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if template is not None:
        try:
            return template.format_map(record)
        except KeyError as e:
            keys = ", ".join(map(str, record)) or "none"
            raise DataError(f"{where}: template key {e.args[0]!r} is missing (record keys: {keys})") from None
        except (IndexError, ValueError, AttributeError, TypeError) as e:
            raise DataError(f"{where}: cannot apply template {template!r}: {e}") from None
    assert field is not None
    if field not in record:
        keys = ", ".join(map(str, record)) or "none"
        raise DataError(f"{where}: field {field!r} is missing (record keys: {keys})")
    value = record[field]
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: field {field!r} is a {type(value).__name__}, not a string")


def _open_text(path: Path) -> io.TextIOBase:
    """Open a (possibly gzipped) UTF-8 text file; a BOM is dropped, newlines are normalised to \\n."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def _read_lines(path: Path) -> Iterator[str]:
    """Lines of a text file, each at most LINE_LIMIT characters (longer lines come in pieces)."""
    try:
        with _open_text(path) as f:
            lineno = 0
            while True:
                try:
                    line = f.readline(LINE_LIMIT)
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}: not valid UTF-8 near line {lineno + 1} ({e.reason})") from None
                if not line:
                    return
                if line.endswith("\n"):
                    lineno += 1
                yield line
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except (OSError, EOFError, zlib.error) as e:  # includes a corrupt .gz
        raise DataError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def _utf8_len(s: str) -> int:
    return len(s) if s.isascii() else len(s.encode("utf-8"))


@dataclass
class Source(abc.ABC):
    """A named, weighted, re-iterable stream of documents (strings without EOS).

    `documents()` returns a fresh iterator each call (prepare makes two passes: tokenizer sample, then
    tokenization). `finite` is False for unlimited generators (synthetic).
    """

    spec: str
    name: str
    kind: str
    weight: float = 1.0
    finite: bool = True
    options: dict = dc_field(default_factory=dict)

    @abc.abstractmethod
    def documents(self) -> Iterator[str]:
        """The source's documents, streamed."""

    def describe(self) -> dict:
        d = {"spec": self.spec, "name": self.name, "kind": self.kind, "weight": self.weight, "finite": self.finite}
        d.update({k: v for k, v in self.options.items() if isinstance(v, (str, int, float, bool, type(None)))})
        return d


@dataclass
class TextSource(Source):
    """Plain-text files, split into documents by `doc_split`:

    - ``chunk`` (default): chunks of about `chunk_bytes` bytes. Once a chunk has `chunk_bytes` it ends at the
      next blank (whitespace-only) line, and at the latest at 2 x `chunk_bytes`, always on a line boundary.
      Suits books and plays (tinyshakespeare, Grimm's tales): EOS tokens are rare and fall between paragraphs.
    - ``blank``: every run of blank lines ends a document (paragraphs / speeches).
    - ``heading``: a wikitext top-level heading line `` = Title = `` starts a new document (one per article).
    - ``line``: every non-blank line is a document.
    - ``file``: every file is one document.
    In every mode a document never spans two files, leading and trailing blank lines of a document are
    dropped, and a document is cut (on a line boundary) once it exceeds `max_doc_bytes`.
    """

    paths: list = dc_field(default_factory=list)
    doc_split: str = "chunk"
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    max_doc_bytes: int = DEFAULT_MAX_DOC_BYTES

    def documents(self) -> Iterator[str]:
        for path in self.paths:
            yield from self._file_documents(Path(path))

    def _file_documents(self, path: Path) -> Iterator[str]:
        mode = self.doc_split
        cap = min(self.max_doc_bytes, 2 * self.chunk_bytes) if mode == "chunk" else self.max_doc_bytes
        parts: list[str] = []
        size = 0          # bytes in parts, including pending blank lines
        pending: list[str] = []  # blank lines seen after the last text line of the current document

        def flush() -> Iterator[str]:
            nonlocal parts, size, pending
            if parts:
                yield "".join(parts)
            parts, size, pending = [], 0, []

        for line in _read_lines(path):
            blank = not line.strip()
            if mode == "line":
                if not blank:
                    yield line
                continue
            if blank:
                if not parts:
                    continue  # leading blank lines are dropped
                if mode == "blank" or (mode == "chunk" and size >= self.chunk_bytes):
                    yield from flush()
                    continue
                pending.append(line)
                continue
            if mode == "heading" and parts and _WIKI_HEADING.match(line):
                yield from flush()
            n = _utf8_len(line)
            if parts and size + n > cap and size > 0:
                yield from flush()
            if pending:
                parts.extend(pending)
                size += sum(map(_utf8_len, pending))
                pending = []
            parts.append(line)
            size += n
        yield from flush()


@dataclass
class JsonlSource(Source):
    """JSON-lines files: one document per record, `field` or `template` (Python format with record keys)."""

    paths: list = dc_field(default_factory=list)
    field: str | None = "text"
    template: str | None = None

    def documents(self) -> Iterator[str]:
        for path in self.paths:
            path = Path(path)
            lineno = 0
            pending = ""  # a line longer than LINE_LIMIT arrives in pieces
            for piece in _read_lines(path):
                if not piece.endswith("\n"):
                    pending += piece
                    continue
                line, pending = pending + piece, ""
                lineno += 1
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {lineno}: invalid JSON ({e.msg})") from None
                yield _record_text(record, self.field, self.template, f"{path} line {lineno}")
            if pending.strip():
                lineno += 1
                try:
                    record = json.loads(pending)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {lineno}: invalid JSON ({e.msg})") from None
                yield _record_text(record, self.field, self.template, f"{path} line {lineno}")


def _import_datasets(what: str):
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise DataError(f"{what} needs the Hugging Face datasets package: pip install datasets") from None
    return datasets


@dataclass
class DatasetsSource(Source):
    """A local Hugging Face dataset folder written by `save_to_disk` (a Dataset or a DatasetDict)."""

    path: str = ""
    split: str = "train"
    field: str | None = "text"
    template: str | None = None

    def _dataset(self):
        datasets = _import_datasets(f"source {self.spec!r}")
        try:
            ds = datasets.load_from_disk(self.path)
        except FileNotFoundError as e:
            raise DataError(f"{self.path}: not a saved datasets folder ({e})".splitlines()[0]) from None
        if isinstance(ds, datasets.DatasetDict):
            if self.split not in ds:
                raise DataError(f"{self.path}: no split {self.split!r} (splits: {', '.join(ds)})")
            ds = ds[self.split]
        names = set(ds.column_names)
        keys = _check_template(self.template, self.spec) if self.template is not None else [self.field]
        missing = [k for k in keys if k not in names]
        if missing:
            raise DataError(f"{self.path}: column {missing[0]!r} not found (columns: {', '.join(sorted(names))})")
        return ds

    def documents(self) -> Iterator[str]:
        ds = self._dataset()
        for i, row in enumerate(ds):
            yield _record_text(row, self.field, self.template, f"{self.path} row {i}")


@dataclass
class HFSource(Source):
    """A Hugging Face hub dataset read with `datasets.load_dataset(name, config, split=..., streaming=True)`."""

    dataset: str = ""
    config: str | None = None
    split: str = "train"
    field: str | None = "text"
    template: str | None = None

    def documents(self) -> Iterator[str]:  # pragma: no cover - needs the network
        datasets = _import_datasets(f"source {self.spec!r}")
        try:
            ds = datasets.load_dataset(self.dataset, self.config, split=self.split, streaming=True)
        except Exception as e:  # the hub raises many different types
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise DataError(f"cannot load hf:{self.dataset} split {self.split!r}: {type(e).__name__}: {msg}") from None
        for i, row in enumerate(ds):
            yield _record_text(row, self.field, self.template, f"hf:{self.dataset} row {i}")


@dataclass
class SyntheticSource(Source):
    """Documents from `dualpath.data.synthetic.train_documents(cfg)` (unlimited)."""

    config: Any = None

    def synthetic_module(self):
        try:
            from . import synthetic
        except ImportError as e:
            raise DataError(f"synthetic source needs dualpath.data.synthetic, which cannot be imported ({e})") from None
        return synthetic

    def resolved_config(self):
        if self.config is None:
            self.config = self.synthetic_module().SyntheticConfig()
        return self.config

    def documents(self) -> Iterator[str]:
        mod = self.synthetic_module()
        return iter(mod.train_documents(self.resolved_config()))


# ---------------------------------------------------------------------------------------------------------
# Spec parsing

def _split_weight(body: str) -> tuple[str, float | None]:
    head, at, tail = body.rpartition("@")
    if at and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return body, None


def _expand_paths(pattern: str, exts: tuple[str, ...]) -> list[Path]:
    p = Path(os.path.expanduser(pattern))
    if p.is_dir():
        files = sorted(q for q in p.iterdir() if q.is_file() and q.name.endswith(exts))
        if not files:
            raise DataError(f"folder {p} has no {' or '.join('*' + e for e in exts)} files")
        return files
    if _glob.has_magic(pattern):
        files = sorted(Path(q) for q in _glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(q))
        if not files:
            raise DataError(f"glob {pattern!r} matches no files")
        return files
    if not p.exists():
        raise DataError(f"file not found: {p}")
    if not p.is_file():
        raise DataError(f"not a file: {p}")
    return [p]


def _is_jsonl(name: str) -> bool:
    return name.endswith((".jsonl", ".jsonl.gz", ".ndjson"))


def parse_source(spec: str, **defaults: Any) -> Source:
    """Parse one source spec ``BODY[@WEIGHT][::KEY=VALUE]...[@WEIGHT]`` into a `Source` (files must exist).

    `defaults` (all optional; inline ``::key=value`` options win): weight (1.0), field, template (jsonl,
    datasets: and hf: sources; default field "text"; give one of them), split ("train", for datasets:/hf:),
    config (hf: dataset config name), doc_split ("chunk"), chunk_bytes (8192), max_doc_bytes (1 MiB),
    synthetic (a SyntheticConfig for the synthetic source), name (the source's name in meta.json).
    Defaults that do not apply to the source's kind are ignored. Raises DataError on a bad spec.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty source spec {spec!r}")
    unknown = sorted(set(defaults) - set(_OPTION_KEYS))
    if unknown:
        raise DataError(f"unknown source option {unknown[0]!r} (known: {', '.join(_OPTION_KEYS)})")
    parts = spec.strip().split("::")
    body, weight = _split_weight(parts[0].strip())
    if len(parts) > 1:  # the weight may also close the whole spec: "a.jsonl::field=q@2"
        parts[-1], tail_weight = _split_weight(parts[-1])
        if tail_weight is not None:
            if weight is not None:
                raise DataError(f"source {spec!r}: weight given twice")
            weight = tail_weight
    inline: dict[str, Any] = {}
    for opt in parts[1:]:
        key, eq, value = opt.partition("=")
        key = key.strip()
        if not eq or key not in _OPTION_KEYS or key == "synthetic":
            raise DataError(f"source {spec!r}: bad option {opt!r} (use ::key=value with key one of "
                            f"{', '.join(k for k in _OPTION_KEYS if k != 'synthetic')})")
        inline[key] = decode_escapes(value)
    opts = {k: v for k, v in defaults.items() if v is not None}
    if "template" in inline and "field" not in inline:
        opts.pop("field", None)
    if "field" in inline and "template" not in inline:
        opts.pop("template", None)
    opts.update(inline)
    if weight is None:
        weight = opts.get("weight", 1.0)
    try:
        weight = float(weight)
    except (TypeError, ValueError):
        raise DataError(f"source {spec!r}: weight {weight!r} is not a number") from None
    if not math.isfinite(weight) or weight <= 0:
        raise DataError(f"source {spec!r}: weight must be a positive number, got {weight}")

    def int_opt(key: str, default: int) -> int:
        value = opts.get(key, default)
        try:
            value = int(value)
        except (TypeError, ValueError):
            raise DataError(f"source {spec!r}: {key}={value!r} is not an integer") from None
        if value < 1:
            raise DataError(f"source {spec!r}: {key} must be >= 1, got {value}")
        return value

    def record_opts() -> dict:
        field, template = opts.get("field"), opts.get("template")
        if field is not None and template is not None:
            raise DataError(f"source {spec!r}: give field or template, not both")
        if template is not None:
            _check_template(template, f"source {spec!r}")
            return {"field": None, "template": template}
        return {"field": field or "text", "template": None}

    name = opts.get("name")
    common = {"spec": spec, "weight": weight}
    if body == "synthetic":
        return SyntheticSource(name=name or "synthetic", kind="synthetic", finite=False,
                               config=defaults.get("synthetic"), **common)
    if body.startswith("hf:"):
        dataset = body[3:].strip()
        if not dataset:
            raise DataError(f"source {spec!r}: hf: needs a dataset name, e.g. hf:roneneldan/TinyStories")
        ro = record_opts()
        split = str(opts.get("split", "train"))
        config = opts.get("config")
        return HFSource(name=name or f"hf:{dataset}", kind="hf", dataset=dataset, config=config, split=split,
                        options={"split": split, "config": config, **ro}, **ro, **common)
    if body.startswith("datasets:"):
        path = Path(os.path.expanduser(body[len("datasets:"):].strip()))
        if not path.is_dir():
            raise DataError(f"datasets folder not found: {path}")
        ro = record_opts()
        split = str(opts.get("split", "train"))
        return DatasetsSource(name=name or path.name, kind="datasets", path=str(path), split=split,
                              options={"split": split, **ro}, **ro, **common)
    exists = Path(os.path.expanduser(body)).exists()
    url_like = re.match(r"^[A-Za-z][\w+.-]*://", body) or re.match(r"^[A-Za-z]{2,}:", body)
    bare_word = "/" not in body and os.sep not in body and "." not in body and not _glob.has_magic(body)
    if not exists and (url_like or bare_word):
        raise DataError(f"unknown source spec {spec!r} (use a file, glob, folder, datasets:PATH, hf:NAME or synthetic)")
    is_dir = Path(os.path.expanduser(body)).is_dir()
    if is_dir:
        paths = _expand_paths(body, (".txt", ".txt.gz"))
    else:
        paths = _expand_paths(body, ())
    jsonl = [p for p in paths if _is_jsonl(p.name)]
    if jsonl and len(jsonl) != len(paths):
        raise DataError(f"source {spec!r} mixes jsonl and text files; give them as separate sources")
    default_name = Path(body).name if not _glob.has_magic(body) else body
    if jsonl:
        ro = record_opts()
        return JsonlSource(name=name or default_name, kind="jsonl", paths=paths, options=dict(ro), **ro, **common)
    doc_split = str(opts.get("doc_split", "chunk"))
    if doc_split not in DOC_SPLITS:
        raise DataError(f"source {spec!r}: doc_split must be one of {', '.join(DOC_SPLITS)}, got {doc_split!r}")
    chunk_bytes = int_opt("chunk_bytes", DEFAULT_CHUNK_BYTES)
    max_doc_bytes = int_opt("max_doc_bytes", DEFAULT_MAX_DOC_BYTES)
    return TextSource(name=name or (default_name.rstrip("/") or body), kind="text", paths=paths,
                      doc_split=doc_split, chunk_bytes=chunk_bytes, max_doc_bytes=max_doc_bytes,
                      options={"doc_split": doc_split, "chunk_bytes": chunk_bytes, "max_doc_bytes": max_doc_bytes,
                               "files": len(paths)}, **common)


def unique_names(sources: list[Source]) -> list[Source]:
    """Make source names unique in place (``name``, ``name#2``, ...)."""
    seen: dict[str, int] = {}
    for s in sources:
        n = seen.get(s.name, 0) + 1
        seen[s.name] = n
        if n > 1:
            s.name = f"{s.name}#{n}"
    return sources


# ---------------------------------------------------------------------------------------------------------
# Mixing

def mixed_documents(sources: list[Source], seed: int = 0, *, until: str = "first") -> Iterator[tuple[str, str]]:
    """Interleave the documents of weighted sources; yields (source name, document).

    Weights are normalised to target shares of UTF-8 *bytes*. The next document always comes from the
    source furthest below its share, i.e. with the smallest bytes_emitted / weight (ties broken by a
    seeded random order of the sources), so after any prefix each source's byte share is within one
    document of its target. Documents keep their order within a source. The stream stops when the first
    finite source is exhausted (``until="first"``, default: the shares hold to the end), or continues with
    the remaining sources until all are exhausted (``until="all"``). If every source is unlimited the
    stream is unlimited: the caller must stop it (prepare's max_tokens). Empty and whitespace-only
    documents are skipped.
    """
    if until not in ("first", "all"):
        raise DataError(f"until must be 'first' or 'all', got {until!r}")
    if not sources:
        raise DataError("no sources given")
    weights = np.array([s.weight for s in sources], dtype=np.float64)
    if (weights <= 0).any() or not np.isfinite(weights).all():
        raise DataError("source weights must be positive numbers")
    weights = weights / weights.sum()
    priority = np.random.default_rng([int(seed), 0x6D1C]).permutation(len(sources))
    emitted = [0] * len(sources)
    iters: list[Iterator[str] | None] = [iter(s.documents()) for s in sources]
    active = list(range(len(sources)))
    while active:
        k = min(active, key=lambda j: (emitted[j] / weights[j], priority[j]))
        doc = next(iters[k], None)  # type: ignore[arg-type]
        if doc is None:
            if until == "first":
                return
            active.remove(k)
            iters[k] = None
            continue
        if not doc.strip():
            continue
        emitted[k] += _utf8_len(doc)
        yield sources[k].name, doc


def iter_specs(specs: Iterable[str], **defaults: Any) -> list[Source]:
    """`parse_source` over several specs, with unique names."""
    return unique_names([parse_source(s, **defaults) for s in specs])

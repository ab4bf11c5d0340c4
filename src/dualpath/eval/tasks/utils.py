"""Data loaders and document builders for the dualpath lm-eval tasks (the YAML files beside this one).

Each task's YAML names its default file under `dataset_kwargs.data_files` (lm-eval's `dataset_path: json`
layout) and loads it through `custom_dataset`, which lm-eval calls with the task's `metadata` (from
`--metadata`, merged with `--model_args`) and `dataset_kwargs`. So a file can be chosen, in order of
precedence, by

    --metadata '{"gsm8k_path": "/data/gsm8k/test.jsonl"}'     (keys below; Python API: metadata={...})
    an environment variable                                   (DUALPATH_GSM8K_PATH, ...)
    the YAML's dataset_kwargs.data_files                       (copy the YAML to change it for good)

Keys: gsm8k_path, gsm8k_train_path (few-shot pool) | text_path, text_split | cloze_path, cloze_choices.

Reading is done here (JSON lines / plain text into a `datasets.Dataset`), so nothing is cached under
~/.cache/huggingface and nothing needs the network.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

try:
    from dualpath.errors import DataError
except ImportError:  # a copy of this file used without dualpath installed
    class DataError(Exception):
        pass


# ----------------------------------------------------------------------------------------------
# Shared helpers


def _pick_path(kwargs: dict, key: str, env: str, split: str = "test", required: bool = True) -> Path | None:
    """The file for `split`: metadata key, else environment variable, else dataset_kwargs.data_files."""
    value = kwargs.get(key) or os.environ.get(env)
    explicit = bool(value)
    if not value:
        files = kwargs.get("data_files")
        if isinstance(files, dict):
            value = files.get(split)
        elif split == "test":
            value = files
        if isinstance(value, (list, tuple)):
            value = value[0] if len(value) == 1 else None
    if not value:
        if required:
            raise DataError(f"no {split} file: pass --metadata '{{\"{key}\": \"PATH\"}}' or set {env}")
        return None
    path = Path(str(value)).expanduser()
    if not path.is_file():
        if required or explicit:
            raise DataError(f"{split} file not found: {path} (set it with --metadata '{{\"{key}\": \"PATH\"}}' "
                            f"or {env})")
        return None
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataError(f"{path}:{n}: invalid JSON") from None
    if not rows:
        raise DataError(f"{path} holds no records")
    return rows


def _dataset(rows: list[dict], columns: tuple[str, ...] = ()):
    import datasets

    if not rows:
        return datasets.Dataset.from_dict({c: [] for c in columns})
    return datasets.Dataset.from_list(rows)


def _dataset_dict(**splits):
    import datasets

    return datasets.DatasetDict(splits)


# ----------------------------------------------------------------------------------------------
# dualpath_gsm8k_local


def load_gsm8k(**kwargs):
    """GSM8K-style JSON lines ({"question", "answer"}); test split, and a train split for few-shot examples."""
    test = _pick_path(kwargs, "gsm8k_path", "DUALPATH_GSM8K_PATH", "test")
    train = _pick_path(kwargs, "gsm8k_train_path", "DUALPATH_GSM8K_TRAIN_PATH", "train", required=False)

    def rows(path):
        out = []
        for i, r in enumerate(read_jsonl(path)):
            if "question" not in r or "answer" not in r:
                raise DataError(f"{path}: record {i + 1} lacks 'question' or 'answer'")
            out.append({"question": str(r["question"]), "answer": str(r["answer"])})
        return out

    return _dataset_dict(test=_dataset(rows(test)),
                         train=_dataset(rows(train) if train else [], ("question", "answer")))


# ----------------------------------------------------------------------------------------------
# dualpath_text_ppl

_WIKI_HEADING = re.compile(r"^ = [^=].* = $")  # a top-level wikitext heading line, " = Title = "
TEXT_SPLITS = ("auto", "wikitext", "paragraphs", "lines", "whole")


def split_text(text: str, mode: str = "auto") -> list[str]:
    """Documents of a text file.

    wikitext: one document per article (a line " = Title = " starts one); paragraphs: blocks separated by
    blank (whitespace-only) lines; lines: non-blank lines; whole: the file; auto: wikitext when the file
    has at least two such headings, else paragraphs. Documents are stripped; empty ones are dropped.
    """
    if mode not in TEXT_SPLITS:
        raise DataError(f"text_split='{mode}' is not one of {', '.join(TEXT_SPLITS)}")
    lines = text.splitlines(keepends=True)
    if mode == "auto":
        headings = sum(1 for ln in lines if _WIKI_HEADING.match(ln.rstrip("\r\n")))
        mode = "wikitext" if headings >= 2 else "paragraphs"
    if mode == "whole":
        docs = [text]
    elif mode == "lines":
        docs = lines
    elif mode == "wikitext":
        docs, cur = [], []
        for ln in lines:
            if _WIKI_HEADING.match(ln.rstrip("\r\n")) and any(x.strip() for x in cur):
                docs.append("".join(cur))
                cur = []
            cur.append(ln)
        docs.append("".join(cur))
    else:
        docs, cur = [], []
        for ln in lines:
            if ln.strip():
                cur.append(ln)
            elif cur:
                docs.append("".join(cur))
                cur = []
        docs.append("".join(cur))
    return [d.strip() for d in docs if d.strip()]


def load_text(**kwargs):
    """Any UTF-8 text file, split into documents (see split_text); one column, `text`."""
    path = _pick_path(kwargs, "text_path", "DUALPATH_TEXT_PATH", "test")
    mode = str(kwargs.get("text_split") or os.environ.get("DUALPATH_TEXT_SPLIT") or "auto")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None
    docs = split_text(text, mode)
    if not docs:
        raise DataError(f"{path} holds no text")
    return _dataset_dict(test=_dataset([{"text": d} for d in docs]))


# ----------------------------------------------------------------------------------------------
# dualpath_synthetic_cloze


def _question_patterns() -> list[tuple[re.Pattern, str]]:
    """(regex over the question, kind) for the synthetic corpus's question templates."""
    try:
        from dualpath.data.synthetic import EVAL_QUESTIONS, TRAIN_QUESTIONS
    except ImportError:
        return []
    out = []
    for table in (EVAL_QUESTIONS, TRAIN_QUESTIONS):
        for kind, templates in table.items():
            for t in templates:
                pat = re.escape(t)
                pat = pat.replace(re.escape("{name}"), r"(?P<name>.+?)")
                pat = pat.replace(re.escape("{a_rel}"), r"an?\ (?P<rel>.+?)")
                pat = pat.replace(re.escape("{rel}"), r"(?P<rel>.+?)")
                out.append((re.compile("^" + pat + "$"), kind))
    return out


def fact_attribute(prompt: str, answer: str, patterns=None) -> tuple[str, str]:
    """(attribute, kind) of a fact query: attribute is city | job | birth_year | the relation ("mentor", ...);
    kind is city | job | birth_year | relation. Unknown phrasings fall back on the answer's shape."""
    q = prompt.strip()
    if q.startswith("Q:"):
        q = q[2:]
    q = q.split("\nA:")[0].strip()
    for pat, kind in (patterns if patterns is not None else _question_patterns()):
        m = pat.match(q)
        if m:
            return (m.group("rel") if kind == "relation" else kind), kind
    kind = "birth_year" if answer.strip().isdigit() else "other"
    return kind, kind


def cloze_docs(dataset):
    """lm-eval process_docs: keep the fact queries and give each `choices` (the answer and distractors) and
    `label` (the answer's index).

    Distractors are other answers of the same attribute (the same relation, for people), topped up with answers
    of the same kind (city | job | birth_year | relation) when the attribute has too few; never an answer of
    another kind, so a query may get fewer choices than asked for in a small file, and a query whose kind has
    no other answer is dropped. The number of choices is the row's `n_choices` (set by load_cloze from the
    metadata key cloze_choices), default 4. Distractors and the answer's position are drawn with a seed from
    the prompt, so they are reproducible.
    """
    rows = [dict(r) for r in dataset if r.get("category", "fact") == "fact" and r.get("answer")]
    if not rows:
        raise DataError("no fact queries (category 'fact' with an answer) in the cloze file")
    patterns = _question_patterns()
    by_attr: dict[str, list[str]] = {}
    by_kind: dict[str, list[str]] = {}
    for r in rows:
        r["answer"] = str(r["answer"]).strip()
        r["attribute"], r["kind"] = fact_attribute(r["prompt"], r["answer"], patterns)
        for pool in (by_attr.setdefault(r["attribute"], []), by_kind.setdefault(r["kind"], [])):
            if r["answer"] not in pool:
                pool.append(r["answer"])
    out = []
    for r in rows:
        n = max(2, int(r.get("n_choices") or 4))
        rng = random.Random(f"dualpath-cloze/{r['prompt']}/{r['answer']}")
        distractors: list[str] = []
        for pool in (by_attr[r["attribute"]], by_kind[r["kind"]]):
            others = [a for a in pool if a != r["answer"] and a not in distractors]
            rng.shuffle(others)
            distractors += others[:n - 1 - len(distractors)]
        if not distractors:
            continue
        choices = distractors + [r["answer"]]
        rng.shuffle(choices)
        out.append({"prompt": r["prompt"], "answer": r["answer"], "attribute": r["attribute"], "kind": r["kind"],
                    "choices": choices, "label": choices.index(r["answer"])})
    if not out:
        raise DataError("no fact query has another answer of its kind to use as a distractor")
    return _dataset(out)


def load_cloze(**kwargs):
    """eval_examples.jsonl from `dualpath prepare` (synthetic source): its rows, with n_choices attached."""
    path = _pick_path(kwargs, "cloze_path", "DUALPATH_CLOZE_PATH", "test")
    n = int(kwargs.get("cloze_choices") or os.environ.get("DUALPATH_CLOZE_CHOICES") or 4)
    if n < 2:
        raise DataError(f"cloze_choices must be >= 2, got {n}")
    rows = []
    for i, r in enumerate(read_jsonl(path)):
        if "prompt" not in r or "answer" not in r:
            raise DataError(f"{path}: record {i + 1} lacks 'prompt' or 'answer'")
        rows.append({"category": str(r.get("category", "fact")), "prompt": str(r["prompt"]),
                     "answer": str(r["answer"]), "n_choices": n})
    return _dataset_dict(test=_dataset(rows))

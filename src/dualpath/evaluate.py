"""Evaluation: loss, perplexity and exact bits per byte on token shards, raw text or labelled examples.

Bits per byte are exact: the summed cross-entropy (nats) of the target tokens divided by ln 2 and by the
UTF-8 bytes those tokens decode to. Labelled examples (the synthetic corpus's eval split, or Q/A JSONL such
as GSM8K) also give per-category BPB, the loss on the answer tokens, and greedy exact-match accuracy.
"""

from __future__ import annotations

import math
import re
import time
from collections import defaultdict
from pathlib import Path

import torch

from .errors import DataError
from .generate import generate_tokens
from .model import Overrides

LN2 = math.log(2.0)


def load_tokenizer(folder: str | Path):
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"no tokenizer.json in {folder}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own exception types
        raise DataError(f"cannot read {path}: {str(e).splitlines()[0][:160]}") from None


def check_tokenizer(tokenizer, model) -> None:
    n = tokenizer.get_vocab_size()
    if n > model.cfg.vocab_size:
        raise DataError(f"the tokenizer has {n} tokens but the model's vocabulary is {model.cfg.vocab_size}: "
                        "they do not belong together")


def _eos(tokenizer) -> int:
    eos = tokenizer.token_to_id("<|endoftext|>")
    return 0 if eos is None else eos


@torch.inference_mode()
def score_sequences(model, seqs: list[list[int]], batch_size: int = 16, overrides: Overrides | None = None
                    ) -> list[torch.Tensor]:
    """Per-token losses (nats) of each sequence's tokens after its first, batched with right padding."""
    device = next(model.parameters()).device
    ctx = model.cfg.seq_len
    out: list[torch.Tensor] = [None] * len(seqs)  # type: ignore[list-item]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths share a batch
    for b in range(0, len(order), batch_size):
        rows = order[b:b + batch_size]
        chunk = [seqs[i][:ctx + 1] for i in rows]
        T = max(len(s) for s in chunk) - 1
        x = torch.zeros(len(chunk), T, dtype=torch.long)
        y = torch.full((len(chunk), T), -1, dtype=torch.long)
        for r, s in enumerate(chunk):
            x[r, :len(s) - 1] = torch.tensor(s[:-1])
            y[r, :len(s) - 1] = torch.tensor(s[1:])
        res = model(x.to(device), y.to(device), overrides=overrides, return_per_token_loss=True)
        for r, i in enumerate(rows):
            out[i] = res.per_token_loss[r, :len(chunk[r]) - 1].float().cpu()
    return out


def evaluate_text(model, tokenizer, text: str, batch_size: int = 8, overrides: Overrides | None = None) -> dict:
    """Loss, perplexity and BPB of raw text, in non-overlapping context-sized windows."""
    ids = tokenizer.encode(text).ids
    if len(ids) < 2:
        raise DataError("the text is too short to evaluate (fewer than 2 tokens)")
    ctx = model.cfg.seq_len
    windows = [[_eos(tokenizer)] + ids[:ctx]] + [ids[i - 1:i + ctx] for i in range(ctx, len(ids), ctx)]
    t0 = time.perf_counter()
    losses = torch.cat(score_sequences(model, windows, batch_size, overrides))
    nbytes = len(text.encode("utf-8"))
    return _summary(losses.double().sum().item(), losses.numel(), nbytes, time.perf_counter() - t0, model)


def _summary(loss_sum: float, n_tokens: int, n_bytes: int, seconds: float, model) -> dict:
    loss = loss_sum / max(n_tokens, 1)
    fpt = model.flops_per_token(model.cfg.seq_len, "true")
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "bpb": loss_sum / LN2 / n_bytes if n_bytes else float("nan"),
            "tokens": n_tokens, "bytes": n_bytes, "tokens_per_s": n_tokens / max(seconds, 1e-9),
            "flops_per_token": fpt, "flops": fpt * n_tokens}


def answer_token_mask(tokenizer, text: str, start: int, end: int) -> tuple[list[int], list[bool]]:
    """Token ids of `text` and whether each token overlaps the answer's character span."""
    enc = tokenizer.encode(text)
    return enc.ids, [e > start and s < end for s, e in enc.offsets]


GSM_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def extract_gsm_answer(text: str) -> str | None:
    m = GSM_ANSWER.search(text)
    return m.group(1).replace(",", "").rstrip(".") if m else None


@torch.inference_mode()
def evaluate_examples(model, tokenizer, examples: list[dict], batch_size: int = 16,
                      overrides: Overrides | None = None, exact_match: bool = True,
                      max_new_tokens: int | None = None) -> dict:
    """Per-category BPB, answer loss and exact-match accuracy on examples with
    {category, text, prompt, answer, answer_start, answer_end}.

    Exact match: greedy decoding from the prompt; the first generated line must equal the answer, or,
    for answers written as GSM8K's `#### n`, the extracted numbers must be equal.
    """
    if not examples:
        raise DataError("no examples to evaluate")
    eos = _eos(tokenizer)
    seqs, masks = [], []
    for ex in examples:
        ids, mask = answer_token_mask(tokenizer, ex["text"], ex["answer_start"], ex["answer_end"])
        seqs.append([eos] + ids)
        masks.append(torch.tensor(mask, dtype=torch.bool))
    t0 = time.perf_counter()
    losses = score_sequences(model, seqs, batch_size, overrides)
    acc = defaultdict(lambda: {"loss_sum": 0.0, "tokens": 0, "bytes": 0, "answer_loss_sum": 0.0,
                               "answer_tokens": 0, "correct": 0, "n": 0})
    for ex, loss, mask in zip(examples, losses, masks):
        for key in (ex["category"], "all"):
            a = acc[key]
            a["loss_sum"] += loss.double().sum().item()
            a["tokens"] += loss.numel()
            a["bytes"] += len(ex["text"].encode("utf-8"))
            m = mask[:loss.numel()]
            a["answer_loss_sum"] += loss[m].double().sum().item()
            a["answer_tokens"] += int(m.sum())
            a["n"] += 1
    if exact_match:
        for ex in examples:
            ok = _exact_match(model, tokenizer, ex, eos, overrides, max_new_tokens)
            acc[ex["category"]]["correct"] += ok
            acc["all"]["correct"] += ok
    seconds = time.perf_counter() - t0
    result = {}
    for key, a in acc.items():
        result[key] = {
            "n": a["n"],
            **{k: v for k, v in _summary(a["loss_sum"], a["tokens"], a["bytes"], seconds, model).items()
               if k in ("loss", "ppl", "bpb", "tokens", "bytes")},
            "answer_loss": a["answer_loss_sum"] / max(a["answer_tokens"], 1),
            "accuracy": a["correct"] / a["n"] if exact_match else None,
        }
    return result


def _exact_match(model, tokenizer, ex: dict, eos: int, overrides, max_new_tokens) -> bool:
    answer = ex["answer"].strip()
    gsm = extract_gsm_answer(answer)
    prompt = ex["prompt"]
    if gsm is not None and prompt.rstrip().endswith("####"):
        gsm = None  # the prompt already holds the marker; compare the number itself
        answer = answer.replace(",", "")
    budget = max_new_tokens or (256 if gsm is not None else len(tokenizer.encode(answer).ids) + 8)
    # A trailing space would be its own token, while training text attaches it to the answer (" 254").
    ids = [eos] + tokenizer.encode(prompt.rstrip(" ")).ids
    out = []
    for tok in generate_tokens(model, ids, budget, eos_id=eos, overrides=overrides):
        if tok == eos:
            break
        out.append(tok)
        text = tokenizer.decode(out)
        if gsm is None and "\n" in text.lstrip(" "):
            break
    text = tokenizer.decode(out)
    if gsm is not None:
        return extract_gsm_answer(text) == gsm
    first = text.strip().split("\n")[0].strip()
    return first == answer


def read_jsonl_examples(path: str | Path, question: str = "question", answer: str = "answer",
                        limit: int | None = None) -> list[dict]:
    """Q/A JSONL (e.g. GSM8K) as labelled examples: text = question + newline + answer."""
    import json

    p = Path(path)
    if not p.is_file():
        raise DataError(f"file not found: {p}")
    out = []
    with open(p) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{p}:{n}: invalid JSON") from None
            if question not in rec or answer not in rec:
                raise DataError(f"{p}:{n}: missing field '{question if question not in rec else answer}'")
            prompt = f"{rec[question]}\n"
            text = prompt + rec[answer]
            out.append({"category": p.stem, "text": text, "prompt": prompt, "answer": rec[answer],
                        "answer_start": len(prompt), "answer_end": len(text)})
            if limit and len(out) >= limit:
                break
    if not out:
        raise DataError(f"{p} holds no examples")
    return out

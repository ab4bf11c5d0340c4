"""Evaluation: loss, perplexity and exact bits per byte on token shards, raw text or labelled examples.

Bits per byte are exact: the summed cross-entropy (nats) of the target tokens divided by ln 2 and by the
UTF-8 bytes those tokens decode to. Labelled examples (the synthetic corpus's eval split, or Q/A JSONL such
as GSM8K) also give per-category BPB, the loss on the answer tokens, and greedy exact-match accuracy.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import defaultdict
from pathlib import Path

import torch

from ..data.shards import TokenShards
from ..data.tokenizer import check_same_tokenizer, check_tokenizer, eos_id, load_tokenizer, token_byte_lengths
from ..errors import DataError
from ..generate import generate_tokens
from ..model import AdaptivePolicy, FlopTally, Overrides, check_overrides

LN2 = math.log(2.0)


@torch.inference_mode()
def score_sequences(model, seqs: list[list[int]], batch_size: int = 16, overrides: Overrides | None = None,
                    tally: FlopTally | None = None) -> list[torch.Tensor]:
    """Per-token losses (nats) of each sequence's tokens after its first, batched with right padding (a tally
    receives the executed FLOPs, padding included)."""
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
        res = model(x.to(device), y.to(device), overrides=overrides, return_per_token_loss=True, flops=tally)
        for r, i in enumerate(rows):
            out[i] = res.per_token_loss[r, :len(chunk[r]) - 1].float().cpu()
    return out


def evaluate_text(model, tokenizer, text: str, batch_size: int = 8, overrides: Overrides | None = None,
                  max_windows: int | None = None, realised: bool = False) -> dict:
    """Loss, perplexity and BPB of raw text, in non-overlapping context-sized windows (the first
    `max_windows` of them when given; BPB then counts the bytes of the scored tokens only)."""
    enc = tokenizer.encode(text)
    ids = enc.ids
    if len(ids) < 2:
        raise DataError("the text is too short to evaluate (fewer than 2 tokens)")
    ctx = model.cfg.seq_len
    nbytes = len(text.encode("utf-8"))
    if max_windows and len(ids) > max_windows * ctx:
        ids = ids[:max_windows * ctx]
        nbytes = len(text[:enc.offsets[len(ids) - 1][1]].encode("utf-8"))
    windows = [[eos_id(tokenizer)] + ids[:ctx]] + [ids[i - 1:i + ctx] for i in range(ctx, len(ids), ctx)]
    tally = _tally(realised, overrides)
    t0 = time.perf_counter()
    losses = torch.cat(score_sequences(model, windows, batch_size, overrides, tally))
    return _summary(losses.double().sum().item(), losses.numel(), nbytes, time.perf_counter() - t0, model, overrides,
                    tally)


def _tally(realised: bool, overrides: Overrides | None) -> FlopTally | None:
    """A FlopTally when asked for, and always under an adaptive policy (its FLOPs depend on the data)."""
    return FlopTally() if realised or (overrides is not None and overrides.adaptive is not None) else None


def _summary(loss_sum: float, n_tokens: int, n_bytes: int, seconds: float, model, overrides=None,
             tally: FlopTally | None = None) -> dict:
    """Loss, ppl, BPB, throughput, and the forward FLOPs per token the evaluated variant really spent: from the
    tally of the executed passes when there is one (per position run, padding included; also the deep path's
    share), else from the model's accounting at its context length."""
    loss = loss_sum / max(n_tokens, 1)
    extra = {}
    if tally is not None:
        per = tally.per_token()
        fpt, extra["deep_flops_per_token"] = per["flops_per_token"], per["deep_flops_per_token"]
    else:
        fpt = model.flops_per_token(model.cfg.seq_len, "true", overrides=overrides)
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "bpb": loss_sum / LN2 / n_bytes if n_bytes else float("nan"),
            "tokens": n_tokens, "bytes": n_bytes, "tokens_per_s": n_tokens / max(seconds, 1e-9),
            "flops_per_token": fpt, "flops": fpt * n_tokens, **extra}


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

    An example longer than the context (EOS + text beyond seq_len + 1 tokens) is skipped, not truncated, so
    that BPB, answer loss and accuracy are those of whole examples; each row counts them under "skipped".
    """
    eos = eos_id(tokenizer)
    examples, skipped = fit_examples(tokenizer, examples, model.cfg.seq_len)
    seqs, masks = [], []
    for ex in examples:
        ids, mask = answer_token_mask(tokenizer, ex["text"], ex["answer_start"], ex["answer_end"])
        seqs.append([eos] + ids)
        masks.append(torch.tensor(mask, dtype=torch.bool))
    bins = _dial_bins(examples)
    tally = _tally(False, overrides)
    t0 = time.perf_counter()
    losses = score_sequences(model, seqs, batch_size, overrides, tally)
    acc = defaultdict(lambda: {"loss_sum": 0.0, "tokens": 0, "bytes": 0, "answer_loss_sum": 0.0,
                               "answer_tokens": 0, "correct": 0, "n": 0})
    for ex, loss, mask, extra in zip(examples, losses, masks, bins):
        for key in (ex["category"], "all", *extra):
            a = acc[key]
            a["loss_sum"] += loss.double().sum().item()
            a["tokens"] += loss.numel()
            a["bytes"] += len(ex["text"].encode("utf-8"))
            m = mask[:loss.numel()]
            a["answer_loss_sum"] += loss[m].double().sum().item()
            a["answer_tokens"] += int(m.sum())
            a["n"] += 1
    if exact_match:
        for ex, extra in zip(examples, bins):
            ok = _exact_match(model, tokenizer, ex, eos, overrides, max_new_tokens)
            for key in (ex["category"], "all", *extra):
                acc[key]["correct"] += ok
    seconds = time.perf_counter() - t0
    result = {}
    for key, a in acc.items():
        result[key] = {
            "n": a["n"],
            **{k: v for k, v in _summary(a["loss_sum"], a["tokens"], a["bytes"], seconds, model, overrides,
                                         tally).items()
               if k in ("loss", "ppl", "bpb", "tokens", "bytes", "tokens_per_s", "flops")},
            "answer_loss": a["answer_loss_sum"] / max(a["answer_tokens"], 1),
            "accuracy": a["correct"] / a["n"] if exact_match else None,
            "skipped": skipped[key],
        }
    return result


def fit_examples(tokenizer, examples: list[dict], context: int) -> tuple[list[dict], dict[str, int]]:
    """The examples that fit the context whole (EOS + text within context + 1 tokens, the prompt leaving room
    to decode), and how many were skipped per category and under "all"; a DataError when none fit."""
    if not examples:
        raise DataError("no examples to evaluate")
    eos = eos_id(tokenizer)
    kept, skipped = [], defaultdict(int)
    for ex in examples:
        too_long = len(tokenizer.encode(ex["text"]).ids) > context  # with EOS first: beyond context + 1
        if too_long or len(_prompt_ids(tokenizer, ex["prompt"], eos)) >= context:
            for key in (ex["category"], "all"):
                skipped[key] += 1
        else:
            kept.append(ex)
    if not kept:
        raise DataError(f"all {len(examples)} examples are longer than the context ({context} tokens)")
    return kept, skipped


def _dial_bins(examples: list[dict]) -> list[tuple[str, ...]]:
    """Per example, the extra result keys "category@dial=value" for the synthetic tasks whose examples carry
    a dial (chain: steps) that varies within the set, so accuracy can be read against the dial."""
    from ..data.synthetic import DIALS

    varying = {cat: field for cat, field in DIALS.items()
               if len({ex.get(field) for ex in examples if ex["category"] == cat and field in ex}) > 1}
    return [(f"{ex['category']}@{varying[ex['category']]}={ex[varying[ex['category']]]}",)
            if ex["category"] in varying and varying[ex["category"]] in ex else () for ex in examples]


def _exact_match(model, tokenizer, ex: dict, eos: int, overrides, max_new_tokens) -> bool:
    answer = ex["answer"].strip()
    gsm = extract_gsm_answer(answer)
    prompt = ex["prompt"]
    if gsm is not None and prompt.rstrip().endswith("####"):
        gsm = None  # the prompt already holds the marker; compare the number itself
        answer = answer.replace(",", "")
    budget = max_new_tokens or (256 if gsm is not None else len(tokenizer.encode(answer).ids) + 8)
    ids = _prompt_ids(tokenizer, prompt, eos)
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


def _prompt_ids(tokenizer, prompt: str, eos: int) -> list[int]:
    """What greedy answer decoding starts from. A trailing space would be its own token, while training text
    attaches it to the answer (" 254")."""
    return [eos] + tokenizer.encode(prompt.rstrip(" ")).ids


def read_jsonl_examples(path: str | Path, question: str = "question", answer: str = "answer",
                        limit: int | None = None) -> list[dict]:
    """Q/A JSONL (e.g. GSM8K) as labelled examples: text = question + newline + answer."""
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


@torch.inference_mode()
def evaluate_shards(model, folder: str | Path, split: str = "val", batch_size: int = 8, max_windows: int | None = None,
                    overrides: Overrides | None = None, realised: bool = False) -> dict:
    """Loss, perplexity and exact BPB over consecutive non-overlapping windows of a prepared split."""
    import numpy as np

    shards = TokenShards(folder, split)
    T = model.cfg.seq_len
    n = (shards.n_tokens - 1) // T
    if n < 1:
        raise DataError(f"the {split} split of {folder} has {shards.n_tokens} tokens, fewer than the context + 1")
    n = min(n, max_windows) if max_windows else n
    byte_len = torch.from_numpy(np.asarray(token_byte_lengths(load_tokenizer(folder)), dtype=np.int64))
    device = next(model.parameters()).device
    loss_sum, n_tok, n_bytes = 0.0, 0, 0
    tally = _tally(realised, overrides)
    t0 = time.perf_counter()
    for b in range(0, n, batch_size):
        rows = np.stack([shards.get(w * T, T + 1) for w in range(b, min(n, b + batch_size))])
        w = torch.from_numpy(rows.astype(np.int64))
        x, y = w[:, :-1].to(device), w[:, 1:].to(device)
        out = model(x, y, overrides=overrides, return_per_token_loss=True, flops=tally)
        loss_sum += out.per_token_loss.double().sum().item()
        n_tok += y.numel()
        n_bytes += int(byte_len[y.cpu()].sum())
    return _summary(loss_sum, n_tok, n_bytes, time.perf_counter() - t0, model, overrides, tally)


def _variants(K: list[int] | None, gates: list[str] | None, trained_K: int,
              extra_steps_gain: str = "last", adaptive: list[AdaptivePolicy] | None = None
              ) -> list[tuple[str, Overrides]]:
    rows = [(f"trained (K={trained_K})", Overrides())]
    rows += [(f"K={k}", Overrides(K=k, extra_steps_gain=extra_steps_gain)) for k in (K or []) if k != trained_K]
    rows += [(f"gates={g}", Overrides(gates=g)) for g in (gates or [])]
    rows += [(f"adaptive {p}", Overrides(adaptive=p)) for p in (adaptive or [])]
    return rows


def evaluate_datasets(model, tokenizer, data: list[str], *, K: list[int] | None = None,
                      gates: list[str] | None = None, extra_steps_gain: str = "last", batch_size: int = 8,
                      limit: int | None = None, adaptive: list[AdaptivePolicy] | None = None,
                      exact_match: bool = True, qa_exact_match: bool = True, log=None) -> dict:
    """Evaluate every (variant, dataset) pair. Datasets: a prepared folder (val shards, plus the synthetic
    eval examples when present), a .txt file, or a Q/A .jsonl file (e.g. GSM8K). Variants: the model as
    trained, each forced K, each gate override (the paper's ablations) and each adaptive policy; with a
    policy, every row reports the FLOPs its passes really executed (FlopTally)."""
    check_tokenizer(tokenizer, model)
    cfg = model.cfg
    check_overrides(cfg, K=K, gates=gates, K_flag="--K", gates_flag="--gates")
    for pol in adaptive or []:
        pol.check(cfg)
    for name, value in (("--batch-size", batch_size), ("--limit", limit)):
        if value is not None and value < 1:
            raise DataError(f"{name} must be >= 1, got {value}")
    paths = [Path(d) for d in data]
    stems = [p.name if p.is_dir() else p.stem for p in paths]
    sources = []
    for p, stem in zip(paths, stems):
        # wikitext-2/test.txt and gsm8k/test.jsonl must not share a column
        name = f"{p.resolve().parent.name}/{stem}" if stems.count(stem) > 1 else stem
        if p.is_dir():
            check_same_tokenizer(p, tokenizer, "the checkpoint")  # before any evaluation
            TokenShards(p, "val").check_ids(cfg.vocab_size)
            sources.append((name, "shards", p))
            if (p / "eval_examples.jsonl").is_file():
                lines = (p / "eval_examples.jsonl").read_text().splitlines()
                exs = _per_category_limit([json.loads(x) for x in lines if x.strip()], limit)
                sources.append((f"{name}:examples", "examples", exs))
        elif p.suffix == ".jsonl" and p.is_file():
            sources.append((name, "qa", read_jsonl_examples(p, limit=limit)))
        elif p.is_file():
            sources.append((name, "text", p))
        else:
            raise DataError(f"evaluation data not found: {p}")
    for ds, kind, exs in sources:  # before any evaluation: a set with nothing that fits is an error
        if kind in ("qa", "examples"):
            n_skipped = fit_examples(tokenizer, exs, cfg.seq_len)[1]["all"]
            if log and n_skipped:
                log(f"{ds}: skipped {n_skipped} of {len(exs)} examples, longer than the context ({cfg.seq_len} "
                    "tokens)")
    results: dict = {"datasets": [s[0] for s in sources], "variants": {}}
    realised = bool(adaptive)
    for name, ov in _variants(K, gates, cfg.K if cfg.arch in ("loop", "dual") else 1, extra_steps_gain,
                              adaptive):
        row = {}
        for ds, kind, src in sources:  # src: a path, or the examples of a labelled set
            if log:
                log(f"evaluating {name} on {ds}")
            if kind == "shards":
                row[ds] = evaluate_shards(model, src, batch_size=batch_size, max_windows=limit, overrides=ov,
                                          realised=realised)
            elif kind == "text":
                text = src.read_text(encoding="utf-8", errors="replace")
                row[ds] = evaluate_text(model, tokenizer, text, batch_size, ov, max_windows=limit, realised=realised)
            else:
                em = exact_match and (kind == "examples" or qa_exact_match)  # GSM8K decoding is long
                per_cat = evaluate_examples(model, tokenizer, src, batch_size, ov, em)
                row[ds] = {**per_cat["all"], "categories": {k: v for k, v in per_cat.items() if k != "all"}}
        results["variants"][name] = row
    return results


def _per_category_limit(examples: list[dict], limit: int | None) -> list[dict]:
    if not limit:
        return examples
    seen: dict[str, int] = defaultdict(int)
    out = []
    for ex in examples:
        if seen[ex["category"]] < limit:
            seen[ex["category"]] += 1
            out.append(ex)
    return out


def results_markdown(results: dict) -> str:
    """The paper's layout: per-token cross-entropy (nats) per dataset, one row per variant."""
    ds = results["datasets"]
    lines = ["| variant | " + " | ".join(ds) + " |", "|---" * (len(ds) + 1) + "|"]
    for name, row in results["variants"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[d]['loss']:.4f}" for d in ds) + " |")
    out = ["Per-token cross-entropy (nats):", "", *lines]
    if any("deep_flops_per_token" in row[d] for row in results["variants"].values() for d in ds):
        out += ["", "Realised compute (forward FLOPs per position run, from the executed passes):", "",
                "| variant | data | BPB | FLOPs/token | deep FLOPs/token | tokens/s |", "|---" * 6 + "|"]
        out += [f"| {name} | {d} | {row[d]['bpb']:.4f} | {row[d]['flops_per_token']:.4g} | "
                f"{row[d].get('deep_flops_per_token', float('nan')):.4g} | {row[d]['tokens_per_s']:,.0f} |"
                for name, row in results["variants"].items() for d in ds]
    first = next(iter(results["variants"].values()))
    extra = []
    for d in ds:
        r = first[d]
        line = f"- {d}: loss {r['loss']:.4f}, ppl {r['ppl']:.2f}, BPB {r['bpb']:.4f}"
        if r.get("tokens_per_s"):
            line += f", {r['tokens']:,} tokens at {r['tokens_per_s']:,.0f} tok/s ({r['flops']:.3g} FLOPs)"
        if r.get("answer_loss") is not None and "answer_loss" in r:
            line += f", answer loss {r['answer_loss']:.4f}"
        if r.get("accuracy") is not None:
            line += f", exact match {r['accuracy']:.1%}"
        if r.get("skipped"):
            line += f", {r['n']} examples ({r['skipped']} longer than the context skipped)"
        extra.append(line)
        for cat, c in (r.get("categories") or {}).items():
            acc = f", exact match {c['accuracy']:.1%}" if c.get("accuracy") is not None else ""
            extra.append(f"  - {cat}: BPB {c['bpb']:.4f}, answer loss {c['answer_loss']:.4f}{acc} (n={c['n']})")
    return "\n".join(out + ["", "As trained:"] + extra)

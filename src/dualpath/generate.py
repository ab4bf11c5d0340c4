"""Sampling with a KV cache (one cache per loop step of the deep block, one for the wide block).

    dualpath generate CHECKPOINT --prompt "..." [--max-new-tokens --temperature --top-k --top-p --seed --stop]
    dualpath.generate.generate(model, tokenizer, "prompt", max_new_tokens=50, stop=["\n"])

The library is greedy unless given a temperature; the `generate` command samples at 0.8 unless told otherwise.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import torch

from .data.tokenizer import eos_id as find_eos_id
from .errors import DualPathError
from .model import KVCache, Overrides


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V). temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_tokens(model, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                    eos_id: int | None = None, use_cache: bool = True,
                    overrides: Overrides | None = None) -> Iterator[int]:
    """Yield new token ids one at a time. Stops at eos_id, after max_new_tokens, or at the context end."""
    ctx = model.cfg.seq_len
    if not prompt_ids:
        raise DualPathError("the prompt is empty")
    if len(prompt_ids) > ctx:
        raise DualPathError(f"the prompt has {len(prompt_ids)} tokens, longer than the context ({ctx})")
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
    max_new_tokens = min(max_new_tokens, ctx - len(prompt_ids))
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    cache = KVCache(ctx) if use_cache else None
    step_input = ids
    for _ in range(max_new_tokens):
        logits = model(step_input if use_cache else ids, overrides=overrides, cache=cache).logits[:, -1]
        nxt = sample_next(logits.cpu(), temperature, top_k, top_p, gen).to(device)
        token = int(nxt.item())
        yield token
        if eos_id is not None and token == eos_id:
            return
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        step_input = nxt.view(1, 1)


def prompt_ids(tokenizer, prompt: str, context: int, bos: bool = True) -> list[int]:
    """The token ids generation starts from (EOS first when bos), or a DualPathError for an empty prompt or
    one longer than the context."""
    if not prompt:
        raise DualPathError("the prompt is empty")
    eos_id = find_eos_id(tokenizer, default=None)
    ids = ([eos_id] if bos and eos_id is not None else []) + tokenizer.encode(prompt).ids
    if len(ids) > context:
        raise DualPathError(f"the prompt has {len(ids)} tokens, longer than the context ({context})")
    return ids


def _stop_at(text: str, stop: Sequence[str]) -> int | None:
    """Where the first stop string in `text` begins, or None."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stop: Sequence[str]) -> int:
    """How many final characters of `text` could begin a stop string (not streamed until that is decided)."""
    return max((k for s in stop for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


def decode_until(tokenizer, tokens: Iterable[int], *, eos_id: int | None = None, stop: Sequence[str] = (),
                 stream: Callable[[str], None] | None = None) -> tuple[str, int, bool]:
    """Decode generated tokens until EOS or the first of the `stop` strings, which is cut off with whatever
    follows it. `stream` receives the text in pieces as it is decoded (never part of a stop string).
    Returns (text, tokens decoded, whether EOS or a stop string ended it)."""
    stop = [stop] if isinstance(stop, str) else list(stop)  # one string is one stop, not its characters
    if any(not s for s in stop):
        raise DualPathError("a stop string is empty")
    out: list[int] = []
    text, printed, ended = "", 0, False
    for token in tokens:
        if token == eos_id:
            ended = True
            break
        out.append(token)
        text = tokenizer.decode(out)
        cut = _stop_at(text, stop)
        if cut is not None:
            text, ended = text[:cut], True
            break
        if stream is not None and not text.endswith("\ufffd"):  # wait for whole UTF-8 characters
            safe = len(text) - _held_back(text, stop)
            if safe > printed:
                stream(text[printed:safe])
                printed = safe
    if stream is not None and len(text) > printed:
        stream(text[printed:])
    return text, len(out), ended


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, *, stream: Callable[[str], None] | None = None,
             bos: bool = True, stop: Sequence[str] = (), log: Callable[[str], None] | None = None, **kw) -> str:
    """Generate text after `prompt`: greedy unless `temperature` > 0 is given (keywords of generate_tokens).
    Ends at EOS, after max_new_tokens, at the first `stop` string (neither it nor what follows is returned or
    streamed), or at the context end, which `log` is told in one line. `stream` receives text pieces as they
    are decoded."""
    ids = prompt_ids(tokenizer, prompt, model.cfg.seq_len, bos)
    eos_id = find_eos_id(tokenizer, default=None)
    text, n, ended = decode_until(tokenizer, generate_tokens(model, ids, max_new_tokens, eos_id=eos_id, **kw),
                                  eos_id=eos_id, stop=stop, stream=stream)
    if not ended and n < max_new_tokens and log is not None:
        log(f"generation stopped at the context end ({model.cfg.seq_len} tokens) after {n} of {max_new_tokens} "
            "new tokens")
    return text

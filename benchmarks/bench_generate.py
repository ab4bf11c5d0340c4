"""Generation tokens/s with and without the KV cache, for each architecture, and against HF transformers'
Llama of the same shape on the same weights (a wide model without QK-norm or branch gain is a Llama).

python -m benchmarks.bench_generate [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import time

import torch

from dualpath.config import ModelConfig
from dualpath.generate import generate_tokens
from dualpath.model import DualPathLM

from .common import table, write


def tokens_per_s(model, prompt, n, use_cache) -> float:
    list(generate_tokens(model, prompt, 4, use_cache=use_cache))  # warm-up
    t = time.perf_counter()
    out = list(generate_tokens(model, prompt, n, use_cache=use_cache))
    return len(out) / (time.perf_counter() - t)


def llama_from(model: DualPathLM):
    """HF LlamaForCausalLM holding the same weights as a plain wide model (None if transformers is missing)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    c = model.cfg
    hidden = model.layers[0].wide.block.ffn.hidden
    hf_cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=hidden,
                         num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                         max_position_embeddings=c.seq_len, rms_norm_eps=c.norm_eps, tie_word_embeddings=False,
                         attention_bias=False, mlp_bias=False, rope_theta=c.rope_base,
                         rope_parameters={"rope_type": "default", "rope_theta": c.rope_base})
    hf = LlamaForCausalLM(hf_cfg).eval()
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.lm_head.weight}
    for i, layer in enumerate(model.layers):
        b = layer.wide.block
        pre = f"model.layers.{i}."
        sd.update({pre + "input_layernorm.weight": b.attn_norm.weight,
                   pre + "post_attention_layernorm.weight": b.ffn_norm.weight,
                   pre + "self_attn.q_proj.weight": b.attn.wq.weight, pre + "self_attn.k_proj.weight": b.attn.wk.weight,
                   pre + "self_attn.v_proj.weight": b.attn.wv.weight, pre + "self_attn.o_proj.weight": b.attn.wo.weight,
                   pre + "mlp.gate_proj.weight": b.ffn.w1.weight, pre + "mlp.up_proj.weight": b.ffn.w3.weight,
                   pre + "mlp.down_proj.weight": b.ffn.w2.weight})
    hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    return hf


def hf_tokens_per_s(hf, prompt, n, use_cache) -> float:
    ids = torch.tensor([prompt])
    kw = dict(do_sample=False, use_cache=use_cache, pad_token_id=0)
    hf.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
    t = time.perf_counter()
    out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
    return (out.shape[1] - len(prompt)) / (time.perf_counter() - t)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    base = dict(vocab_size=8192, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                n_kv_heads=args.n_heads, seq_len=args.seq_len, ffn_multiple=64, d_ffn_deep=768, d_ffn_wide=1536, K=2)
    prompt = torch.randint(0, 8192, (args.prompt_len,)).tolist()
    rows = []
    with torch.inference_mode():
        for arch in ("wide", "loop", "dual"):
            model = DualPathLM(ModelConfig(arch=arch, **base)).eval()
            rows.append({"model": f"dualpath {arch}",
                         "cached_tok_s": tokens_per_s(model, prompt, args.new_tokens, True),
                         "uncached_tok_s": tokens_per_s(model, prompt, args.new_tokens, False)})
        plain = DualPathLM(ModelConfig(arch="wide", qk_norm=False, wide_gain=False, **base)).eval()
        hf = llama_from(plain)
        if hf is not None:
            x = torch.tensor([prompt])
            max_diff = (hf(x).logits - plain(x).logits).abs().max().item()
            rows.append({"model": "dualpath wide (Llama-equivalent)",
                         "cached_tok_s": tokens_per_s(plain, prompt, args.new_tokens, True),
                         "uncached_tok_s": tokens_per_s(plain, prompt, args.new_tokens, False)})
            rows.append({"model": "HF LlamaForCausalLM (same weights)",
                         "cached_tok_s": hf_tokens_per_s(hf, prompt, args.new_tokens, True),
                         "uncached_tok_s": hf_tokens_per_s(hf, prompt, args.new_tokens, False),
                         "max_logit_diff_vs_dualpath": max_diff})
    for r in rows:
        r["cache_speedup"] = r["cached_tok_s"] / r["uncached_tok_s"]
    payload = {"shape": vars(args), "rows": rows}
    path = write("generate", payload)
    print(table(rows, ["model", "cached_tok_s", "uncached_tok_s", "cache_speedup"]))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()

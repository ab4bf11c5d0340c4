"""Routing analysis (`dualpath.analysis`): capture, tags, aggregates, overrides, report and `analyze`.

Tiny models (d_model 32, T = 32) and a tiny byte-level BPE trained here, so that words are split into
several tokens. The "hand-set" dual model has W_g = 0 and known gate biases per layer, so every gate is
exactly σ(b) and the tables can be checked against values set by hand. spaCy tests use the shared
en_core_web_sm model and are skipped when it is missing.
"""

from __future__ import annotations

import html
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dualpath import DataError, DualPathLM, ModelConfig
from dualpath.analysis import (analyze, arith_char_mask, binary_entropy, capture, capture_ids, collapse_diagnostics,
                               corpus_from_path, corpus_from_texts, decode_with_offsets, encode_with_offsets,
                               forced_losses, get_tagger, layer_means, p_value, render_html, tag_corpus,
                               tag_layer_table, tag_text, tag_tokens, token_class_override)
from dualpath.analysis import tags as tags_mod
from dualpath.analysis.corpus import bos_id, split_paragraphs

SPACY_MODEL = Path(__file__).resolve().parents[2] / "shared" / "models" / "spacy-en_core_web_sm-3.6.0"
needs_spacy_model = pytest.mark.skipif(not SPACY_MODEL.is_dir(), reason=f"spaCy model not found at {SPACY_MODEL}")

BIASES = [(3.5, -3.5), (-4.0, 4.0), (0.0, 0.0)]  # (b_d, b_w) per layer
TRAIN_TEXT = [
    "The cat sat on the mat. The dog ran to the park and the bird sang.",
    "Natalia sold clips to 48 of her friends in April. 48/2 = <<48/2=24>>24 #### 24",
    "Question: How many apples are left? Answer: 12 - 5 = <<12-5=7>>7 apples. #### 7",
    "Ada Lovelace was born in 1815. Answer: she lived in London and wrote about the engine.",
]
FACTS = """Mira Tolan lives in Dunmere. She works as a baker. Answer: Dunmere is her city.

Oren Vask was born in 1950. His mentor is Lia Fen. Answer: his mentor is Lia Fen.

Lia Fen works as a pilot in Corvale. Answer: she is a pilot, and she flies every day.
"""
GSM = [
    {"question": "Tom has 12 apples and eats 5. How many are left?", "answer": "Answer: 12 - 5 = <<12-5=7>>7\n#### 7"},
    {"question": "A box holds 48 pens; half are red. How many are red?",
     "answer": "Answer: 48/2 = <<48/2=24>>24\n#### 24"},
    {"question": "Sam reads 3 pages a day for 4 days. How many pages?",
     "answer": "Answer: 3 * 4 = <<3*4=12>>12\n#### 12"},
]


# ----------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def tokenizer():
    from dualpath.data.prepare import train_tokenizer

    return train_tokenizer(iter(TRAIN_TEXT * 4), 300)


@pytest.fixture(scope="module")
def tokenizer_file(tokenizer, tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(str(p))
    return p


def make_cfg(arch="dual", vocab=300, **kw) -> ModelConfig:
    base = dict(arch=arch, vocab_size=vocab, d_model=32, n_layers=len(BIASES), n_heads=4, n_kv_heads=4, seq_len=32,
                d_ffn_deep=96, d_ffn_wide=192, ffn_multiple=16, K=3, max_loops=4)
    base.update(kw)
    return ModelConfig(**base)


@torch.no_grad()
def hand_set(model: DualPathLM, biases=BIASES) -> DualPathLM:
    """W_g = 0 and b_g = (b_d, b_w) per layer, so g = σ(b) exactly; branch gains softplus(0) so Δ ≠ 0."""
    for layer, (bd, bw) in zip(model.layers, biases):
        layer.gate.W_g.zero_()
        layer.gate.b_g.copy_(torch.tensor([bd, bw]))
        layer.deep.step_gain.fill_(0.0)
        layer.wide.beta.fill_(0.0)
    return model


def make_model(arch="dual", seed=0, hand=True, **kw) -> DualPathLM:
    torch.manual_seed(seed)
    model = DualPathLM(make_cfg(arch, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "W_g" not in name:
                p.mul_(10.0)  # weights at std 0.2, so every branch matters
            if name.endswith(("step_gain", "beta")):
                p.fill_(0.0)
    if arch == "dual" and hand:
        hand_set(model)
    return model


@torch.no_grad()
def random_gates(model: DualPathLM, seed=1) -> DualPathLM:
    gen = torch.Generator().manual_seed(seed)
    for layer in model.layers:
        layer.gate.W_g.copy_(torch.randn(layer.gate.W_g.shape, generator=gen) / math.sqrt(32))
        layer.gate.b_g.copy_(0.5 * torch.randn(2, generator=gen))
    return model


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


LONG_TEXT = " ".join(TRAIN_TEXT)  # ~100 tokens: several 32-token windows


# ----------------------------------------------------------------------------------------------
# Capture and aggregates on the hand-set model


def test_hand_set_gates_give_the_tables_their_values(tokenizer):
    model = make_model()
    cap = capture(model, LONG_TEXT, tokenizer)
    n = len(tokenizer.encode(LONG_TEXT).ids)
    assert n > 2 * model.cfg.seq_len  # chunked
    assert cap["gate_deep"].shape == (3, n) and cap["loss"].shape == (n,) and cap["rho_deep"].shape == (3, n)
    rows = layer_means(cap)
    for layer, (bd, bw) in enumerate(BIASES):
        assert abs(rows[layer]["gate_deep"] - sigmoid(bd)) < 1e-6
        assert abs(rows[layer]["gate_wide"] - sigmoid(bw)) < 1e-6
        assert np.allclose(cap["gate_deep"][layer], sigmoid(bd), rtol=0, atol=1e-6)
    assert np.isfinite(cap["loss"]).all() and (cap["loss"] > 0).all()

    col = collapse_diagnostics(cap)
    assert col[0]["deep_gate_high"] == 1.0 and col[0]["wide_gate_low"] == 1.0 and col[0]["any_gate_saturated"] == 1.0
    assert col[0]["deep_gate_low"] == 0.0 and col[0]["wide_gate_high"] == 0.0
    assert col[1]["deep_gate_low"] == 1.0 and col[1]["wide_gate_high"] == 1.0
    assert col[2]["any_gate_saturated"] == 0.0
    for layer, (bd, bw) in enumerate(BIASES):
        assert abs(col[layer]["gate_entropy_deep"] - float(binary_entropy(sigmoid(bd)))) < 1e-6
        assert abs(col[layer]["gate_entropy_wide"] - float(binary_entropy(sigmoid(bw)))) < 1e-6
    assert abs(col[2]["gate_entropy_deep"] - 1.0) < 1e-9  # σ(0) = 0.5: one full bit
    rho = cap["rho_deep"].astype(np.float64)
    for layer in range(3):
        assert abs(col[layer]["polarisation"] - 2 * np.abs(rho[layer] - 0.5).mean()) < 1e-9
        dom = ((rho[layer] > 0.9) | (rho[layer] < 0.1)).mean()
        assert abs(col[layer]["path_dominated"] - dom) < 1e-12


def test_rho_and_loss_match_an_independent_forward(tokenizer):
    model = make_model()
    ids = tokenizer.encode(LONG_TEXT).ids
    eos = bos_id(tokenizer)
    cap = capture(model, LONG_TEXT, tokenizer)
    T = model.cfg.seq_len
    seq = torch.tensor([[eos] + ids[:T]])  # the first window: inputs BOS, t_0 .. t_{T-2}
    with torch.no_grad():
        out = model(seq[:, :T], return_diagnostics=True)
        logp = F.log_softmax(out.logits.double(), -1)
    for layer, d in enumerate(out.diagnostics):
        num = d["gate_deep"].double() * d["delta_norm_deep"].double()
        rho = num / (num + d["gate_wide"].double() * d["delta_norm_wide"].double())
        # position p holds input token t_{p-1}
        assert np.allclose(cap["rho_deep"][layer, :T - 1], rho[0, 1:].numpy(), rtol=0, atol=1e-5)
        assert np.allclose(cap["cos_deep_wide"][layer, :T - 1], d["cos_deep_wide"][0, 1:].numpy(), atol=1e-5)
        assert np.allclose(cap["expected_steps"][layer, :T - 1], d["expected_steps"][0, 1:].numpy(), atol=1e-5)
    nll = -logp[0, torch.arange(T), seq[0, 1:T + 1]].numpy()  # position p predicts t_p
    assert np.allclose(cap["loss"][:T], nll, rtol=0, atol=1e-4)
    assert (cap["rho_deep"][0] > 0.5).mean() > 0.9 and (cap["rho_deep"][1] < 0.5).mean() > 0.9


def test_chunked_capture_equals_per_window_forward():
    model = make_model(hand=False)
    random_gates(model)
    ids = np.random.default_rng(0).integers(1, 300, size=21)
    L = 8
    cap = capture(model, ids, chunk_len=L)  # token ids: no BOS, the first token has no loss
    assert math.isnan(cap["loss"][0]) and np.isfinite(cap["loss"][1:]).all()
    assert np.isfinite(cap["gate_deep"]).all()
    for a in range(0, len(ids), L):
        x = torch.from_numpy(ids[a:a + L]).unsqueeze(0)
        with torch.no_grad():
            out = model(x, return_diagnostics=True)
        n = x.shape[1]
        for layer, d in enumerate(out.diagnostics):
            assert np.allclose(cap["gate_deep"][layer, a:a + n], d["gate_deep"][0].numpy(), atol=1e-6)
        logp = F.log_softmax(out.logits[0].double(), -1)
        for p in range(n - 1):  # within-window predictions
            assert abs(cap["loss"][a + p + 1] - (-logp[p, ids[a + p + 1]].item())) < 1e-4
    with pytest.raises(DataError):
        capture(model, ids, chunk_len=model.cfg.seq_len + 1)


def test_capture_on_loop_and_wide_models(tokenizer):
    loop = make_model("loop")
    cap = capture(loop, "The cat sat on the mat.", tokenizer)
    assert {"expected_steps", "delta_norm_deep", "halt_weights"} <= cap.keys()
    assert not {"gate_deep", "gate_wide", "rho_deep", "cos_deep_wide"} & cap.keys()
    assert ((cap["expected_steps"] >= 1 - 1e-5) & (cap["expected_steps"] <= 3 + 1e-5)).all()
    assert np.allclose(cap["halt_weights"].sum(-1), 1.0, atol=1e-5)
    wide = make_model("wide")
    cap = capture(wide, ["The cat.", "The dog ran."], tokenizer)
    assert "delta_norm_wide" in cap and "expected_steps" not in cap and "gate_deep" not in cap
    assert sorted(set(cap["doc"].tolist())) == [0, 1] and np.isfinite(cap["loss"]).all()
    assert layer_means(cap)[0]["delta_norm_wide"] > 0 and collapse_diagnostics(cap) == []


# ----------------------------------------------------------------------------------------------
# Tags


def test_offsets_reproduce_the_text(tokenizer):
    text = "Café costs 3€ 😀 <<48/2=24>>\n\n  done"
    ids, offs, ok = encode_with_offsets(tokenizer, text)
    assert ok
    rebuilt, offs2 = decode_with_offsets(tokenizer, ids)
    assert rebuilt == text and np.array_equal(offs, offs2)
    assert split_paragraphs("a\nb\n\n \n\nc\n") == ["a\nb", "c"]


@needs_spacy_model
def test_spacy_tags_follow_words_across_split_tokens(tokenizer):
    tagger = get_tagger(str(SPACY_MODEL))
    assert tagger.kind == "spacy"
    assert not {"parser", "ner", "lemmatizer", "senter"} & set(tagger.nlp.pipe_names)
    text = "The cat sat on the mat."
    words = {(0, 3): "DET", (4, 7): "NOUN", (8, 11): "VERB", (12, 14): "ADP", (15, 18): "DET", (19, 22): "NOUN",
             (22, 23): "PUNCT"}
    ids, offs, ok = encode_with_offsets(tokenizer, text)
    assert ok and len(ids) > len(words)  # some word is split into several tokens
    tags = tag_tokens(text, offs, tagger)
    for (s, e), tag in zip(offs.tolist(), tags.tolist()):
        if not text[s:e].strip():
            assert tag == "SPACE"
            continue
        overlaps = [(min(e, we) - max(s, ws), t) for (ws, we), t in words.items() if min(e, we) > max(s, ws)]
        assert tag == max(overlaps)[1], (text[s:e], tag)
    pieces, tags = tag_text("48/2 = <<48/2=24>>24 #### 24", tokenizer, tagger)
    for piece, tag in zip(pieces, tags.tolist()):
        assert tag == ("SPACE" if not piece.strip() else "ARITH"), (piece, tag)



@needs_spacy_model
def test_batched_spacy_tagging_equals_the_per_text_path(tokenizer, monkeypatch):
    """tag_corpus streams every document (cut into pieces) through one nlp.pipe; the tags are those of the
    former path, nlp(piece) per piece of each document, token for token."""
    tagger = get_tagger(str(SPACY_MODEL))
    monkeypatch.setattr(tags_mod, "SPACY_MAX_CHARS", 40)  # long documents are tagged in several pieces
    texts = [*TRAIN_TEXT, FACTS, "Sam reads 3 pages a day.\nHe reads 12 pages in 4 days. #### 12"]
    corpus = corpus_from_texts("t", texts, tokenizer)

    def per_text(text):
        out = []
        for base, piece in tags_mod._pieces(text, tags_mod.SPACY_MAX_CHARS):
            out += [(base + t.idx, base + t.idx + len(t.text), t.pos_ or "X") for t in tagger.nlp(piece)
                    if not t.is_space and t.text.strip()]
        return out

    assert tagger.words_many(corpus.texts) == [per_text(t) for t in corpus.texts]
    assert sum(len(list(tags_mod._pieces(t, 40))) > 1 for t in corpus.texts) >= 2

    class PerText:  # the former tagger: one nlp() call per piece
        def words_many(self, texts):
            return [per_text(t) for t in texts]

    batched = tag_corpus(corpus, tagger)
    assert batched.tolist() == tag_corpus(corpus, PerText()).tolist()
    assert len(batched) == corpus.n_tokens and {"NOUN", "ARITH", "SPACE"} <= set(batched.tolist())

def test_arith_rule():
    text = "a well-known 3.5 + 1,000 = x; 7%, 6÷2×3 and/or <<1>> ####, # 5. End"
    m = arith_char_mask(text)
    arith = "".join(c if m[i] else "_" for i, c in enumerate(text))
    assert arith == "_____________3.5_+_1,000_=____7%__6÷2×3________<<1>>_####____5_____"
    assert not m[text.index("-")] and not m[text.index("/")] and not m[text.index("# 5")]
    # a marker split over tokens is still arithmetic; a lone '#' or '.' is not
    text = "x #### 24. #"
    offs = np.array([[0, 1], [1, 2], [2, 4], [4, 6], [6, 7], [7, 9], [9, 10], [10, 11], [11, 12]])
    tags = tag_tokens(text, offs, get_tagger("rules"))
    assert tags.tolist() == ["WORD", "SPACE", "ARITH", "ARITH", "SPACE", "ARITH", "PUNCT", "SPACE", "PUNCT"]


def test_fallback_tagger_when_spacy_is_missing(monkeypatch, capsys, tokenizer):
    monkeypatch.setitem(sys.modules, "spacy", None)  # `import spacy` raises ImportError
    monkeypatch.setattr(tags_mod, "_SPACY_CACHE", {})
    tagger = get_tagger("en_core_web_sm")
    err = capsys.readouterr().err
    assert tagger.kind == "rules"
    assert err.count("\n") == 1 and err.startswith("warning:") and "rule-based" in err and "spaCy" in err
    words = tagger.words("The cat, and 3.5 + x $ isn't it!")
    assert [(w[2]) for w in words] == ["FUNC", "WORD", "PUNCT", "FUNC", "ARITH", "SYM", "WORD", "SYM", "FUNC",
                                       "FUNC", "PUNCT"]
    text = "The cat sat on it, 4 + 5 = 9 ####"
    expected = "FFF_WWW_WWW_FF_FFP_A_A_A_A_A_AAAA"  # per character; _ = whitespace
    ids, offs, _ = encode_with_offsets(tokenizer, text)
    assert len(ids) > len(text.split())  # words are split
    tags = tag_tokens(text, offs, tagger)
    names = {"F": "FUNC", "W": "WORD", "P": "PUNCT", "A": "ARITH"}
    for (s, e), tag in zip(offs.tolist(), tags.tolist()):
        want = {names[c] for c in expected[s:e] if c != "_"} or {"SPACE"}
        assert want == {tag}, (text[s:e], tag)


def test_fallback_tagger_when_the_model_cannot_load(capsys, tmp_path):
    tagger = get_tagger(str(tmp_path / "no-such-model"))
    err = capsys.readouterr().err
    assert tagger.kind == "rules" and err.count("\n") == 1 and "no-such-model" in err
    get_tagger("rules")
    assert capsys.readouterr().err == ""  # asked for explicitly: no warning


def test_special_tokens_are_tagged_special(tokenizer):
    tagger = get_tagger("rules")
    text = "<|endoftext|> cat"
    offs = np.array([[0, 13], [13, 14], [14, 17]])
    tags = tag_tokens(text, offs, tagger, special=np.array([True, False, False]))
    assert tags.tolist() == ["SPECIAL", "SPACE", "WORD"]


# ----------------------------------------------------------------------------------------------
# Tag x layer table, overrides


def test_tag_layer_table_keeps_frequent_tags():
    cap = {"rho_deep": np.array([[0.1] * 12 + [0.9] * 3, [0.2] * 12 + [0.8] * 3], dtype=np.float32)}
    tags = np.array(["NOUN"] * 12 + ["VERB"] * 3)
    table = tag_layer_table(cap, tags, min_count=10)
    assert [r["tag"] for r in table["rows"]] == ["NOUN"] and table["dropped"] == {"VERB": 3}
    assert np.allclose(table["rows"][0]["values"], [0.1, 0.2]) and table["rows"][0]["count"] == 12


def test_forcing_a_class_changes_only_its_gates(tokenizer):
    tagger = get_tagger("rules")
    text = TRAIN_TEXT[1] + " " + TRAIN_TEXT[2]
    ids, offs, _ = encode_with_offsets(tokenizer, text)
    tags = tag_tokens(text, offs, tagger)
    mask = tags == "ARITH"
    assert 5 < mask.sum() < len(ids) - 5
    eos = bos_id(tokenizer)

    model = make_model()  # hand-set: gates do not depend on the input
    base = capture_ids(model, [ids], bos=eos)
    forced = capture_ids(model, [ids], bos=eos, token_mask=mask, token_mask_to="wide")
    assert (forced["gate_deep"][:, mask] == 0).all() and (forced["gate_wide"][:, mask] == 1).all()
    assert np.array_equal(forced["gate_deep"][:, ~mask], base["gate_deep"][:, ~mask])
    assert (forced["rho_deep"][:, mask] == 0).all()
    deep = capture_ids(model, [ids], bos=eos, token_mask=mask, token_mask_to="deep")
    assert (deep["gate_deep"][:, mask] == 1).all() and (deep["gate_wide"][:, mask] == 0).all()

    model = random_gates(make_model(hand=False))  # input-dependent gates
    base = capture_ids(model, [ids], bos=eos)
    forced = capture_ids(model, [ids], bos=eos, token_mask=mask, token_mask_to="wide")
    assert np.allclose(forced["gate_deep"][0, ~mask], base["gate_deep"][0, ~mask], atol=0)  # layer 0 sees embeddings
    first = int(np.flatnonzero(mask)[0])
    assert np.array_equal(forced["gate_deep"][:, :first], base["gate_deep"][:, :first])  # causality
    assert np.array_equal(forced["loss"][:first + 1], base["loss"][:first + 1])
    assert not np.allclose(forced["loss"], base["loss"])

    res = token_class_override(model, [ids], tags, cls="ARITH", to="wide", repeats=5, seed=3, bos=eos)
    assert res["class_tokens"] == int(mask.sum()) and len(res["random"]["delta_all"]) == 5
    for s in ("delta_all", "delta_class", "delta_next"):
        assert 0 < res[f"p_{s}"] <= 1 and math.isfinite(res[s])
        assert res[f"p_{s}"] * 6 == pytest.approx(round(res[f"p_{s}"] * 6))
    again = token_class_override(model, [ids], tags, cls="ARITH", to="wide", repeats=5, seed=3, bos=eos)
    assert again["random"] == res["random"]  # seeded
    assert abs(res["delta_all"] - (np.nanmean(forced["loss"]) - np.nanmean(base["loss"]))) < 1e-5
    none = token_class_override(model, [ids], tags, cls="NOPE", repeats=2, bos=eos)
    assert none["class_tokens"] == 0 and math.isnan(none["p_delta_all"])


def test_fast_override_equals_the_straightforward_path(tokenizer):
    """token_class_override runs only the windows a mask touches, all masks in shared batches, and copies the
    unforced loss elsewhere; its statistics and p-values equal one full forced pass per mask (docstring)."""
    texts = [TRAIN_TEXT[0], TRAIN_TEXT[1], "The bird sang on the mat.", TRAIN_TEXT[2], *FACTS.split("\n\n")]
    corpus = corpus_from_texts("mix", texts, tokenizer)
    tags = tag_corpus(corpus, get_tagger("rules"))
    docs, eos, special = corpus.ids, corpus.bos, np.concatenate(corpus.special)
    lens = [len(d) for d in docs]
    model = random_gates(make_model(hand=False))
    kw = dict(bos=eos, chunk_len=8, batch_size=3)  # 8-token windows: many hold no ARITH token
    base = capture_ids(model, docs, **kw)["loss"].astype(np.float64)
    rows = []
    hook = model.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    cls, R, seed = tags == "ARITH", 6, 2
    n_windows = sum(-(-(n + 1) // 8) for n in lens)
    for to in ("wide", "deep"):
        rows.clear()
        fast = token_class_override(model, docs, tags, cls="ARITH", to=to, repeats=R, seed=seed, base_loss=base,
                                    special=special, **kw)
        assert 0 < sum(rows) < (1 + R) * n_windows  # untouched windows did not run

        def full(mask):  # the straightforward path: every window, one pass per mask
            forced = capture_ids(model, docs, token_mask=mask, token_mask_to=to, diagnostics=False, **kw)["loss"]
            d, ok = forced.astype(np.float64) - base, np.isfinite(base)
            nxt = np.zeros_like(mask)
            nxt[1:] = mask[:-1]
            nxt[np.cumsum([0, *lens[:-1]])] = False
            return {"delta_all": d[ok].mean(), "delta_class": d[cls & ok].mean(), "delta_next": d[nxt & ok].mean()}

        obs = full(cls)
        eligible = np.flatnonzero(~special)
        ref = {s: [] for s in obs}
        for r in range(R):
            mask = np.zeros(cls.size, bool)
            mask[np.random.default_rng([seed, r]).choice(eligible, size=int(cls.sum()), replace=False)] = True
            for s, v in full(mask).items():
                ref[s].append(v)
        for s in obs:
            assert fast[s] == pytest.approx(obs[s], abs=1e-6) and obs[s] != 0
            assert np.allclose(fast["random"][s], ref[s], rtol=0, atol=1e-6)
            assert fast[f"p_{s}"] == p_value(obs[s], ref[s])
            assert fast[f"random_{s}_std"] == pytest.approx(np.std(ref[s], ddof=1), abs=1e-6)
    hook.remove()


def test_forced_losses_copy_the_unforced_loss_before_the_first_forced_token(tokenizer):
    ids, _, _ = encode_with_offsets(tokenizer, LONG_TEXT)
    model = random_gates(make_model(hand=False))
    base = capture_ids(model, [ids], bos=0, diagnostics=False)["loss"]
    masks = np.zeros((3, len(ids)), bool)
    masks[1, [40, 70]] = True  # windows of 32 after the BOS: positions 31..62 untouched
    masks[2, ::5] = True
    got = forced_losses(model, [ids], masks, "deep", base, bos=0, batch_size=2)
    assert np.array_equal(got[0], base)  # nothing forced: nothing runs
    assert np.array_equal(got[1, :41], base[:41]) and not np.allclose(got[1, 41:64], base[41:64])
    assert np.array_equal(got[1, 64:71], base[64:71]) and not np.allclose(got[1, 71:], base[71:])
    for i in (1, 2):
        full = capture_ids(model, [ids], bos=0, token_mask=masks[i], token_mask_to="deep", diagnostics=False)["loss"]
        assert np.allclose(got[i], full, rtol=0, atol=1e-5)
    with pytest.raises(DataError, match="masks of shape"):
        forced_losses(model, [ids], masks[:, :-1], "deep", base)


def test_p_value():
    assert p_value(1.0, [0.0, 2.0, 1.0]) == pytest.approx(3 / 4)
    assert p_value(5.0, [0.0, 1.0]) == pytest.approx(1 / 3)
    assert p_value(-1.0, []) == 1.0


# ----------------------------------------------------------------------------------------------
# Report


def test_html_report_shows_every_token_escaped(tokenizer):
    model = make_model()
    text = "Tom has 48 pens. 48/2 = <<48/2=24>>24 & \"done\" </script> é😀"
    cap = capture(model, text, tokenizer)
    tags = tag_tokens(text, np.stack([cap["start"], cap["end"]], 1), get_tagger("rules"))
    page = render_html(title="t <x>", text=text, cap=cap, tags=tags, start=cap["start"], end=cap["end"],
                       summary_lines=["a < b"], sections=[("s", "<p>x</p>")])
    n = len(cap["ids"])
    assert len(re.findall(r'<span class="t" data-i="\d+">', page)) == n
    assert [int(i) for i in re.findall(r'data-i="(\d+)"', page)] == list(range(n))
    assert "&lt;&lt;" in page and "&gt;&gt;" in page and "<<" not in page and "</script> é" not in page
    assert "t &lt;x&gt;" in page and "a &lt; b" in page
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', page) and "http://" not in page and "https://" not in page
    blob = re.search(r'<script type="application/json" id="dp-data">(.*?)</script>', page, re.S).group(1)
    assert "<" not in blob
    data = json.loads(blob)
    assert data["n_layers"] == 3 and len(data["tokens"]) == n and data["tags"] == tags.tolist()
    assert len(data["values"]["rho_deep"]) == 3 and len(data["values"]["rho_deep"][0]) == n
    shown = re.sub(r"<[^>]+>", "", page.split('<div id="text">')[1].split('</div>')[0])
    assert html.unescape(shown) == text  # every character exactly once


# ----------------------------------------------------------------------------------------------
# analyze(): the whole tool on saved checkpoints


def save(tmp_path: Path, model: DualPathLM, tokenizer_file: Path) -> Path:
    from dualpath.checkpoint import save_checkpoint
    from dualpath.config import RunConfig

    run = tmp_path / "run"
    save_checkpoint(run, 1, model.state_dict(), RunConfig(model=model.cfg), files={"tokenizer.json": tokenizer_file})
    return run


def test_analyze_writes_every_output(tmp_path, tokenizer_file, capsys):
    model = random_gates(make_model(hand=False))
    run = save(tmp_path, model, tokenizer_file)
    facts = tmp_path / "facts.txt"
    facts.write_text(FACTS)
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("".join(json.dumps(r) + "\n" for r in GSM))
    out = tmp_path / "out"
    pos = str(SPACY_MODEL) if SPACY_MODEL.is_dir() else "rules"
    summary = analyze(run, jsonl=gsm, out_dir=out, pos_model=pos, anchor="Answer", compare=facts, repeats=3,
                      seed=1, chunk_len=16, min_tag_count=2)
    expected = {"layers.csv", "layers.json", "tag_layer_rho.csv", "tag_layer_rho.json", "collapse.csv",
                "collapse.json", "tag_layer_steps.csv", "tag_layer_steps.json", "anchor.csv", "anchor.json",
                "overrides.csv", "overrides.json", "arrays.npz", "arrays_compare.npz", "tag_layer_rho.png",
                "layer_gates.png", "collapse.png", "anchor_diff.png", "report.html", "summary.json"}
    assert expected <= {p.name for p in out.iterdir()} and expected <= set(summary["files"])
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["datasets"]["gsm"]["documents"] == 3 and summary["datasets"]["facts"]["documents"] == 3
    assert summary["anchor"]["docs_a"] == 3 and summary["anchor"]["docs_b"] == 3
    assert len(summary["anchor"]["rows"]) == 3
    ov = summary["overrides"]
    assert {(r["dataset"], r["to"]) for r in ov} == {(d, t) for d in ("gsm", "facts") for t in ("wide", "deep")}
    assert all(0 < r["p_delta_all"] <= 1 for r in ov if r["class_tokens"])
    assert json.loads((out / "summary.json").read_text())["arch"] == "dual"

    arr = np.load(out / "arrays.npz")
    text = str(arr["text"])
    n = len(arr["ids"])
    assert arr["rho_deep"].shape == (3, n) and arr["tags"].shape == (n,) and arr["loss"].shape == (n,)
    assert text.startswith(GSM[0]["question"] + "\n" + GSM[0]["answer"])
    pieces = [text[s:e] for s, e in zip(arr["start"], arr["end"])]
    assert "".join(pieces) == text.replace("\n\n", "")  # documents joined by a blank line
    assert "ARITH" in arr["tags"].tolist()
    csv_head = (out / "tag_layer_rho.csv").read_text().splitlines()[0]
    assert csv_head == "dataset,tag,count,layer_0,layer_1,layer_2"
    page = (out / "report.html").read_text()
    assert len(re.findall(r'<span class="t" data-i=', page)) == n


@pytest.mark.parametrize("arch", ["loop", "wide"])
def test_analyze_data_folder_on_loop_and_wide_models(arch, tmp_path, tokenizer, tokenizer_file):
    from dualpath.data.shards import write_shard

    model = make_model(arch)
    run = save(tmp_path, model, tokenizer_file)
    data = tmp_path / "data"
    data.mkdir()
    eos = bos_id(tokenizer)
    ids = []
    for t in TRAIN_TEXT:
        ids += tokenizer.encode(t).ids + [eos]
    write_shard(data / "val_000.bin", np.array(ids), 300)
    (data / "tokenizer.json").write_text(tokenizer_file.read_text())
    corpus = corpus_from_path(data, tokenizer)
    assert corpus.texts == TRAIN_TEXT and corpus.bos == eos
    out = tmp_path / "out"
    summary = analyze(run, data=data, out_dir=out, pos_model="rules", repeats=2)
    names = {p.name for p in out.iterdir()}
    assert {"layers.csv", "arrays.npz", "report.html", "layer_gates.png", "summary.json"} <= names
    assert not {"overrides.csv", "tag_layer_rho.csv", "collapse.csv"} & names
    assert "dual model" in summary["overrides_note"]
    if arch == "loop":
        assert "tag_layer_steps.csv" in names
        assert all(1 <= r["expected_steps"] <= 3 for r in summary["layers"]["data"])
    else:
        assert "tag_layer_steps.csv" not in names and summary["layers"]["data"][0]["delta_norm_wide"] > 0
    arr = np.load(out / "arrays.npz")
    assert str(arr["text"]) == "\n\n".join(TRAIN_TEXT) and "rho_deep" not in arr.files


def test_analyze_user_errors(tmp_path, tokenizer_file):
    run = save(tmp_path, make_model(), tokenizer_file)
    facts = tmp_path / "facts.txt"
    facts.write_text(FACTS)
    with pytest.raises(DataError, match="exactly one"):
        analyze(run, out_dir=tmp_path / "o")
    with pytest.raises(DataError, match="exactly one"):
        analyze(run, text=facts, jsonl=facts, out_dir=tmp_path / "o")
    with pytest.raises(DataError, match="--compare"):
        analyze(run, text=facts, anchor="Answer", out_dir=tmp_path / "o")
    with pytest.raises(DataError, match="occurs in no document"):
        analyze(run, text=facts, compare=facts, anchor="Nowhere", out_dir=tmp_path / "o", pos_model="rules")
    with pytest.raises(DataError, match="not found"):
        analyze(run, text=tmp_path / "missing.txt", out_dir=tmp_path / "o")
    with pytest.raises(DataError, match="invalid JSON") as e:
        analyze(run, jsonl=facts, out_dir=tmp_path / "o")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()  # nothing is written before the inputs are checked


def test_command_line_wiring(tmp_path, tokenizer_file, capsys):
    import argparse

    from dualpath.analysis.command import add_arguments, kwargs_from_args, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ckpt = save(tmp_path, make_model(), tokenizer_file)
    facts = tmp_path / "facts.txt"
    facts.write_text(FACTS)
    args = parser.parse_args([str(ckpt), "--text", str(facts), "--out", str(tmp_path / "o"), "--pos-model", "rules",
                              "--repeats", "2", "--override-to", "wide", "--json"])
    kw = kwargs_from_args(args)
    assert kw["override_tags"] == ("ARITH",) and kw["override_to"] == ("wide",) and kw["text"] == str(facts)
    assert run(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["datasets"]["facts"]["documents"] == 3 and len(summary["overrides"]) == 1
    args = parser.parse_args([str(ckpt), "--text", str(facts), "--out", str(tmp_path / "o2"), "--pos-model", "rules",
                              "--override-tags", ""])
    assert run(args) == 0
    out = capsys.readouterr().out
    assert "mean rho_d per layer [facts]" in out and "overrides.csv" not in out


def test_cli_report_tables_fit_the_page(tmp_path, tokenizer_file, capsys):
    """`dualpath analyze`: every table of report.html scrolls inside its own box, and the override table shows
    each statistic with its random control and p-value."""
    from dualpath.cli import main

    ckpt = save(tmp_path, random_gates(make_model(hand=False)), tokenizer_file)
    facts = tmp_path / "facts.txt"
    facts.write_text(FACTS + "\nThe sum is 12 + 30 = 42. The product is 6 * 7 = 42.\n")
    out = tmp_path / "o"
    assert main(["analyze", str(ckpt), "--text", str(facts), "--out", str(out), "--pos-model", "rules",
                 "--repeats", "2", "--override-to", "wide"]) == 0
    page = (out / "report.html").read_text()
    assert re.search(r"\.scroll\{overflow-x:auto", page)
    tables = re.findall(r"(.{0,20})<table>", page)
    assert len(tables) >= 4 and all(t.endswith('<div class="scroll">') for t in tables)
    assert page.count("<table>") == page.count('</table></div>')
    head = re.search(r"Token-class overrides.*?<thead><tr>(.*?)</tr>", page, re.S).group(1)
    cols = [html.unescape(re.sub(r"<.*?>", "", c)) for c in re.findall(r"<th>(.*?)</th>", head)]
    for s in ("delta_all", "delta_class", "delta_next"):
        i = cols.index(s)
        assert cols[i + 1:i + 4] == [f"random_{s}_mean", f"random_{s}_std", f"p_{s}"]
    row = re.search(r"Token-class overrides.*?<tbody><tr>(.*?)</tr>", page, re.S).group(1)
    cells = re.findall(r"<td>(.*?)</td>", row)
    p = float(cells[cols.index("p_delta_all")])
    assert 0 < p <= 1
    ov = json.loads((out / "summary.json").read_text())["overrides"][0]
    assert f"{ov['p_delta_all']:.4g}" == cells[cols.index("p_delta_all")]

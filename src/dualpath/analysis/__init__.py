"""Routing analysis of Dual-Path models (the paper's interpretability section): per-token gates, deep share
ρ_d, cos(Δ_d, Δ_w), loop steps and loss; POS tags; aggregates; token-class overrides; an HTML report.

    from dualpath.analysis import analyze, capture
    arrays = capture(model, "some text", tokenizer)      # dict of NumPy arrays
    summary = analyze("runs/x", text="a.txt", out_dir="out")

See docs/ANALYSIS.md. spaCy and matplotlib are optional (`pip install 'dualpath[analysis]'`).
"""

from .aggregate import (anchor_compare, anchor_window, binary_entropy, collapse_diagnostics, layer_means,
                        tag_layer_table)
from .capture import capture, capture_ids, deep_share, forced_losses
from .corpus import Corpus, corpus_from_path, corpus_from_texts, decode_with_offsets, encode_with_offsets, load_corpus
from .overrides import p_value, token_class_override
from .pipeline import analyze
from .report import render_html
from .tags import RuleTagger, SpacyTagger, arith_char_mask, get_tagger, tag_corpus, tag_text, tag_tokens

__all__ = ["analyze", "capture", "capture_ids", "deep_share", "Corpus", "load_corpus", "corpus_from_path",
           "corpus_from_texts", "encode_with_offsets", "decode_with_offsets", "get_tagger", "tag_tokens", "tag_text",
           "tag_corpus", "arith_char_mask", "RuleTagger", "SpacyTagger", "layer_means", "tag_layer_table",
           "collapse_diagnostics", "binary_entropy", "anchor_window", "anchor_compare", "token_class_override",
           "p_value", "render_html", "forced_losses"]

"""Evaluation: loss, exact bits per byte, answer accuracy and ablation tables (`evaluate`), the native
lm-evaluation-harness model (`lm_eval`) and the local lm-eval tasks (`tasks/`)."""

from .evaluate import (check_tokenizer, evaluate_datasets, evaluate_examples, evaluate_shards, evaluate_text,
                       load_tokenizer, results_markdown, score_sequences)

__all__ = ["check_tokenizer", "evaluate_datasets", "evaluate_examples", "evaluate_shards", "evaluate_text",
           "load_tokenizer", "results_markdown", "score_sequences"]

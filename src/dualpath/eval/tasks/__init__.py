"""lm-evaluation-harness tasks shipped with dualpath: pass this folder to lm-eval with `--include_path`.

    dualpath_gsm8k_local       GSM8K from local JSON lines, generate_until, `#### answer` exact match
    dualpath_text_ppl          rolling-loglikelihood perplexity of any local text file
    dualpath_synthetic_cloze   multiple-choice cloze over the synthetic corpus's fact queries

`TASKS_DIR` is the folder; `task_manager()` returns an lm-eval TaskManager that knows these tasks.
See docs/HF_AND_LM_EVAL.md and utils.py (how to point a task at another file).
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
TASKS = ("dualpath_gsm8k_local", "dualpath_text_ppl", "dualpath_synthetic_cloze")


def task_manager(metadata: dict | None = None, **kwargs):
    """An lm_eval.tasks.TaskManager including TASKS_DIR (metadata: e.g. {"text_path": "..."})."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), metadata=metadata, **kwargs)

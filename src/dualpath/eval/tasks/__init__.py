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
# each task's test file: its metadata key and environment variable (utils.py reads them the same way)
TASK_FILES = {"dualpath_gsm8k_local": ("gsm8k_path", "DUALPATH_GSM8K_PATH"),
              "dualpath_text_ppl": ("text_path", "DUALPATH_TEXT_PATH"),
              "dualpath_synthetic_cloze": ("cloze_path", "DUALPATH_CLOZE_PATH")}


def task_manager(metadata: dict | None = None, **kwargs):
    """An lm_eval.tasks.TaskManager including TASKS_DIR (metadata: e.g. {"text_path": "..."})."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), metadata=metadata, **kwargs)


def check_task_data(tasks: list[str], metadata: dict) -> None:
    """DataError naming the missing test file of a dualpath task (from metadata, its environment variable or its
    YAML's data_files), before lm-eval builds anything."""
    import yaml

    from .utils import _pick_path

    class _Loader(yaml.SafeLoader):  # the YAMLs' `!function utils.x` tags are lm-eval's, not data
        pass

    _Loader.add_constructor("!function", lambda loader, node: None)
    for task in tasks:
        if task in TASK_FILES:
            key, env = TASK_FILES[task]
            spec = yaml.load((TASKS_DIR / f"{task}.yaml").read_text(), Loader=_Loader)
            _pick_path({**metadata, **spec.get("dataset_kwargs", {})}, key, env, "test")

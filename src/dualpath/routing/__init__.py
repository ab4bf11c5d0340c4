"""Duo-LLM stages 2 and 3 and the comparison report (see docs/DUO.md).

    oracle(model, batches, budgets, with_skip=False, max_patterns=4096, beam=16) -> dict      stage 2
    gate_search(dual_model, batches, max_patterns=4096, beam=16) -> dict                      Dual-Path gates
    train_router(model, batch_fn, target, steps, ...) -> (router_model, history)              stage 3
    evaluate_routed(router_model, batches) -> dict
    report(model, batches, budgets, random_trials=100, routers=[(model, target)]) -> dict     comparison

and the command-level wrappers that load checkpoints and data and write files: run_oracle,
run_gate_search, run_train_router, run_report. The search engine is `dualpath.routing.search`; windows come from `dualpath.data.loader`.
"""

from ..data.loader import load_windows, make_batches, train_window_fn
from .oracle import (OPTIMISTIC_NOTE, check_budgets, check_duo, gate_search, oracle, oracle_markdown, run_gate_search,
                     run_oracle, write_oracle)
from .report import report, report_markdown, run_report, write_report
from .router import evaluate_routed, load_router, router_model, run_train_router, train_router

__all__ = ["load_windows", "make_batches", "train_window_fn", "oracle", "oracle_markdown", "write_oracle",
           "run_oracle", "gate_search", "run_gate_search", "check_budgets", "check_duo", "OPTIMISTIC_NOTE",
           "train_router", "evaluate_routed", "router_model", "load_router", "run_train_router", "report",
           "report_markdown", "write_report", "run_report"]

"""Shared by the benchmark scripts: where results go, machine facts, a timer."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def load() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the system does not say): a loaded machine's
    timings are noisy, so every result records the load it was measured under."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
            "arch": platform.machine(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "load": load()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **payload}, indent=2))
    return path


def best_time(fn, repeats: int = 5, warmup: int = 2, sync=None) -> float:
    """Best wall time of fn() over repeats (seconds), after warm-up."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        if sync:
            sync()
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        best = min(best, time.perf_counter() - t)
    return best


def table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

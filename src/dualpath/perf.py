"""Throughput helpers shared by the trainer, evaluation and benchmarks: a measured GEMM peak and MFU."""

from __future__ import annotations

import time

import torch

# Dense bf16 tensor-core peaks from the vendors' spec sheets (no sparsity), FLOP/s.
GPU_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def measure_gemm_peak(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, n: int | None = None,
                      seconds: float = 0.5, clock=time.perf_counter) -> float:
    """Best FLOP/s of a square matmul on this device: the roof that MFU is measured against. clock: what a
    GEMM's time is read from (time.process_time: CPU time, which a loaded machine's other processes do not
    inflate when one thread runs)."""
    device = torch.device(device)
    n = n or (1024 if device.type == "cpu" else 8192)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    start = time.perf_counter()
    for _ in range(3):  # warm up
        a @ b
    while time.perf_counter() - start < seconds or best == 0.0:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = clock()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 / max(clock() - t, 1e-9))
    return best


def peak_flops(device: torch.device, configured: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s, where it came from) for MFU."""
    if configured > 0:
        return configured, "configured"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAKS.items():
            if key in name:
                return value, f"spec sheet bf16 dense ({name})"
        return measure_gemm_peak(device, torch.bfloat16), f"measured bf16 GEMM ({name})"
    return measure_gemm_peak(device), f"measured fp32 GEMM on CPU ({torch.get_num_threads()} threads)"

"""Timing shared by the benchmarks: best of several runs after a warm-up."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def best_seconds(
    run: Callable[[], object],
    repeats: int,
    sync: Callable[[], None] = lambda: None,
    warmup: bool = True,
) -> float:
    """Best wall time of `repeats` runs; `sync` waits for queued GPU work before the clock stops.
    `warmup=False` when the caller has already warmed up an equivalent run (a forward of many
    seconds on a CPU is not worth doing twice)."""
    with torch.inference_mode():
        if warmup:
            run()  # filterbank cache, FFT plans, cuDNN/cuBLAS/oneDNN choices, lazy imports
            sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - start)
    return min(times)


def device_sync(device: torch.device | str) -> Callable[[], None]:
    """The `sync` for best_seconds on `device`: the CUDA queue's, or nothing on a CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None

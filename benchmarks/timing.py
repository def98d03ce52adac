"""Timing shared by the benchmarks: best of several runs after a warm-up."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def best_seconds(
    run: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None
) -> float:
    """Best wall time of `repeats` runs; `sync` waits for queued GPU work before the clock stops."""
    with torch.inference_mode():
        run()  # warm-up: filterbank cache, FFT plans, cuDNN/cuBLAS choices, lazy imports
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - start)
    return min(times)

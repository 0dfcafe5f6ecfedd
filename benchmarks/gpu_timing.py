"""Timing helpers the one-GPU benchmark scripts share (run from the repository root:
``python benchmarks/<script>.py`` puts this folder on the path)."""

from __future__ import annotations

import statistics
import time

import torch

__all__ = ["device_ms", "host_us"]


def device_ms(fn, iters: int = 50, warmup: int = 5) -> float:
    """Median device milliseconds of ``fn()`` (CUDA events around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def host_us(fn, calls: int = 50) -> float:
    """Host microseconds per call of ``fn``, issued back to back after one warm-up call and
    a sync (the GPU queue absorbs them while it is slower)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    seconds = time.perf_counter() - start
    torch.cuda.synchronize()
    return seconds / calls * 1e6

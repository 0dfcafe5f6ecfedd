"""``tokenring bench``: BENCHMARK.md's cases, every method side by side, in one run."""

from __future__ import annotations

from .cases import PASSES, Case, cases_for, flops
from .methods import SingleDevice, Strategy
from .runner import BenchConfig, bench_worker

__all__ = [
    "PASSES",
    "BenchConfig",
    "Case",
    "SingleDevice",
    "Strategy",
    "bench_worker",
    "cases_for",
    "flops",
]

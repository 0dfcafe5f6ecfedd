"""Strategies as schedules: per rank, per step, what is computed and what moves."""

from __future__ import annotations

from functools import lru_cache

from ..options import Layout, Pass, Strategy
from .ir import Schedule
from .ring import ring_schedule
from .tokenring import tokenring_schedule

__all__ = ["Schedule", "build_schedule"]

_BUILDERS = {
    Strategy.TOKENRING: tokenring_schedule,
    Strategy.RING: ring_schedule,
}


@lru_cache(maxsize=512)
def build_schedule(
    strategy: Strategy, layout: Layout, world: int, rank: int, causal: bool, pass_: Pass
) -> Schedule:
    """The schedule one rank runs (pure and cached: schedules are immutable data)."""
    return _BUILDERS[strategy](layout, world, rank, causal, pass_)

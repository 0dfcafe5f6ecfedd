"""Strategies as schedules: per rank, per step, what is computed and what moves.

``STRATEGIES`` maps each ``Strategy`` to its declaration (``base.StrategyDef``):
what it supports and the schedule it runs.
"""

from __future__ import annotations

from ..options import Strategy
from .allgather import AllGatherKV
from .base import StrategyDef
from .ir import Schedule
from .key import ScheduleKey
from .ring import Ring
from .tokenring import TokenRing
from .ulysses import Ulysses
from .usp import USP

__all__ = ["STRATEGIES", "Schedule", "ScheduleKey", "StrategyDef", "build_schedule"]

STRATEGIES: dict[Strategy, StrategyDef] = {
    s.name: s for s in (TokenRing(), Ring(), Ulysses(), AllGatherKV(), USP())
}


def build_schedule(key: ScheduleKey) -> Schedule:
    """The schedule one rank runs for one pass (pure: schedules are immutable data)."""
    return STRATEGIES[key.strategy].schedule(key)

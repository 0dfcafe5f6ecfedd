"""What every strategy declares: what it can run, and its schedule.

Like the kernel backends, a strategy explains every refusal in
``not_supported_reasons`` so that ``tr.attention`` can raise one error that
says why (and what would work), the same on every rank.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from ..options import Strategy
from .ir import Schedule
from .key import ScheduleKey

__all__ = ["StrategyDef"]


class StrategyDef(ABC):
    """One strategy: its name, what it supports, and the schedule it runs."""

    name: Strategy
    summary: str = ""

    def not_supported_reasons(self, key: ScheduleKey) -> list[str]:
        """Every reason this strategy cannot run the call ``key`` describes (empty if it
        can; the same for every rank and pass)."""
        return []

    @abstractmethod
    def schedule(self, key: ScheduleKey) -> Schedule:
        """The schedule of ``key.rank`` for ``key.pass_``."""

    def __repr__(self) -> str:
        return f"<strategy {self.name.value}>"

"""What every strategy declares: what it can run, and its schedule.

Like the kernel backends, a strategy explains every refusal in
``not_supported_reasons`` so that ``tr.attention`` can raise one error that
says why (and what would work), the same on every rank.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from ..options import Layout, Strategy
from .ir import Schedule
from .key import ScheduleKey

__all__ = ["CallShape", "StrategyDef"]


@dataclass(frozen=True)
class CallShape:
    """The shape of a call as a strategy sees it (identical on every rank)."""

    world: int
    layout: Layout
    causal: bool
    heads_q: int
    heads_kv: int
    length: int  # local sequence length
    ulysses: int = 1  # the size of the Ulysses axis (usp)


class StrategyDef(ABC):
    """One strategy: its name, what it supports, and the schedule it runs."""

    name: Strategy
    summary: str = ""

    def not_supported_reasons(self, shape: CallShape) -> list[str]:
        """Every reason this strategy cannot run ``shape`` (empty if it can)."""
        return []

    @abstractmethod
    def schedule(self, key: ScheduleKey) -> Schedule:
        """The schedule of ``key.rank`` for ``key.pass_``."""

    def __repr__(self) -> str:
        return f"<strategy {self.name.value}>"

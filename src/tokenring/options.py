"""Typed options accepted at the public edge.

Strings are parsed once, here, into enums; an unknown value raises a
``ValueError`` that lists the valid ones, so a typo never reaches the
communication code (where it could leave other ranks waiting).
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

__all__ = ["Layout", "Pass", "Strategy", "parse_enum"]


class Layout(str, Enum):
    """How a sequence of length S is split into per-rank shards (see docs/algorithms.md).

    ``contiguous``: rank r holds tokens [r*S/P, (r+1)*S/P).
    ``zigzag``: the sequence is cut into 2P equal chunks; rank r holds chunk r
    followed by chunk 2P-1-r, which balances causal work across ranks.
    """

    CONTIGUOUS = "contiguous"
    ZIGZAG = "zigzag"


class Strategy(str, Enum):
    """What moves between ranks (see docs/algorithms.md).

    ``tokenring``: queries travel, partial results return; ``ring``: keys and
    values travel; ``ulysses``: all-to-all from sequence to head shards and back;
    ``allgather``: keys and values are gathered whole, gradients reduce-scattered.
    """

    TOKENRING = "tokenring"
    RING = "ring"
    ULYSSES = "ulysses"
    ALLGATHER = "allgather"


class Pass(str, Enum):
    """Which pass a schedule or executor run belongs to."""

    FORWARD = "forward"
    BACKWARD = "backward"


E = TypeVar("E", bound=Enum)


def parse_enum(kind: type[E], value: object, argument: str) -> E:
    """Return ``value`` as a member of ``kind``; raise a ValueError naming the valid values."""
    if isinstance(value, kind):
        return value
    for member in kind:
        if value == member.value:
            return member
    valid = ", ".join(repr(m.value) for m in kind)
    raise ValueError(f"unknown {argument} {value!r}; valid values are {valid}")

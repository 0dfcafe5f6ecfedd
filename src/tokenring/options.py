"""Typed options accepted at the public edge.

Strings are parsed once, here, into enums; an unknown value raises a
``ValueError`` that lists the valid ones, so a typo never reaches the
communication code (where it could leave other ranks waiting).
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

__all__ = [
    "AUTO",
    "JointStrategy",
    "Layout",
    "Pass",
    "RingImpl",
    "Strategy",
    "parse_enum",
    "parse_strategy",
]


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
    ``allgather``: keys and values are gathered whole, gradients reduce-scattered;
    ``usp``: Ulysses over a mesh's ``ulysses`` axis x TokenRing (or ring) over its
    ``ring`` axis.
    """

    TOKENRING = "tokenring"
    RING = "ring"
    ULYSSES = "ulysses"
    ALLGATHER = "allgather"
    USP = "usp"


class RingImpl(str, Enum):
    """Which ring runs across the ``ring`` axis of ``strategy="usp"``."""

    TOKENRING = "tokenring"
    RING = "ring"


class JointStrategy(str, Enum):
    """Where joint (text) tokens sit in the concatenated sequence: ``none`` (no joint
    tokens), in ``front`` of the image tokens, or at the ``rear``."""

    NONE = "none"
    FRONT = "front"
    REAR = "rear"


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


AUTO = "auto"
"""``strategy="auto"``: the planner picks (``tokenring.auto``); not a ``Strategy``, since
it is resolved to one before anything runs."""


def parse_strategy(value: object) -> Strategy:
    """``value`` as a ``Strategy``; the ValueError names every valid value, ``auto`` too."""
    try:
        return parse_enum(Strategy, value, "strategy")
    except ValueError as error:
        raise ValueError(f"{error}, {AUTO!r}") from None

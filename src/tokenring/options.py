"""Typed options accepted at the public edge.

Strings are parsed once, here, into enums; an unknown value raises a
``ValueError`` that lists the valid ones, so a typo never reaches the
communication code (where it could leave other ranks waiting).
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

__all__ = [
    "JointStrategy",
    "Layout",
    "Pass",
    "RingImpl",
    "Strategy",
    "parse_enum",
    "read_enum",
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


def read_enum(kind: type[E], value: object, argument: str, also: tuple = ()) -> tuple[object, str]:
    """``value`` as a member of ``kind`` (or one of the extra values ``also``), and "";
    or None and a problem that names every valid value."""
    if isinstance(value, kind):
        return value, ""
    for member in kind:
        if value == member.value:
            return member, ""
    if value in also:
        return value, ""
    valid = ", ".join([repr(m.value) for m in kind] + [repr(a) for a in also])
    return None, f"unknown {argument} {value!r}; valid values are {valid}"


def parse_enum(kind: type[E], value: object, argument: str) -> E:
    """Return ``value`` as a member of ``kind``; raise a ValueError naming the valid values."""
    member, problem = read_enum(kind, value, argument)
    if problem:
        raise ValueError(problem)
    return member  # type: ignore[return-value]

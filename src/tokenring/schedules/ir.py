"""The schedule language: per rank, an ordered list of operations over named slots.

A *slot* is a per-rank buffer holding one shard's worth of rows (two
sub-chunks, see ``layouts``). Its *kind* says what it holds: a query bundle,
a key/value bundle, or a result for either side. The executor decides what
tensors a kind contains in each pass (forward: ``q`` / ``k, v`` / ``out, lse``;
backward: ``q, do, lse, delta`` / ``k, v`` / ``dq`` / ``dk, dv``), so one
schedule shape serves both passes where the data flow is the same.

Operations run in order on one rank:

- ``Post`` starts a set of point-to-point transfers (one communicator per
  ``lane``) and names them with a handle;
- ``Wait`` blocks until a handle's transfers have completed;
- ``Compute`` runs one block attention (forward or backward) and writes or
  accumulates its results;
- ``Merge`` accumulates one result slot's rows into another's.

Schedules are data: tests check them symbolically (``simulate``), the
timeline labels come from them and the executor runs them unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import cached_property

__all__ = [
    "Compute",
    "Merge",
    "Op",
    "Post",
    "Precision",
    "Rows",
    "Schedule",
    "SlotKind",
    "SlotSpec",
    "Transfer",
    "Wait",
]


class SlotKind(str, Enum):
    """What a slot holds."""

    QUERY = "query"
    KV = "kv"
    QUERY_RESULT = "query_result"
    KV_RESULT = "kv_result"


class Precision(str, Enum):
    """Storage precision of a result slot: float32 accumulation, or the input dtype on the wire."""

    ACCUM = "accum"
    WIRE = "wire"


@dataclass(frozen=True)
class SlotSpec:
    """Declaration of a slot. ``local`` slots are bound to the caller's tensors."""

    kind: SlotKind
    precision: Precision = Precision.WIRE
    local: bool = False


@dataclass(frozen=True)
class Rows:
    """Sub-chunks ``[start, stop)`` of a slot (each shard has two sub-chunks)."""

    slot: str
    start: int = 0
    stop: int = 2

    @property
    def empty(self) -> bool:
        return self.stop <= self.start


@dataclass(frozen=True)
class Transfer:
    """One send or receive of ``rows`` to/from group rank ``peer`` on communicator ``lane``."""

    rows: Rows
    peer: int
    send: bool
    lane: int


@dataclass(frozen=True)
class Post:
    handle: str
    transfers: tuple[Transfer, ...]
    step: int


@dataclass(frozen=True)
class Wait:
    handle: str
    step: int


@dataclass(frozen=True)
class Compute:
    """Block attention of ``q`` rows against ``kv`` rows.

    ``causal`` is only used on square blocks whose rows are the same global
    tokens on both sides (top-left and bottom-right alignment then agree).
    ``q_out`` receives the query-side result (forward: out, lse; backward: dq),
    ``kv_out`` the key/value-side result (backward only: dk, dv); ``fresh_*``
    says per sub-chunk whether to overwrite instead of accumulate. ``q_owner``/``kv_owner`` are the
    group ranks whose shards the rows come from (for labels and checks).
    """

    q: Rows
    kv: Rows
    causal: bool
    q_out: Rows
    kv_out: Rows | None
    fresh_q: tuple[bool, ...]
    fresh_kv: tuple[bool, ...]
    step: int
    q_owner: int
    kv_owner: int


@dataclass(frozen=True)
class Merge:
    """Accumulate result rows ``src`` into ``dst`` (LSE merge forward, sum backward)."""

    src: Rows
    dst: Rows
    step: int


Op = Post | Wait | Compute | Merge


@dataclass(frozen=True)
class Schedule:
    """Everything one rank does for one pass of one strategy."""

    strategy: str
    rank: int
    world: int
    slots: dict[str, SlotSpec]
    ops: tuple[Op, ...]
    query_result: str
    kv_result: str | None = None

    @cached_property
    def used_slots(self) -> frozenset[str]:
        """Slots some operation touches (others need no buffer)."""
        names: set[str] = set()
        for op in self.ops:
            if isinstance(op, Post):
                names.update(t.rows.slot for t in op.transfers)
            elif isinstance(op, Compute):
                names.update(r.slot for r in (op.q, op.kv, op.q_out, op.kv_out) if r is not None)
            elif isinstance(op, Merge):
                names.update((op.src.slot, op.dst.slot))
        names.add(self.query_result)
        if self.kv_result is not None:
            names.add(self.kv_result)
        return frozenset(names)

"""The schedule language: per rank, an ordered list of operations over named slots.

A *slot* is a per-rank buffer, declared with what it holds:

- its *kind*: a query bundle, a key/value bundle, or a result for either side;
  which tensors a kind holds in each pass is the table ``COMPONENTS`` below,
  so one schedule shape serves both passes where the data flow is the same;
- ``cells``: how many sequence pieces it holds. A shard has two (the pieces of
  the layout, ``geometry.py``); a sequence gathered over an axis of ``P`` ranks
  has ``2P``, in increasing global order. Which pieces a slot holds may change
  from step to step (a buffer that receives each visitor's queries in turn):
  every ``Rows`` names the pieces its slot holds at that point (``content``),
  and the pieces' token ranges come from the schedule's ``Geometry``, the query
  side's table for query slots and the key/value side's for the others. Cells
  are stored one after the other, each as long as its piece;
- ``head_parts``: it holds one of ``head_parts`` equal parts of its family's
  heads (query heads for query slots, key/value heads for key/value slots);
  which part is data that the operations filling it carry;
- ``groups``: its storage is split into this many head groups, group-major,
  so that every group is contiguous (collectives that move one head group);
- ``zeroed``: it starts as the merge's identity (zeros; an LSE of -inf), so
  cells no operation writes contribute nothing (a gathered gradient that is
  reduce-scattered, where the mask leaves some keys unseen by this rank's
  queries) or come out empty (queries that meet no key).

Operations run in order on one rank:

- ``Post`` starts data movement and names it with a handle: point-to-point
  ``Transfer``\\ s (one batch per lane), or one collective over an axis
  (``AllGather``, ``AllToAll`` either way between sequence and heads,
  ``ReduceScatter``);
- ``Wait`` blocks until a handle's movement has completed;
- ``Compute`` runs one block attention (forward or backward) under the call's
  mask, classified for the block (``masks.BlockKind``), and writes or
  accumulates its results;
- ``Merge`` accumulates one result slot's rows into another's.

A *lane* is a communicator of its own on one axis (``Lane``); a schedule's
lanes are the ones its moves name. Schedules are data: tests check them
symbolically (``simulate``), timeline labels come from them and the executor
runs them unchanged. See docs/algorithms.md and docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import cached_property

from ..options import Pass
from .geometry import Geometry, PieceTable
from .masks import BlockKind, Mask

__all__ = [
    "COMPONENTS",
    "FAMILY",
    "GROUP_AXIS",
    "QUERY_SIDE",
    "WHOLE",
    "AllGather",
    "AllToAll",
    "Collective",
    "Compute",
    "Direction",
    "HeadPart",
    "Lane",
    "Merge",
    "Move",
    "Op",
    "Post",
    "Precision",
    "ReduceScatter",
    "Rows",
    "Schedule",
    "SlotKind",
    "SlotSpec",
    "Transfer",
    "Wait",
]

GROUP_AXIS = "group"
"""The one axis of the 1-D strategies: the ranks of the caller's process group."""


class SlotKind(str, Enum):
    """What a slot holds (its tensors per pass: ``COMPONENTS``)."""

    QUERY = "query"
    KV = "kv"
    QUERY_RESULT = "query_result"
    KV_RESULT = "kv_result"


COMPONENTS: dict[tuple[Pass, SlotKind], tuple[str, ...]] = {
    (Pass.FORWARD, SlotKind.QUERY): ("q",),
    (Pass.FORWARD, SlotKind.KV): ("k", "v"),
    (Pass.FORWARD, SlotKind.QUERY_RESULT): ("out", "lse"),
    (Pass.FORWARD, SlotKind.KV_RESULT): (),
    (Pass.BACKWARD, SlotKind.QUERY): ("q", "do", "lse", "delta"),
    (Pass.BACKWARD, SlotKind.KV): ("k", "v"),
    (Pass.BACKWARD, SlotKind.QUERY_RESULT): ("dq",),
    (Pass.BACKWARD, SlotKind.KV_RESULT): ("dk", "dv"),
}
"""The tensors a slot of each kind holds in each pass.

``lse`` and ``delta = rowsum(do * out)`` are per row and head; every other
component is per row, head and head_dim. ``delta`` travels instead of ``out``
(docs/algorithms.md, "What travels in the backward pass").
"""

QUERY_SIDE = frozenset({SlotKind.QUERY, SlotKind.QUERY_RESULT})
"""Slot kinds whose cells are pieces of the queries (the others: of the keys/values)."""

FAMILY: dict[str, str] = {
    "q": "q",
    "do": "q",
    "out": "q",
    "dq": "q",
    "k": "kv",
    "v": "kv",
    "dk": "kv",
    "dv": "kv",
    "lse": "row",
    "delta": "row",
}
"""Shape family of a component: query heads x head_dim, key/value heads x
head_dim, or one value per query head (``row``)."""


class Precision(str, Enum):
    """Storage precision of a result slot: float32 accumulation, or the input dtype on the wire."""

    ACCUM = "accum"
    WIRE = "wire"


@dataclass(frozen=True)
class SlotSpec:
    """Declaration of a slot (see the module docstring). ``local`` slots are bound to
    the caller's tensors."""

    kind: SlotKind
    precision: Precision = Precision.WIRE
    local: bool = False
    cells: int = 2
    head_parts: int = 1
    groups: int = 1
    zeroed: bool = False


@dataclass(frozen=True)
class HeadPart:
    """Part ``index`` of ``count`` equal parts of the heads a slot holds."""

    index: int = 0
    count: int = 1


WHOLE = HeadPart()


@dataclass(frozen=True)
class Rows:
    """Cells ``[start, stop)`` of a slot that holds the pieces ``content`` (all of
    them, in cell order, at this point of the schedule), and which part of its heads."""

    slot: str
    content: tuple[int, ...]
    start: int
    stop: int
    part: HeadPart = WHOLE

    @classmethod
    def whole(cls, slot: str, content: tuple[int, ...], part: HeadPart = WHOLE) -> Rows:
        """Every cell of a slot holding ``content``."""
        return cls(slot, content, 0, len(content), part)

    @property
    def pieces(self) -> tuple[int, ...]:
        """The pieces these rows hold."""
        return self.content[self.start : self.stop]

    def cell(self, index: int) -> Rows:
        """Cell ``index`` of the slot (same content and head part)."""
        return Rows(self.slot, self.content, index, index + 1, self.part)


@dataclass(frozen=True)
class Lane:
    """A communicator of its own on one axis: moves on different lanes run concurrently."""

    axis: str
    index: int


@dataclass(frozen=True)
class Transfer:
    """One send or receive of ``rows`` to/from rank ``peer`` of the axis, on lane ``lane``."""

    rows: Rows
    peer: int
    send: bool
    lane: int
    axis: str = GROUP_AXIS


@dataclass(frozen=True)
class AllGather:
    """Every member's ``src`` rows into ``dst`` on every member.

    ``placement[s]`` gives, for each cell of member ``s``'s ``src``, the cell of
    ``dst`` it lands in (global order; the same on every member).
    """

    src: Rows
    dst: Rows
    placement: tuple[tuple[int, ...], ...]
    lane: int
    axis: str = GROUP_AXIS


class Direction(str, Enum):
    """Which way an all-to-all reshards: sequence-sharded to head-sharded, or back."""

    SEQ_TO_HEADS = "seq_to_heads"
    HEADS_TO_SEQ = "heads_to_seq"


@dataclass(frozen=True)
class AllToAll:
    """Reshard between sequence pieces and heads over an axis.

    ``SEQ_TO_HEADS``: ``src`` holds this member's cells with every head; member
    ``d`` receives into ``dst`` cell ``placement[s][i]`` the cell ``i`` of member
    ``s``, restricted to head part ``parts[d]`` (of ``dst``'s ``head_parts``).
    ``HEADS_TO_SEQ`` is its inverse: member ``r`` receives its own cells back,
    with member ``s``'s head part ``parts[s]`` filled from it. Where several
    members hold the same part (key/value heads replicated because there are
    fewer than members), their contributions are summed.
    """

    src: Rows
    dst: Rows
    direction: Direction
    placement: tuple[tuple[int, ...], ...]
    parts: tuple[int, ...]
    lane: int
    axis: str = GROUP_AXIS


@dataclass(frozen=True)
class ReduceScatter:
    """Sum over members of their gathered ``src``; member ``r`` keeps, in ``dst``,
    the cells ``placement[r]`` (its own shard)."""

    src: Rows
    dst: Rows
    placement: tuple[tuple[int, ...], ...]
    lane: int
    axis: str = GROUP_AXIS


Collective = AllGather | AllToAll | ReduceScatter
Move = Transfer | Collective


@dataclass(frozen=True)
class Post:
    """Start ``moves``: point-to-point transfers (batched per lane), or one collective."""

    handle: str
    moves: tuple[Move, ...]
    step: int

    @property
    def collective(self) -> Collective | None:
        first = self.moves[0]
        return None if isinstance(first, Transfer) else first


@dataclass(frozen=True)
class Wait:
    handle: str
    step: int


@dataclass(frozen=True)
class Compute:
    """Block attention of ``q`` rows against ``kv`` rows under the call's ``mask``.

    ``kind`` says how: ``FULL`` (no mask), ``DIAG`` (causal, on a square block whose
    cells are the same pieces on both sides, so that top-left and bottom-right
    alignment agree) or ``PARTIAL`` (the mask built from the rows' positions).
    ``q_out`` receives the query-side result (forward: out, lse; backward: dq),
    ``kv_out`` the key/value-side result (backward only: dk, dv); ``fresh_*``
    says per cell whether to overwrite instead of accumulate. ``q_owner`` /
    ``kv_owner`` are the ranks whose shards the rows come from, ``None`` for a
    gathered sequence (for labels).
    """

    q: Rows
    kv: Rows
    kind: BlockKind
    mask: Mask
    q_out: Rows
    kv_out: Rows | None
    fresh_q: tuple[bool, ...]
    fresh_kv: tuple[bool, ...]
    step: int
    q_owner: int | None
    kv_owner: int | None


@dataclass(frozen=True)
class Merge:
    """Accumulate result rows ``src`` into ``dst`` (LSE merge forward, sum backward)."""

    src: Rows
    dst: Rows
    step: int


Op = Post | Wait | Compute | Merge


@dataclass(frozen=True)
class Schedule:
    """Everything one rank does for one pass of one strategy.

    ``pieces`` are the pieces of this rank's shard (its local query and key/value
    slots), in local order; ``geometry`` gives every piece's token range.
    """

    strategy: str
    rank: int
    world: int
    pieces: tuple[int, ...]
    geometry: Geometry
    slots: dict[str, SlotSpec]
    ops: tuple[Op, ...]
    query_result: str
    kv_result: str | None = None

    def table(self, rows: Rows) -> PieceTable:
        """The piece table of ``rows``'s slot (query or key/value side)."""
        kind = self.slots[rows.slot].kind
        return self.geometry.q if kind in QUERY_SIDE else self.geometry.kv

    def tokens(self, rows: Rows) -> int:
        """Tokens in ``rows``."""
        return self.table(rows).tokens(rows.content[rows.start : rows.stop])

    def token_range(self, rows: Rows) -> tuple[int, int]:
        """Where ``rows`` sit in their slot's storage: tokens ``[a, b)``."""
        table = self.table(rows)
        a = table.tokens(rows.content[: rows.start])
        return a, a + table.tokens(rows.content[rows.start : rows.stop])

    @cached_property
    def lanes(self) -> tuple[Lane, ...]:
        """The lanes this schedule moves data on (its declaration to the runtime)."""
        found = {
            Lane(move.axis, move.lane)
            for op in self.ops
            if isinstance(op, Post)
            for move in op.moves
        }
        return tuple(sorted(found, key=lambda lane: (lane.axis, lane.index)))

"""The ring a ring-type strategy (TokenRing, ring) runs over.

On its own a ring strategy runs over the caller's group, each member holding
one shard of two pieces in its local slots ``q`` and ``kv``. Inside the
Ulysses x ring hybrid it runs over the mesh's ``ring`` axis, each member
holding a *ring shard* (the ``2U`` pieces of its Ulysses group, gathered for
its share of the heads) in the slots the all-to-all filled. ``RingAxis`` says
which: the axis, this rank's place on it, every member's pieces, the head
parts its slots hold and where its queries and keys are.
"""

from __future__ import annotations

from dataclasses import dataclass

from .geometry import chunk_ids
from .ir import GROUP_AXIS, Precision, SlotKind, SlotSpec
from .key import ScheduleKey

__all__ = ["RingAxis"]


@dataclass(frozen=True)
class RingAxis:
    axis: str
    world: int
    rank: int
    shards: tuple[tuple[int, ...], ...]  # pieces of each member's shard, in global order
    q_parts: int = 1  # the shard slots hold 1/q_parts of the query heads
    kv_parts: int = 1  # and 1/kv_parts of the key/value heads
    q: str = "q"  # slot holding this rank's query bundle
    kv: str = "kv"  # slot holding this rank's keys and values

    @classmethod
    def of_group(cls, key: ScheduleKey) -> RingAxis:
        """The caller's whole group, each rank one shard of the layout."""
        shards = tuple(chunk_ids(key.layout, key.world, s) for s in range(key.world))
        return cls(GROUP_AXIS, key.world, key.rank, shards)

    @property
    def cells(self) -> int:
        return len(self.shards[0])

    @property
    def pieces(self) -> tuple[int, ...]:
        return self.shards[self.rank]

    def peer(self, offset: int) -> int:
        """Member ``offset`` hops from this rank around the ring."""
        return (self.rank + offset) % self.world

    def slot(self, kind: SlotKind, precision: Precision = Precision.WIRE) -> SlotSpec:
        """A buffer of one shard on this ring."""
        parts = self.q_parts if kind in (SlotKind.QUERY, SlotKind.QUERY_RESULT) else self.kv_parts
        return SlotSpec(kind, precision, cells=self.cells, head_parts=parts)

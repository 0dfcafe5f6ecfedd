"""Ulysses: an all-to-all turns sequence shards into head shards of the whole sequence.

Every rank sends each other rank that rank's share of the heads of its own
shard; afterwards rank d holds the whole sequence (in global order, whatever
the layout) for its share of the heads, runs one local attention with the
global causal mask, and a second all-to-all sends each rank its own tokens
back with every head. Query heads are split evenly (``heads_q`` divisible by
the degree); key/value heads likewise, or, when there are fewer of them than
ranks, each rank receives only the one its query heads use (replicated on
``degree / heads_kv`` ranks; their gradients are summed on the way back).

The backward pass moves the query bundle (q, do, lse, delta) and K, V the
same way, computes dq, dk, dv for the head share and returns them. See
docs/algorithms.md, "Ulysses".
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd

from ..options import Pass, Strategy
from .base import StrategyDef
from .blocks import cover
from .builder import ScheduleBuilder
from .geometry import chunk_ids
from .ir import GROUP_AXIS, AllToAll, Direction, Precision, Rows, Schedule, SlotKind, SlotSpec
from .key import ScheduleKey

__all__ = [
    "Ulysses",
    "UlyssesAxis",
    "emit_to_heads",
    "emit_to_seq",
    "kv_head_parts",
    "ulysses_degrees",
    "ulysses_schedule",
]

LANE = 0


def kv_head_parts(world: int, heads_kv: int) -> int:
    """Into how many parts the key/value heads are split (``world`` when they divide,
    ``heads_kv`` when there are fewer heads than ranks)."""
    return gcd(world, heads_kv)


def ulysses_degrees(heads_q: int, heads_kv: int) -> list[int]:
    """Every Ulysses degree these head counts allow."""
    return [
        d
        for d in range(1, heads_q + 1)
        if heads_q % d == 0 and (heads_kv % d == 0 or d % heads_kv == 0)
    ]


@dataclass(frozen=True)
class UlyssesAxis:
    """The axis Ulysses reshards over: its members, the pieces of the sequence they gather
    (``gathered``, in global order), and where each member's cells land in it
    (``placement``)."""

    axis: str
    degree: int
    rank: int
    placement: tuple[tuple[int, ...], ...]
    gathered: tuple[int, ...]
    heads_kv: int

    @classmethod
    def of_group(cls, key: ScheduleKey) -> UlyssesAxis:
        """The caller's whole group: the gathered sequence is every piece (cell = piece)."""
        placement = tuple(chunk_ids(key.layout, key.world, s) for s in range(key.world))
        return cls(GROUP_AXIS, key.world, key.rank, placement, tuple(range(2 * key.world)),
                   key.heads_kv)  # fmt: skip

    @property
    def cells(self) -> int:
        return len(self.gathered)

    @property
    def mine(self) -> tuple[int, ...]:
        """This member's own pieces (its shard), in local order."""
        return tuple(self.gathered[i] for i in self.placement[self.rank])

    @property
    def kv_parts(self) -> int:
        return kv_head_parts(self.degree, self.heads_kv)

    @property
    def replicated(self) -> bool:
        """Fewer key/value heads than members: each is held by several."""
        return self.kv_parts < self.degree

    def parts(self, kind: SlotKind) -> tuple[int, ...]:
        """The head part each member gets, of its family's heads."""
        if kind in (SlotKind.QUERY, SlotKind.QUERY_RESULT):
            return tuple(range(self.degree))
        share = self.degree // self.kv_parts
        return tuple(d // share for d in range(self.degree))

    def gathered_slot(self, kind: SlotKind, precision: Precision = Precision.WIRE) -> SlotSpec:
        """A buffer of the gathered sequence for this member's heads."""
        is_q = kind in (SlotKind.QUERY, SlotKind.QUERY_RESULT)
        parts = self.degree if is_q else self.kv_parts
        return SlotSpec(kind, precision, cells=self.cells, head_parts=parts)

    def reshard(self, src: str, dst: str, kind: SlotKind, direction: Direction) -> AllToAll:
        shard, whole = self.mine, self.gathered
        src_pieces, dst_pieces = (
            (shard, whole) if direction is Direction.SEQ_TO_HEADS else (whole, shard)
        )
        return AllToAll(
            Rows.whole(src, src_pieces), Rows.whole(dst, dst_pieces), direction, self.placement,
            self.parts(kind), LANE, self.axis,
        )  # fmt: skip

    def slots(
        self, backward: bool, *, q: str, kv: str, res: str, kvres: str
    ) -> dict[str, SlotSpec]:
        """The gathered buffers for the queries, keys and values ``q``, ``kv`` and the
        results ``res``, ``kvres`` of a pass."""
        slots = {
            q: self.gathered_slot(SlotKind.QUERY),
            kv: self.gathered_slot(SlotKind.KV),
            res: self.gathered_slot(SlotKind.QUERY_RESULT),
        }
        if backward:
            slots[kvres] = self.gathered_slot(SlotKind.KV_RESULT)
        return slots


def _local_slots(backward: bool, replicated: bool) -> dict[str, SlotSpec]:
    slots = {
        "q": SlotSpec(SlotKind.QUERY, local=True),
        "kv": SlotSpec(SlotKind.KV, local=True),
        "res": SlotSpec(SlotKind.QUERY_RESULT),
    }
    if backward:
        # summed over the ranks that share a replicated key/value head: accumulate in fp32
        slots["kvres"] = SlotSpec(
            SlotKind.KV_RESULT, Precision.ACCUM if replicated else Precision.WIRE
        )
    return slots


def emit_to_heads(b: ScheduleBuilder, ua: UlyssesAxis, q: str, kv: str, step: int) -> None:
    """Reshard this rank's queries and keys/values into the gathered slots ``q_heads`` and
    ``kv_heads``, and wait for both."""
    q_in = b.post(
        "q>heads", step, [ua.reshard(q, "q_heads", SlotKind.QUERY, Direction.SEQ_TO_HEADS)]
    )
    kv_in = b.post(
        "kv>heads", step, [ua.reshard(kv, "kv_heads", SlotKind.KV, Direction.SEQ_TO_HEADS)]
    )
    b.wait(q_in, step + 1)
    b.wait(kv_in, step + 1)


def emit_to_seq(
    b: ScheduleBuilder, ua: UlyssesAxis, res: str, kvres: str | None, step: int
) -> None:
    """Reshard the gathered results ``res`` (and ``kvres``) back into this rank's result
    slots ``res`` and ``kvres``, and wait."""
    back = b.post(
        "res>seq", step, [ua.reshard(res, "res", SlotKind.QUERY_RESULT, Direction.HEADS_TO_SEQ)]
    )
    kv_back = None
    if kvres is not None:
        move = ua.reshard(kvres, "kvres", SlotKind.KV_RESULT, Direction.HEADS_TO_SEQ)
        kv_back = b.post("kvres>seq", step, [move])
    b.wait(back, step + 1)
    b.wait(kv_back, step + 1)


def ulysses_schedule(key: ScheduleKey) -> Schedule:
    """The Ulysses schedule of one rank for one pass."""
    P, r = key.world, key.rank
    backward = key.pass_ is Pass.BACKWARD
    ua = UlyssesAxis.of_group(key)
    slots = _local_slots(backward, ua.replicated)
    if P > 1:
        slots |= ua.slots(
            backward, q="q_heads", kv="kv_heads", res="res_heads", kvres="kvres_heads"
        )
    b = ScheduleBuilder("ulysses", r, P, ua.mine, slots, key.geometry, key.mask)
    kv_res = "kvres" if backward else None
    if P == 1:
        b.own_block(q_out="res", kv_out=kv_res)
        return b.build("res", kv_res)
    emit_to_heads(b, ua, "q", "kv", 0)
    everything = ua.gathered
    b.compute(
        cover(b.elements(everything, everything)),
        q=("q_heads", everything),
        kv=("kv_heads", everything),
        q_out="res_heads",
        kv_out="kvres_heads" if backward else None,
        step=1,
        q_owner=None,
        kv_owner=None,
    )
    emit_to_seq(b, ua, "res_heads", "kvres_heads" if backward else None, 1)
    return b.build("res", kv_res)


class Ulysses(StrategyDef):
    name = Strategy.ULYSSES
    summary = (
        "Ulysses: an all-to-all turns sequence shards into head shards of the whole "
        "sequence, one local attention per rank, and an all-to-all back."
    )

    def not_supported_reasons(self, key: ScheduleKey) -> list[str]:
        P, hq, hkv = key.world, key.heads_q, key.heads_kv
        reasons = []
        if hq % P:
            reasons.append(f"heads_q ({hq}) is not divisible by the Ulysses degree {P}")
        elif hkv % P and P % hkv:
            reasons.append(
                f"heads_kv ({hkv}) neither divides nor is divisible by the Ulysses degree {P}"
            )
        if reasons:
            degrees = ", ".join(str(d) for d in ulysses_degrees(hq, hkv))
            reasons[-1] += f" (degrees that would work for heads {hq}/{hkv}: {degrees})"
        return reasons

    def schedule(self, key: ScheduleKey) -> Schedule:
        return ulysses_schedule(key)

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

from math import gcd

from ..layouts import chunk_ids
from ..options import Pass, Strategy
from .base import CallShape, StrategyDef
from .blocks import cover, relations
from .builder import ScheduleBuilder
from .ir import AllToAll, Direction, Precision, Rows, Schedule, SlotKind, SlotSpec
from .key import ScheduleKey

__all__ = ["Ulysses", "kv_head_parts", "ulysses_degrees", "ulysses_schedule"]

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


def _slots(backward: bool, world: int, kv_parts: int, replicated: bool) -> dict[str, SlotSpec]:
    cells = 2 * world

    def gathered(kind: SlotKind, parts: int) -> SlotSpec:
        return SlotSpec(kind, cells=cells, head_parts=parts)

    slots = {
        "q": SlotSpec(SlotKind.QUERY, local=True),
        "kv": SlotSpec(SlotKind.KV, local=True),
        "q_heads": gathered(SlotKind.QUERY, world),
        "kv_heads": gathered(SlotKind.KV, kv_parts),
        "res_heads": gathered(SlotKind.QUERY_RESULT, world),
        "res": SlotSpec(SlotKind.QUERY_RESULT),
    }
    if backward:
        slots["kvres_heads"] = gathered(SlotKind.KV_RESULT, kv_parts)
        # summed over the ranks that share a replicated key/value head: accumulate in fp32
        slots["kvres"] = SlotSpec(
            SlotKind.KV_RESULT, Precision.ACCUM if replicated else Precision.WIRE
        )
    return slots


def ulysses_schedule(key: ScheduleKey) -> Schedule:
    """The Ulysses schedule of one rank for one pass."""
    P, r = key.world, key.rank
    backward = key.pass_ is Pass.BACKWARD
    kv_parts = kv_head_parts(P, key.heads_kv)
    replicated = kv_parts < P
    b = ScheduleBuilder(
        "ulysses", r, P, chunk_ids(key.layout, P, r), _slots(backward, P, kv_parts, replicated)
    )
    kv_res = "kvres" if backward else None
    if P == 1:
        b.own_block(key.causal, q_out="res", kv_out=kv_res)
        return b.build("res", kv_res)

    placement = tuple(chunk_ids(key.layout, P, s) for s in range(P))
    q_parts = tuple(range(P))
    kv_parts_of = tuple(d // (P // kv_parts) for d in range(P))

    def reshard(src: str, dst: str, direction: Direction, parts: tuple[int, ...]) -> AllToAll:
        cells = 2 * P
        src_cells, dst_cells = (2, cells) if direction is Direction.SEQ_TO_HEADS else (cells, 2)
        return AllToAll(
            Rows(src, 0, src_cells), Rows(dst, 0, dst_cells), direction, placement, parts, LANE
        )

    q_in = b.post("q>heads", 0, [reshard("q", "q_heads", Direction.SEQ_TO_HEADS, q_parts)])
    kv_in = b.post("kv>heads", 0, [reshard("kv", "kv_heads", Direction.SEQ_TO_HEADS, kv_parts_of)])
    b.wait(q_in, 1)
    b.wait(kv_in, 1)
    everything = tuple(range(2 * P))
    b.compute(
        cover(relations(everything, everything, key.causal)),
        q_slot="q_heads",
        kv_slot="kv_heads",
        q_out="res_heads",
        kv_out="kvres_heads" if backward else None,
        step=1,
        q_owner=None,
        kv_owner=None,
    )
    res_out = b.post("res>seq", 1, [reshard("res_heads", "res", Direction.HEADS_TO_SEQ, q_parts)])
    kv_out = None
    if backward:
        kv_out = b.post(
            "kvres>seq", 1, [reshard("kvres_heads", "kvres", Direction.HEADS_TO_SEQ, kv_parts_of)]
        )
    b.wait(res_out, 2)
    b.wait(kv_out, 2)
    return b.build("res", kv_res)


class Ulysses(StrategyDef):
    name = Strategy.ULYSSES
    summary = (
        "Ulysses: an all-to-all turns sequence shards into head shards of the whole "
        "sequence, one local attention per rank, and an all-to-all back."
    )

    def not_supported_reasons(self, shape: CallShape) -> list[str]:
        P, hq, hkv = shape.world, shape.heads_q, shape.heads_kv
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

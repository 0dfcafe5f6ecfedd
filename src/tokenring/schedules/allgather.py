"""All-gather K, V: every rank gathers the whole sequence's keys and values and attends
its own queries to them (as in Llama 3's context parallelism).

The gather goes in head groups on one lane: while the keys and values of one
group arrive, the previous group computes, so compute starts before the whole
gather has ended. Causal masks use each rank's global query positions (the
gathered sequence is in global order, whatever the layout). The backward pass
gathers K, V again (instead of keeping the whole sequence's K, V between the
passes), computes dq locally and dk, dv for the whole sequence, and
reduce-scatters dk, dv back to their owners on a second lane, one head group
behind the compute. See docs/algorithms.md, "All-gather".
"""

from __future__ import annotations

from ..options import Pass, Strategy
from .base import StrategyDef
from .blocks import cover
from .builder import ScheduleBuilder
from .geometry import chunk_ids
from .ir import AllGather, HeadPart, Precision, ReduceScatter, Rows, Schedule, SlotKind, SlotSpec
from .key import ScheduleKey

__all__ = ["AllGatherKV", "allgather_schedule", "head_groups"]

GATHER_LANE = 0
SCATTER_LANE = 1
MAX_HEAD_GROUPS = 4


def head_groups(world: int, heads_kv: int) -> int:
    """How many head groups the gather is cut into: the largest divisor of ``heads_kv``
    up to ``MAX_HEAD_GROUPS`` (more groups overlap more but make smaller kernel calls)."""
    if world == 1:
        return 1
    return max(g for g in range(1, MAX_HEAD_GROUPS + 1) if heads_kv % g == 0)


def _slots(backward: bool, world: int, groups: int) -> dict[str, SlotSpec]:
    cells = 2 * world
    slots = {
        "q": SlotSpec(SlotKind.QUERY, local=True),
        "kv": SlotSpec(SlotKind.KV, local=True, groups=groups),
        "acc": SlotSpec(SlotKind.QUERY_RESULT, Precision.ACCUM),
    }
    for i in range(min(groups, 2)):  # double-buffered: one computing, one arriving
        slots[f"kv_all{i}"] = SlotSpec(SlotKind.KV, cells=cells, head_parts=groups)
        if backward:
            slots[f"dkv_all{i}"] = SlotSpec(
                SlotKind.KV_RESULT, Precision.ACCUM, cells=cells, head_parts=groups, zeroed=True
            )
    if backward:
        slots["dkv"] = SlotSpec(SlotKind.KV_RESULT, Precision.ACCUM, groups=groups)
    return slots


def allgather_schedule(key: ScheduleKey) -> Schedule:
    """The all-gather schedule of one rank for one pass."""
    P, r = key.world, key.rank
    backward = key.pass_ is Pass.BACKWARD
    G = head_groups(P, key.heads_kv)
    mine = chunk_ids(key.layout, P, r)
    b = ScheduleBuilder("allgather", r, P, mine, _slots(backward, P, G), key.geometry, key.mask)
    kv_res = "dkv" if backward else None
    if P == 1:
        b.own_block(q_out="acc", kv_out=kv_res)
        return b.build("acc", kv_res)

    placement = tuple(chunk_ids(key.layout, P, s) for s in range(P))
    everything = tuple(range(2 * P))  # the gathered sequence, in global order
    blocks = cover(b.elements(mine, everything))

    def gather(g: int) -> str | None:
        return b.post(
            f"kv@{g}",
            g,
            [
                AllGather(
                    Rows.whole("kv", mine, HeadPart(g, G)),
                    Rows.whole(f"kv_all{g % 2}", everything),
                    placement,
                    GATHER_LANE,
                )
            ],
        )

    gathers = {0: gather(0)}
    scatters: dict[int, str | None] = {}
    for g in range(G):
        if g + 1 < G:
            gathers[g + 1] = gather(g + 1)
        b.wait(gathers.pop(g), g)
        if backward and g >= 2:  # dkv_all{g%2} is still being scattered for group g-2
            b.wait(scatters.pop(g - 2), g)
        if backward:  # every group writes the same cells; the rest stay zero
            b.reset(f"dkv_all{g % 2}")
        b.compute(
            blocks,
            q=("q", mine),
            kv=(f"kv_all{g % 2}", everything),
            q_out="acc",
            kv_out=f"dkv_all{g % 2}" if backward else None,
            step=g,
            q_owner=r,
            kv_owner=None,
            q_part=HeadPart(g, G),
        )
        if backward:
            scatters[g] = b.post(
                f"dkv@{g}",
                g,
                [
                    ReduceScatter(
                        Rows.whole(f"dkv_all{g % 2}", everything),
                        Rows.whole("dkv", mine, HeadPart(g, G)),
                        placement,
                        SCATTER_LANE,
                    )
                ],
            )
    for g in sorted(scatters):
        b.wait(scatters[g], G)
    return b.build("acc", kv_res)


class AllGatherKV(StrategyDef):
    name = Strategy.ALLGATHER
    summary = (
        "All-gather K, V: every rank gathers the whole sequence's keys and values (in head "
        "groups, overlapping compute) and attends its own queries; dk, dv reduce-scatter back."
    )

    def schedule(self, key: ScheduleKey) -> Schedule:
        return allgather_schedule(key)

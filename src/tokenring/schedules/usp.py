"""USP: Ulysses inside a group x TokenRing (or ring) across groups, on a 2-D mesh.

The mesh has a ``ring`` axis of R members and a ``ulysses`` axis of U. Rank
(r, u) holds two pieces of the sequence (``layouts.mesh_pieces``); its Ulysses
group (fixed r) holds *ring shard* r, 2U pieces. An all-to-all over the
Ulysses axis gives each member the whole ring shard for its 1/U of the heads;
TokenRing (or ring) then runs across the ring axis on those ring shards, as it
would on a group of R ranks with shards of 2U pieces (zigzag routing, the
streamed last step and all: ``ring_axis.RingAxis``); an all-to-all back returns
each rank its own tokens with every head. This is the unified sequence
parallelism the original TokenRing work was integrated into (xDiT), here
forward and backward, with TokenRing's separate lanes for queries and
partial results on the ring axis. With U = 1 it is the ring strategy alone,
with R = 1 Ulysses alone. See docs/algorithms.md, "USP".
"""

from __future__ import annotations

from dataclasses import replace

from ..options import Pass, Strategy
from .base import StrategyDef
from .builder import ScheduleBuilder
from .geometry import mesh_pieces
from .ir import Precision, Schedule, SlotKind, SlotSpec
from .key import ScheduleKey
from .ring import emit_ring, ring_slots
from .ring_axis import RingAxis
from .tokenring import emit_tokenring, tokenring_slots
from .ulysses import Ulysses, UlyssesAxis, emit_to_heads, emit_to_seq

__all__ = ["RING_AXIS", "ULYSSES_AXIS", "USP", "mesh_axes", "usp_axes", "usp_schedule"]

RING_AXIS = "ring"
ULYSSES_AXIS = "ulysses"


def _emit_tokenring(b, ring, backward, key: ScheduleKey):
    return emit_tokenring(b, ring, backward, key.stream_tail)


def _emit_ring(b, ring, backward, key: ScheduleKey):
    return emit_ring(b, ring, backward)


_RINGS = {
    Strategy.TOKENRING: (tokenring_slots, _emit_tokenring),
    Strategy.RING: (ring_slots, _emit_ring),
}


def mesh_axes(ring: int, ulysses: int) -> dict[str, list[tuple[int, ...]]]:
    """The groups of each axis over logical ranks ``r * ulysses + u`` (how ``usp``
    schedules number ranks): a ring group per ``u``, a Ulysses group per ``r``."""
    return {
        RING_AXIS: [tuple(r * ulysses + u for r in range(ring)) for u in range(ulysses)],
        ULYSSES_AXIS: [tuple(r * ulysses + u for u in range(ulysses)) for r in range(ring)],
    }


def usp_axes(key: ScheduleKey) -> tuple[UlyssesAxis, RingAxis]:
    """This rank's Ulysses axis and the ring its Ulysses group is a member of."""
    U = key.ulysses
    R = key.world // U
    r, u = divmod(key.rank, U)

    def pieces(rr: int, uu: int) -> tuple[int, int]:
        return mesh_pieces(key.layout, R, U, rr, uu)

    ring_shards = tuple(
        tuple(sorted(p for uu in range(U) for p in pieces(rr, uu))) for rr in range(R)
    )
    mine = ring_shards[r]
    placement = tuple(tuple(mine.index(p) for p in pieces(r, uu)) for uu in range(U))
    ua = UlyssesAxis(ULYSSES_AXIS, U, u, placement, mine, key.heads_kv)
    if U == 1:  # no resharding: the ring runs on the caller's own slots
        return ua, RingAxis(RING_AXIS, R, r, ring_shards)
    ring = RingAxis(RING_AXIS, R, r, ring_shards, U, ua.kv_parts, q="q_heads", kv="kv_heads")
    return ua, ring


def usp_schedule(key: ScheduleKey) -> Schedule:
    """The USP schedule of one rank for one pass."""
    backward = key.pass_ is Pass.BACKWARD
    ua, ring = usp_axes(key)
    slots_of, emit = _RINGS[key.ring_impl]
    U = key.ulysses
    r, u = divmod(key.rank, U)
    slots = {
        "q": SlotSpec(SlotKind.QUERY, local=True),
        "kv": SlotSpec(SlotKind.KV, local=True),
        **slots_of(ring, backward),
    }
    if U > 1:
        slots["q_heads"] = ua.gathered_slot(SlotKind.QUERY)
        slots["kv_heads"] = ua.gathered_slot(SlotKind.KV)
        slots["res"] = SlotSpec(SlotKind.QUERY_RESULT)
        if backward:  # summed over the ranks that share a replicated head: fp32
            precision = Precision.ACCUM if ua.replicated else Precision.WIRE
            slots["kvres"] = SlotSpec(SlotKind.KV_RESULT, precision)
    pieces = mesh_pieces(key.layout, key.world // U, U, r, u)
    b = ScheduleBuilder("usp", key.rank, key.world, pieces, slots, key.geometry, key.mask)
    if U == 1:
        return b.build(*emit(b, ring, backward, key))
    emit_to_heads(b, ua, "q", "kv", 0)
    res, kvres = emit(b, ring, backward, key)
    emit_to_seq(b, ua, res, kvres, ring.world + 1)
    return b.build("res", "kvres" if backward else None)


class USP(StrategyDef):
    name = Strategy.USP
    summary = (
        "USP: Ulysses over the mesh's 'ulysses' axis, TokenRing (or ring) over its 'ring' "
        "axis; every rank ends with its own tokens for every head."
    )

    def not_supported_reasons(self, key: ScheduleKey) -> list[str]:
        return Ulysses().not_supported_reasons(replace(key, world=key.ulysses))

    def schedule(self, key: ScheduleKey) -> Schedule:
        return usp_schedule(key)

"""Ring attention (pass-KV), the baseline: keys and values travel, queries stay.

At step s rank r holds the K, V shard of rank r-s, received one hop "up" the
ring (r-1 -> r), and accumulates into its own output. In the backward pass
the dk, dv accumulator of each K, V shard travels one hop behind it and
arrives home after a full turn (as in ring-flash-attention). Only the rows
some later visitor needs are forwarded, and with the zigzag layout each
block computes only the half of the square the mask allows. It runs over a
``RingAxis``: the caller's group, or the ring axis of the Ulysses x ring
hybrid (``usp.py``). See docs/algorithms.md, "Ring".
"""

from __future__ import annotations

from functools import lru_cache

from ..options import Pass, Strategy
from .base import StrategyDef
from .blocks import cover, still_needed_spans
from .builder import ScheduleBuilder
from .geometry import Geometry
from .ir import Precision, Rows, Schedule, SlotKind, SlotSpec, Transfer
from .key import ScheduleKey
from .masks import Mask
from .ring_axis import RingAxis

__all__ = ["Ring", "emit_ring", "ring_schedule", "ring_slots"]

KV_LANE = 0  # keys and values travel r-1 -> r
GRAD_LANE = 1  # dk, dv accumulators travel r-1 -> r (backward)


def ring_slots(ring: RingAxis, backward: bool) -> dict[str, SlotSpec]:
    """The buffers ring attention adds to the ring's query and key/value slots."""
    slots = {
        "acc": ring.slot(SlotKind.QUERY_RESULT, Precision.ACCUM),
        "kv_in0": ring.slot(SlotKind.KV),
        "kv_in1": ring.slot(SlotKind.KV),
    }
    if backward:
        slots["dkv0"] = ring.slot(SlotKind.KV_RESULT, Precision.ACCUM)
        slots["dkv1"] = ring.slot(SlotKind.KV_RESULT, Precision.ACCUM)
        slots["dkv_block"] = ring.slot(SlotKind.KV_RESULT)
    return slots


@lru_cache(maxsize=2048)
def kv_still_needed(
    geometry: Geometry, mask: Mask, shards: tuple[tuple[int, ...], ...], owner: int
) -> tuple[tuple[int, int], ...]:
    """Per step, the key rows of shard ``owner`` needed by the ranks it visits from that
    step on (the same for every rank of the ring, so computed once per owner: building
    all P schedules costs O(P^2) relations, not O(P^3))."""
    return still_needed_spans(geometry, mask, shards, owner, False, 1)


def _runs(cells: list[int]) -> list[tuple[int, int]]:
    """Sorted cell indices as runs of consecutive cells ``[start, stop)``."""
    runs: list[tuple[int, int]] = []
    for c in cells:
        if runs and runs[-1][1] == c:
            runs[-1] = (runs[-1][0], c + 1)
        else:
            runs.append((c, c + 1))
    return runs


def emit_ring(b: ScheduleBuilder, ring: RingAxis, backward: bool) -> tuple[str, str | None]:
    """Emit one ring pass over ``ring`` (its slots from ``ring_slots``); returns the query
    result slot and, backward, the key/value result slot."""
    P, r, cells = ring.world, ring.rank, ring.cells

    def needed(kv_owner: int):
        return b.elements(ring.pieces, ring.shards[kv_owner])

    def travelling_rows(owner: int, step: int) -> tuple[int, int]:
        """Key rows of KV_owner needed by the rank it visits at ``step`` or later."""
        return kv_still_needed(b.geometry, b.mask, ring.shards, owner)[step]

    def move(
        slot: str, owner: int, rows: tuple[int, int], peer: int, send: bool, lane: int
    ) -> Transfer:
        """Rows of a slot holding ``owner``'s keys/values, sent to or received from ``peer``."""
        return Transfer(Rows(slot, ring.shards[owner], *rows), peer, send, lane, ring.axis)

    def kv_transfers(step: int, send_slot: str) -> list[Transfer]:
        if step >= P:
            return []
        sent_owner, recv_owner = ring.peer(-(step - 1)), ring.peer(-step)
        return [
            move(send_slot, sent_owner, travelling_rows(sent_owner, step), ring.peer(1), True,
                 KV_LANE),
            move(f"kv_in{step % 2}", recv_owner, travelling_rows(recv_owner, step),
                 ring.peer(-1), False, KV_LANE),
        ]  # fmt: skip

    def grad_transfers(step: int) -> list[Transfer]:
        """Pass the dk, dv accumulator of the shard held at ``step - 1`` on by one hop."""
        sent_owner, recv_owner = ring.peer(-(step - 1)), ring.peer(-step)
        return [
            move(f"dkv{(step - 1) % 2}", sent_owner, (0, cells), ring.peer(1), True, GRAD_LANE),
            move(f"dkv{step % 2}", recv_owner, (0, cells), ring.peer(-1), False, GRAD_LANE),
        ]

    def visit(step: int, owner: int, kv_slot: str, kv_out: str | None) -> None:
        b.compute(
            cover(needed(owner)),
            q=(ring.q, ring.pieces),
            kv=(kv_slot, ring.shards[owner]),
            q_out="acc",
            kv_out=kv_out,
            step=step,
            q_owner=r,
            kv_owner=owner,
        )

    # where no rank needs another's keys (documents that each lie on one rank), the dk, dv
    # accumulators stay home: each holds its own shard's gradient after step 0
    crossing = any(travelling_rows(owner, 1) != (0, 0) for owner in range(P))
    grads_travel = backward and P > 1 and crossing
    kv_wait = b.post("kv@1", 0, kv_transfers(1, ring.kv))
    visit(0, r, ring.kv, "dkv0" if backward else None)
    grad_wait = b.post("dkv@1", 0, grad_transfers(1)) if grads_travel else None

    for t in range(1, P):
        owner = ring.peer(-t)
        b.wait(kv_wait, t)
        kv_wait = b.post(f"kv@{t + 1}", t, kv_transfers(t + 1, f"kv_in{t % 2}"))
        if backward:
            b.reset("dkv_block")
        visit(t, owner, f"kv_in{t % 2}", "dkv_block" if backward else None)
        if grads_travel:
            b.wait(grad_wait, t)
            held = ring.shards[owner]
            for k0, k1 in _runs(sorted({j for _, j, _ in needed(owner)})):
                b.merge(Rows("dkv_block", held, k0, k1), Rows(f"dkv{t % 2}", held, k0, k1), t)
            grad_wait = b.post(f"dkv@{t + 1}", t, grad_transfers(t + 1))
    if grads_travel:
        b.wait(grad_wait, P)
    home = f"dkv{P % 2}" if grads_travel else "dkv0"  # where the full turn ends
    return "acc", home if backward else None


def ring_schedule(key: ScheduleKey) -> Schedule:
    """The ring schedule of one rank for one pass."""
    ring = RingAxis.of_group(key)
    backward = key.pass_ is Pass.BACKWARD
    slots = {
        "q": SlotSpec(SlotKind.QUERY, local=True),
        "kv": SlotSpec(SlotKind.KV, local=True),
        **ring_slots(ring, backward),
    }
    b = ScheduleBuilder("ring", key.rank, key.world, ring.pieces, slots, key.geometry, key.mask)
    return b.build(*emit_ring(b, ring, backward))


class Ring(StrategyDef):
    name = Strategy.RING
    summary = "Ring attention (pass-KV), the baseline: K and V travel, Q stays."

    def schedule(self, key: ScheduleKey) -> Schedule:
        return ring_schedule(key)

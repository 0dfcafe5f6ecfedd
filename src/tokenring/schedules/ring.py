"""Ring attention (pass-KV), the baseline: keys and values travel, queries stay.

At step s rank r holds the K, V shard of rank r-s, received one hop "up" the
ring (r-1 -> r), and accumulates into its own output. In the backward pass
the dk, dv accumulator of each K, V shard travels one hop behind it and
arrives home after a full turn (as in ring-flash-attention). Only the rows
some later visitor needs are forwarded, and with the zigzag layout each
block computes only the half of the square the mask allows.
See docs/algorithms.md, "Ring".
"""

from __future__ import annotations

from ..layouts import chunk_ids
from ..options import Pass, Strategy
from .base import StrategyDef
from .blocks import cover, relations
from .builder import ScheduleBuilder
from .ir import Precision, Rows, Schedule, SlotKind, SlotSpec, Transfer
from .key import ScheduleKey

__all__ = ["Ring", "ring_schedule"]

KV_LANE = 0  # keys and values travel r-1 -> r
GRAD_LANE = 1  # dk, dv accumulators travel r-1 -> r (backward)


def ring_schedule(key: ScheduleKey) -> Schedule:
    """The ring schedule of one rank for one pass."""
    P, r, causal = key.world, key.rank, key.causal
    backward = key.pass_ is Pass.BACKWARD
    slots = {
        "q": SlotSpec(SlotKind.QUERY, local=True),
        "kv": SlotSpec(SlotKind.KV, local=True),
        "acc": SlotSpec(SlotKind.QUERY_RESULT, Precision.ACCUM),
        "kv_in0": SlotSpec(SlotKind.KV),
        "kv_in1": SlotSpec(SlotKind.KV),
    }
    if backward:
        slots["dkv0"] = SlotSpec(SlotKind.KV_RESULT, Precision.ACCUM)
        slots["dkv1"] = SlotSpec(SlotKind.KV_RESULT, Precision.ACCUM)
        slots["dkv_block"] = SlotSpec(SlotKind.KV_RESULT)
    b = ScheduleBuilder("ring", r, P, chunk_ids(key.layout, P, r), slots)

    def pieces(rank: int) -> tuple[int, ...]:
        return chunk_ids(key.layout, P, rank)

    def needed(kv_owner: int):
        return relations(pieces(r), pieces(kv_owner), causal)

    def travelling_rows(owner: int, step: int) -> tuple[int, int]:
        """Key rows of KV_owner needed by the rank it visits at ``step`` or later."""
        rows = sorted(
            {
                j
                for s in range(step, P)
                for _, j, _ in relations(pieces((owner + s) % P), pieces(owner), causal)
            }
        )
        return (rows[0], rows[-1] + 1) if rows else (0, 0)

    def kv_transfers(step: int, send_slot: str) -> list[Transfer]:
        if step >= P:
            return []
        sent_owner, recv_owner = b.peer(-(step - 1)), b.peer(-step)
        s0, s1 = travelling_rows(sent_owner, step)
        r0, r1 = travelling_rows(recv_owner, step)
        return [
            Transfer(Rows(send_slot, s0, s1), b.peer(1), send=True, lane=KV_LANE),
            Transfer(Rows(f"kv_in{step % 2}", r0, r1), b.peer(-1), send=False, lane=KV_LANE),
        ]

    def grad_transfers(step: int) -> list[Transfer]:
        """Pass the dk, dv accumulator of the shard held at ``step - 1`` on by one hop."""
        return [
            Transfer(Rows(f"dkv{(step - 1) % 2}"), b.peer(1), send=True, lane=GRAD_LANE),
            Transfer(Rows(f"dkv{step % 2}"), b.peer(-1), send=False, lane=GRAD_LANE),
        ]

    kv_wait = b.post("kv@1", 0, kv_transfers(1, "kv"))
    b.own_block(causal, q_out="acc", kv_out="dkv0" if backward else None)
    grad_wait = b.post("dkv@1", 0, grad_transfers(1)) if backward and P > 1 else None

    for t in range(1, P):
        owner = b.peer(-t)
        b.wait(kv_wait, t)
        kv_wait = b.post(f"kv@{t + 1}", t, kv_transfers(t + 1, f"kv_in{t % 2}"))
        if backward:
            b.reset("dkv_block")
        b.compute(
            cover(needed(owner)),
            q_slot="q",
            kv_slot=f"kv_in{t % 2}",
            q_out="acc",
            kv_out="dkv_block" if backward else None,
            step=t,
            q_owner=r,
            kv_owner=owner,
        )
        if backward:
            b.wait(grad_wait, t)
            touched = sorted({j for _, j, _ in needed(owner)})
            if touched:
                k0, k1 = touched[0], touched[-1] + 1
                b.merge(Rows("dkv_block", k0, k1), Rows(f"dkv{t % 2}", k0, k1), t)
            grad_wait = b.post(f"dkv@{t + 1}", t, grad_transfers(t + 1))
    if backward and P > 1:
        b.wait(grad_wait, P)
    home = "dkv0" if P == 1 else f"dkv{P % 2}"  # where the full turn ends
    return b.build("acc", home if backward else None)


class Ring(StrategyDef):
    name = Strategy.RING
    summary = "Ring attention (pass-KV), the baseline: K and V travel, Q stays."

    def schedule(self, key: ScheduleKey) -> Schedule:
        return ring_schedule(key)

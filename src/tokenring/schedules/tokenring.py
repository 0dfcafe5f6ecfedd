"""TokenRing (pass-Q): queries travel, keys and values never move.

At step s the query shard of rank j = r+s sits on rank r, having arrived one
hop "down" the ring (r+1 -> r). Rank r attends it to its own K, V and sends
the partial result straight back to j on the second lane, one step later,
while the next block computes. Queries visit the ranks below their owner
first, so with the zigzag layout every later visitor needs only the second
half of Q and only that half is forwarded. Part of the local (diagonal)
block is computed last, hiding the return of the final partial.

The backward pass is the same schedule: the query bundle (q, do, lse, delta)
travels, dq partials return to their owner, dk and dv accumulate where K and
V live. See docs/algorithms.md, "TokenRing".
"""

from __future__ import annotations

from ..options import Layout, Pass
from .blocks import Element, Rel, cover, relations
from .builder import ScheduleBuilder
from .ir import Precision, Rows, Schedule, SlotKind, SlotSpec, Transfer

__all__ = ["tokenring_schedule"]

Q_LANE = 0  # queries travel r+1 -> r
RESULT_LANE = 1  # partial results travel visitor -> owner


def _span(elements: list[Element]) -> tuple[int, int]:
    """Query sub-chunk range used by ``elements`` (empty range if none)."""
    if not elements:
        return (0, 0)
    rows = sorted({i for i, _, _ in elements})
    if rows != list(range(rows[0], rows[-1] + 1)):
        raise AssertionError("schedule bug: non-contiguous query rows")
    return (rows[0], rows[-1] + 1)


def _split_diagonal(elements: list[Element], world: int) -> tuple[list[Element], list[Element]]:
    """Split the local block into the part computed first and the part kept for the tail.

    The tail covers the last query sub-chunk's diagonal (causal) or last key
    sub-chunk (non-causal): compute that hides the final partial's return.
    """
    if world == 1:
        return elements, []
    if any(rel is Rel.DIAG for _, _, rel in elements):
        late = [e for e in elements if e[2] is Rel.DIAG and e[0] == 1]
    else:
        late = [e for e in elements if e[1] == 1]
    early = [e for e in elements if e not in late]
    return early, late


def tokenring_schedule(
    layout: Layout, world: int, rank: int, causal: bool, pass_: Pass
) -> Schedule:
    """The TokenRing schedule of ``rank`` for one pass (forward and backward share it)."""
    P, r = world, rank
    backward = pass_ is Pass.BACKWARD
    slots = {
        "q": SlotSpec(SlotKind.QUERY, local=True),
        "kv": SlotSpec(SlotKind.KV, local=True),
        "acc": SlotSpec(SlotKind.QUERY_RESULT, Precision.ACCUM),
        "q_in0": SlotSpec(SlotKind.QUERY),
        "q_in1": SlotSpec(SlotKind.QUERY),
        "part0": SlotSpec(SlotKind.QUERY_RESULT),
        "part1": SlotSpec(SlotKind.QUERY_RESULT),
        "part_in0": SlotSpec(SlotKind.QUERY_RESULT),
        "part_in1": SlotSpec(SlotKind.QUERY_RESULT),
    }
    if backward:
        slots["kvacc"] = SlotSpec(SlotKind.KV_RESULT, Precision.ACCUM)
    kv_out = "kvacc" if backward else None
    b = ScheduleBuilder("tokenring", r, P, slots)

    def needed(owner: int, visitor: int) -> list[Element]:
        return relations(layout, P, owner, visitor, causal)

    def travelling_rows(owner: int, step: int) -> tuple[int, int]:
        """Rows of Q_owner that must reach the rank it visits at ``step``: what that
        rank and every later visitor needs."""
        lo, hi = 2, 0
        for s in range(step, P):
            a, z = _span(needed(owner, (owner - s) % P))
            if z > a:
                lo, hi = min(lo, a), max(hi, z)
        return (lo, hi) if hi > lo else (0, 0)

    def q_transfers(step: int, send_slot: str) -> list[Transfer]:
        """Forward the Q held at ``step - 1`` down one hop; receive the one for ``step``."""
        if step >= P:
            return []
        sent_owner, recv_owner = b.peer(step - 1), b.peer(step)
        s0, s1 = travelling_rows(sent_owner, step)
        r0, r1 = travelling_rows(recv_owner, step)
        return [
            Transfer(Rows(send_slot, s0, s1), b.peer(-1), send=True, lane=Q_LANE),
            Transfer(Rows(f"q_in{step % 2}", r0, r1), b.peer(1), send=False, lane=Q_LANE),
        ]

    def result_transfers(step: int) -> list[Transfer]:
        """Return the partial computed at ``step`` to its owner; receive mine from ``step``."""
        out_owner, in_visitor = b.peer(step), b.peer(-step)
        o0, o1 = _span(needed(out_owner, r))
        i0, i1 = _span(needed(r, in_visitor))
        return [
            Transfer(Rows(f"part{step % 2}", o0, o1), out_owner, send=True, lane=RESULT_LANE),
            Transfer(Rows(f"part_in{step % 2}", i0, i1), in_visitor, send=False, lane=RESULT_LANE),
        ]

    def merge_partial(step: int, at_step: int) -> None:
        i0, i1 = _span(needed(r, b.peer(-step)))
        b.merge(Rows(f"part_in{step % 2}", i0, i1), Rows("acc", i0, i1), at_step)

    early, late = _split_diagonal(needed(r, r), P)
    q_wait = b.post("q@1", 0, q_transfers(1, "q"))
    b.compute(
        cover(early),
        q_slot="q",
        kv_slot="kv",
        q_out="acc",
        kv_out=kv_out,
        step=0,
        q_owner=r,
        kv_owner=r,
    )

    result_wait: dict[int, str | None] = {}
    for t in range(1, P):
        b.wait(q_wait, t)
        q_wait = b.post(f"q@{t + 1}", t, q_transfers(t + 1, f"q_in{t % 2}"))
        if t >= 2:
            result_wait[t] = b.post(f"part@{t}", t, result_transfers(t - 1))
        if t >= 3:  # frees part{t%2} for this step's compute and delivers step t-2's partial
            b.wait(result_wait.pop(t - 1), t)
            merge_partial(t - 2, t)
        owner = b.peer(t)
        b.reset(f"part{t % 2}")
        b.compute(
            cover(needed(owner, r)),
            q_slot=f"q_in{t % 2}",
            kv_slot="kv",
            q_out=f"part{t % 2}",
            kv_out=kv_out,
            step=t,
            q_owner=owner,
            kv_owner=r,
        )

    tail = P
    if P >= 2:
        result_wait[tail] = b.post(f"part@{tail}", tail, result_transfers(P - 1))
    if P >= 3:
        b.wait(result_wait.pop(P - 1), tail)
        merge_partial(P - 2, tail)
    b.compute(
        cover(late),
        q_slot="q",
        kv_slot="kv",
        q_out="acc",
        kv_out=kv_out,
        step=tail,
        q_owner=r,
        kv_owner=r,
    )
    if P >= 2:
        b.wait(result_wait.pop(tail), tail)
        merge_partial(P - 1, tail)
    return b.build("acc", kv_out)

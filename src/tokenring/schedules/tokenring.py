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
from .blocks import Element, cover, relations
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


def _pieces(span: tuple[int, int]) -> list[tuple[int, int]]:
    """The query sub-chunks of ``span``: the pieces the last step's result is sent in."""
    return [(i, i + 1) for i in range(*span)]


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

    def result_transfers(step: int, out_rows=None, in_rows=None) -> list[Transfer]:
        """Return (rows of) the partial computed at ``step`` to its owner; receive
        (rows of) mine from the rank that computed it."""
        out_owner, in_visitor = b.peer(step), b.peer(-step)
        o0, o1 = out_rows or _span(needed(out_owner, r))
        i0, i1 = in_rows or _span(needed(r, in_visitor))
        return [
            Transfer(Rows(f"part{step % 2}", o0, o1), out_owner, send=True, lane=RESULT_LANE),
            Transfer(Rows(f"part_in{step % 2}", i0, i1), in_visitor, send=False, lane=RESULT_LANE),
        ]

    def merge_partial(step: int, at_step: int, rows=None) -> None:
        i0, i1 = rows or _span(needed(r, b.peer(-step)))
        b.merge(Rows(f"part_in{step % 2}", i0, i1), Rows("acc", i0, i1), at_step)

    # Step 0: the whole local block, one call, while Q leaves.
    q_wait = b.post("q@1", 0, q_transfers(1, "q"))
    b.compute(
        cover(needed(r, r)),
        q_slot="q",
        kv_slot="kv",
        q_out="acc",
        kv_out=kv_out,
        step=0,
        q_owner=r,
        kv_owner=r,
    )

    last = P - 1
    result_wait: dict[int, str | None] = {}
    early_wait: str | None = None
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
        mine = needed(owner, r)

        def visit(elements, t=t, owner=owner):
            b.compute(
                cover(elements),
                q_slot=f"q_in{t % 2}",
                kv_slot="kv",
                q_out=f"part{t % 2}",
                kv_out=kv_out,
                step=t,
                q_owner=owner,
                kv_owner=r,
            )

        if t < last:
            visit(mine)
            continue
        # The last remote step streams its result back one query sub-chunk at a time:
        # the first piece travels while the second computes, so only the last piece's
        # return is left after the final block (the tail). The first piece's send and
        # the receive of my own first piece go in one group, posted on every rank at
        # the same point (after its first piece): NCCL runs a lane's groups in order,
        # and a receive-only group queued ahead of a send the peer waits for would
        # deadlock (test_schedules checks this with NCCL's ordering).
        out_pieces = _pieces(_span(mine))
        in_pieces = _pieces(_span(needed(r, b.peer(-t))))
        for n, (a, z) in enumerate(out_pieces or [(0, 0)]):
            visit([e for e in mine if a <= e[0] < z])
            if n == 0:
                early = [
                    Transfer(Rows(f"part{t % 2}", a0, z0), owner, send=True, lane=RESULT_LANE)
                    for a0, z0 in out_pieces[:-1]
                ] + [
                    Transfer(
                        Rows(f"part_in{t % 2}", a0, z0), b.peer(-t), send=False, lane=RESULT_LANE
                    )
                    for a0, z0 in in_pieces[:-1]
                ]
                early_wait = b.post(f"part@{t}.early", t, early)

    tail = P
    if P >= 2:
        out_last = _pieces(_span(needed(b.peer(last), r)))[-1:] or [(0, 0)]
        in_last = _pieces(_span(needed(r, b.peer(-last))))[-1:] or [(0, 0)]
        result_wait[tail] = b.post(
            f"part@{tail}", tail, result_transfers(last, out_last[0], in_last[0])
        )
    if P >= 3:
        b.wait(result_wait.pop(last), tail)
        merge_partial(last - 1, tail)
    if P >= 2:
        b.wait(early_wait, tail)
        for a, z in _pieces(_span(needed(r, b.peer(-last))))[:-1]:
            merge_partial(last, tail, (a, z))
        b.wait(result_wait.pop(tail), tail)
        merge_partial(last, tail, in_last[0])
    return b.build("acc", kv_out)

"""TokenRing (pass-Q): queries travel, keys and values never move.

At step s the query shard of rank j = r+s sits on rank r, having arrived one
hop "down" the ring (r+1 -> r). Rank r attends it to its own K, V and sends
the partial result straight back to j on the second lane, one step later,
while the next block computes. Queries visit the ranks below their owner
first, so with the zigzag layout every later visitor needs only the second
half of Q and only that half is forwarded.

The schedule is built in two stages: ``plan_visits`` computes, as values,
what each step does (whose queries, which pairs, which rows travel and
return); ``tokenring_schedule`` then emits operations from that plan. The
optimisation that hides the tail, streaming the last step's result back half
a shard at a time, is a step of its own (``_streamed_last_visit``).

The backward pass is the same schedule: the query bundle (q, do, lse, delta)
travels, dq partials return to their owner, dk and dv accumulate where K and
V live. See docs/algorithms.md, "TokenRing".
"""

from __future__ import annotations

from dataclasses import dataclass

from ..layouts import chunk_ids
from ..options import Pass, Strategy
from .base import StrategyDef
from .blocks import Element, cover, relations
from .builder import ScheduleBuilder
from .ir import Precision, Rows, Schedule, SlotKind, SlotSpec, Transfer
from .key import ScheduleKey

__all__ = ["TokenRing", "Visit", "plan_visits", "tokenring_schedule"]

Q_LANE = 0  # queries travel r+1 -> r
RESULT_LANE = 1  # partial results travel visitor -> owner

Span = tuple[int, int]  # cells [start, stop)
EMPTY: Span = (0, 0)


def _span(elements: list[Element] | tuple[Element, ...]) -> Span:
    """Query cells used by ``elements`` (empty if none)."""
    if not elements:
        return EMPTY
    rows = sorted({i for i, _, _ in elements})
    if rows != list(range(rows[0], rows[-1] + 1)):
        raise AssertionError("schedule bug: non-contiguous query rows")
    return (rows[0], rows[-1] + 1)


def _union(spans: list[Span]) -> Span:
    spans = [s for s in spans if s[1] > s[0]]
    if not spans:
        return EMPTY
    return (min(a for a, _ in spans), max(z for _, z in spans))


def _halves(span: Span, cells: int) -> tuple[Span, ...]:
    """``span`` cut at the middle of the shard: the pieces the last result streams in."""
    half = cells // 2
    cut = [(max(span[0], a), min(span[1], z)) for a, z in ((0, half), (half, cells))]
    return tuple(p for p in cut if p[1] > p[0])


@dataclass(frozen=True)
class Visit:
    """What this rank does with the query shard it holds at ``step``.

    ``elements``: the (query cell, key cell) pairs the mask allows between the
    visiting queries and this rank's keys; ``arrives``: the query rows received
    for this step; ``forward``: the rows passed on for the next step (what
    every later visitor needs); ``result``: the rows of the partial returned to
    ``owner``; ``home``: the rows of this rank's own partial computed at this
    step by rank ``visitor`` and returned here.
    """

    step: int
    owner: int
    visitor: int
    elements: tuple[Element, ...]
    arrives: Span
    forward: Span
    result: Span
    home: Span


def plan_visits(key: ScheduleKey) -> list[Visit]:
    """Step by step, which queries meet this rank's keys and what moves (step 0: its own)."""
    P, r = key.world, key.rank

    def pieces(rank: int) -> tuple[int, ...]:
        return chunk_ids(key.layout, P, rank)

    def needed(owner: int, visitor: int) -> tuple[Element, ...]:
        return tuple(relations(pieces(owner), pieces(visitor), key.causal))

    def travelling(owner: int, step: int) -> Span:
        """Rows of Q_owner that must reach the rank it visits at ``step``: what that
        rank and every later visitor needs."""
        return _union([_span(needed(owner, (owner - s) % P)) for s in range(step, P)])

    visits = []
    for t in range(P):
        owner, visitor = (r + t) % P, (r - t) % P
        visits.append(
            Visit(
                step=t,
                owner=owner,
                visitor=visitor,
                elements=needed(owner, r),
                arrives=travelling(owner, t) if t else EMPTY,
                forward=travelling(owner, t + 1) if t + 1 < P else EMPTY,
                result=_span(needed(owner, r)) if t else EMPTY,
                home=_span(needed(r, visitor)) if t else EMPTY,
            )
        )
    return visits


def _slots(backward: bool) -> dict[str, SlotSpec]:
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
    return slots


def _query_slot(step: int) -> str:
    return "q" if step == 0 else f"q_in{step % 2}"


def _rotate_queries(b: ScheduleBuilder, visits: list[Visit], step: int) -> str | None:
    """Post the move of queries for ``step``: pass the held ones down, receive the next."""
    if step >= len(visits):
        return None
    held, coming = visits[step - 1], visits[step]
    return b.post(
        f"q@{step}",
        step - 1,
        [
            Transfer(Rows(_query_slot(step - 1), *held.forward), b.peer(-1), True, Q_LANE),
            Transfer(Rows(_query_slot(step), *coming.arrives), b.peer(1), False, Q_LANE),
        ],
    )


def _send_partial(visit: Visit, rows: Span) -> Transfer:
    """Rows of the partial computed at ``visit``, sent to the queries' owner."""
    return Transfer(Rows(f"part{visit.step % 2}", *rows), visit.owner, True, RESULT_LANE)


def _receive_home(visit: Visit, rows: Span) -> Transfer:
    """Rows of this rank's own partial of ``visit``'s step, from the rank that computed it."""
    return Transfer(Rows(f"part_in{visit.step % 2}", *rows), visit.visitor, False, RESULT_LANE)


def _merge_home(b: ScheduleBuilder, visit: Visit, rows: Span, at_step: int) -> None:
    """Merge the returned rows of this rank's partial from ``visit`` into the accumulator."""
    b.merge(Rows(f"part_in{visit.step % 2}", *rows), Rows("acc", *rows), at_step)


def _compute(b: ScheduleBuilder, visit: Visit, elements, kv_out: str | None) -> None:
    local = visit.step == 0
    b.compute(
        cover(list(elements)),
        q_slot=_query_slot(visit.step),
        kv_slot="kv",
        q_out="acc" if local else f"part{visit.step % 2}",
        kv_out=kv_out,
        step=visit.step,
        q_owner=visit.owner,
        kv_owner=b.rank,
    )


def _streamed_last_visit(b: ScheduleBuilder, visit: Visit, kv_out: str | None) -> str | None:
    """The last remote step, computed and returned half a shard at a time: the first
    half travels home while the second computes, so only the second half's return is
    left after the final block (the hidden tail).

    The first half's send and the receive of this rank's own first half go in one
    group, posted on every rank at the same point (after its first half): NCCL runs
    a lane's groups in order, and a receive-only group queued ahead of a send the
    peer waits for would deadlock (``simulate.check_stream_order`` checks this).
    """
    cells = len(b.pieces)
    out_pieces, home_pieces = _halves(visit.result, cells), _halves(visit.home, cells)
    b.reset(f"part{visit.step % 2}")
    early = None
    for n, (a, z) in enumerate(out_pieces or (EMPTY,)):
        _compute(b, visit, [e for e in visit.elements if a <= e[0] < z], kv_out)
        if n == 0:
            moves = [_send_partial(visit, out) for out in out_pieces[:-1]]
            moves += [_receive_home(visit, home) for home in home_pieces[:-1]]
            early = b.post(f"part@{visit.step}.early", visit.step, moves)
    return early


def tokenring_schedule(key: ScheduleKey) -> Schedule:
    """The TokenRing schedule of one rank for one pass (forward and backward share it)."""
    P, r = key.world, key.rank
    backward = key.pass_ is Pass.BACKWARD
    kv_out = "kvacc" if backward else None
    b = ScheduleBuilder("tokenring", r, P, chunk_ids(key.layout, P, r), _slots(backward))
    visits = plan_visits(key)
    last = P - 1

    # Step 0: the whole local block, one call, while the queries leave.
    q_wait = _rotate_queries(b, visits, 1)
    _compute(b, visits[0], visits[0].elements, kv_out)

    returns: dict[int, str | None] = {}  # step whose partial travels -> handle
    early = None
    for t in range(1, P):
        b.wait(q_wait, t)
        q_wait = _rotate_queries(b, visits, t + 1)
        if t >= 2:  # the partial of step t-1 goes home
            prev = visits[t - 1]
            returns[t - 1] = b.post(
                f"part@{t}", t, [_send_partial(prev, prev.result), _receive_home(prev, prev.home)]
            )
        if t >= 3:  # frees part{t%2} for this step and delivers step t-2's partial
            b.wait(returns.pop(t - 2), t)
            _merge_home(b, visits[t - 2], visits[t - 2].home, t)
        if t < last:
            b.reset(f"part{t % 2}")
            _compute(b, visits[t], visits[t].elements, kv_out)
        else:
            early = _streamed_last_visit(b, visits[t], kv_out)

    # The tail: the second half of the last partial, and every partial still out.
    tail = P
    if P >= 2:
        final = visits[last]
        cells = len(b.pieces)
        out_last = _halves(final.result, cells)[-1:] or (EMPTY,)
        home_last = _halves(final.home, cells)[-1:] or (EMPTY,)
        returns[last] = b.post(
            f"part@{tail}",
            tail,
            [_send_partial(final, out_last[0]), _receive_home(final, home_last[0])],
        )
    if P >= 3:
        b.wait(returns.pop(last - 1), tail)
        _merge_home(b, visits[last - 1], visits[last - 1].home, tail)
    if P >= 2:
        b.wait(early, tail)
        for rows in _halves(visits[last].home, len(b.pieces))[:-1]:
            _merge_home(b, visits[last], rows, tail)
        b.wait(returns.pop(last), tail)
        _merge_home(b, visits[last], home_last[0], tail)
    return b.build("acc", kv_out)


class TokenRing(StrategyDef):
    name = Strategy.TOKENRING
    summary = (
        "TokenRing attention: Q travels around the ring, each partial output goes straight "
        "back to its owner on a second communicator, K and V never move."
    )

    def schedule(self, key: ScheduleKey) -> Schedule:
        return tokenring_schedule(key)

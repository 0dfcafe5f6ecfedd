"""TokenRing (pass-Q): queries travel, keys and values never move.

At step s the query shard of rank j = r+s sits on rank r, having arrived one
hop "down" the ring (r+1 -> r). Rank r attends it to its own K, V and sends
the partial result straight back to j on the second lane, one step later,
while the next block computes. Queries visit the ranks below their owner
first, so with the zigzag layout every later visitor needs only the second
half of Q and only that half is forwarded.

The schedule is built in two stages: ``plan_visits`` computes, as values,
what each step does (whose queries, which pairs, which rows travel and
return); the emitter then emits operations from that plan. The
optimisation that hides the tail, streaming the last step's result back half
a shard at a time, is a step of its own (``streamed_last_visit``). It runs
over a ``RingAxis``: the caller's group, or the ring axis of the Ulysses x
TokenRing hybrid (``usp.py``).

The backward pass is the same schedule: the query bundle (q, do, lse, delta)
travels, dq partials return to their owner, dk and dv accumulate where K and
V live. See docs/algorithms.md, "TokenRing".
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ..options import Pass, Strategy
from .base import StrategyDef
from .blocks import Element, cover, piece_relations, still_needed_spans
from .builder import ScheduleBuilder
from .geometry import Geometry
from .ir import Precision, Rows, Schedule, SlotKind, SlotSpec, Transfer
from .key import ScheduleKey
from .masks import Mask
from .ring_axis import RingAxis

__all__ = [
    "TokenRing",
    "Visit",
    "emit_tokenring",
    "plan_visits",
    "tokenring_schedule",
    "tokenring_slots",
]

Q_LANE = 0  # queries travel r+1 -> r
RESULT_LANE = 1  # partial results travel visitor -> owner

Span = tuple[int, int]  # cells [start, stop)
EMPTY: Span = (0, 0)


def _span(elements: list[Element] | tuple[Element, ...]) -> Span:
    """Query cells used by ``elements``, from the first to the last (empty if none; cells
    between them that no pair uses hold no tokens, or are sent along)."""
    if not elements:
        return EMPTY
    rows = [i for i, _, _ in elements]
    return (min(rows), max(rows) + 1)


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


def _meets(
    geometry: Geometry, mask: Mask, q_pieces: tuple[int, ...], kv_pieces: tuple[int, ...]
) -> tuple[Element, ...]:
    return piece_relations(geometry, mask, q_pieces, kv_pieces)


@lru_cache(maxsize=1 << 16)
def _query_span(
    geometry: Geometry, mask: Mask, q_pieces: tuple[int, ...], kv_pieces: tuple[int, ...]
) -> Span:
    """``_span`` of ``_meets`` (remembered: each pair of shards is asked once per rank)."""
    return _span(_meets(geometry, mask, q_pieces, kv_pieces))


@lru_cache(maxsize=2048)
def q_still_needed(
    geometry: Geometry, mask: Mask, shards: tuple[tuple[int, ...], ...], owner: int
) -> tuple[Span, ...]:
    """Per step, the rows of query shard ``owner`` that the ranks it visits from that
    step on need (the same for every rank of the ring, so computed once per owner:
    building all P schedules costs O(P^2) relations, not O(P^3))."""
    return still_needed_spans(geometry, mask, shards, owner, True, -1)


def plan_visits(ring: RingAxis, geometry: Geometry, mask: Mask) -> list[Visit]:
    """Step by step, which queries meet this rank's keys and what moves (step 0: its own)."""
    P, r = ring.world, ring.rank

    def needed(owner: int, visitor: int) -> tuple[Element, ...]:
        return _meets(geometry, mask, ring.shards[owner], ring.shards[visitor])

    def needed_span(owner: int, visitor: int) -> Span:
        return _query_span(geometry, mask, ring.shards[owner], ring.shards[visitor])

    def travelling(owner: int, step: int) -> Span:
        """Rows of Q_owner that must reach the rank it visits at ``step``: what that
        rank and every later visitor needs."""
        return q_still_needed(geometry, mask, ring.shards, owner)[step]

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
                result=needed_span(owner, r) if t else EMPTY,
                home=needed_span(r, visitor) if t else EMPTY,
            )
        )
    return visits


def tokenring_slots(ring: RingAxis, backward: bool) -> dict[str, SlotSpec]:
    """The buffers TokenRing adds to the ring's query and key/value slots."""
    slots = {
        "acc": ring.slot(SlotKind.QUERY_RESULT, Precision.ACCUM),
        "q_in0": ring.slot(SlotKind.QUERY),
        "q_in1": ring.slot(SlotKind.QUERY),
        "part0": ring.slot(SlotKind.QUERY_RESULT),
        "part1": ring.slot(SlotKind.QUERY_RESULT),
        "part_in0": ring.slot(SlotKind.QUERY_RESULT),
        "part_in1": ring.slot(SlotKind.QUERY_RESULT),
    }
    if backward:
        slots["kvacc"] = ring.slot(SlotKind.KV_RESULT, Precision.ACCUM)
    return slots


@dataclass(frozen=True)
class _Emitter:
    """Emits one TokenRing pass onto a builder (the ring's slot names and lanes)."""

    b: ScheduleBuilder
    ring: RingAxis
    kv_out: str | None
    stream: bool = True

    def pieces(self, span: Span) -> tuple[Span, ...]:
        """How the last step's result goes home: in halves when streaming, else whole."""
        if self.stream:
            return _halves(span, self.ring.cells)
        return (span,) if span[1] > span[0] else ()

    def query_slot(self, step: int) -> str:
        return self.ring.q if step == 0 else f"q_in{step % 2}"

    def shard(self, owner: int) -> tuple[int, ...]:
        return self.ring.shards[owner]

    def transfer(
        self, slot: str, owner: int, rows: Span, peer: int, send: bool, lane: int
    ) -> Transfer:
        """Rows of a slot holding ``owner``'s shard, sent to or received from ``peer``."""
        return Transfer(Rows(slot, self.shard(owner), *rows), peer, send, lane, self.ring.axis)

    def rotate_queries(self, visits: list[Visit], step: int) -> str | None:
        """Post the move of queries for ``step``: pass the held ones down, receive the next."""
        if step >= len(visits):
            return None
        held, coming = visits[step - 1], visits[step]
        ring = self.ring
        return self.b.post(
            f"q@{step}",
            step - 1,
            [
                self.transfer(
                    self.query_slot(step - 1), held.owner, held.forward, ring.peer(-1), True,
                    Q_LANE,
                ),
                self.transfer(
                    self.query_slot(step), coming.owner, coming.arrives, ring.peer(1), False,
                    Q_LANE,
                ),
            ],
        )  # fmt: skip

    def send_partial(self, visit: Visit, rows: Span) -> Transfer:
        """Rows of the partial computed at ``visit``, sent to the queries' owner."""
        slot = f"part{visit.step % 2}"
        return self.transfer(slot, visit.owner, rows, visit.owner, True, RESULT_LANE)

    def receive_home(self, visit: Visit, rows: Span) -> Transfer:
        """Rows of this rank's own partial of ``visit``'s step, from the rank that computed it."""
        slot = f"part_in{visit.step % 2}"
        return self.transfer(slot, self.ring.rank, rows, visit.visitor, False, RESULT_LANE)

    def merge_home(self, visit: Visit, rows: Span, at_step: int) -> None:
        """Merge the returned rows of this rank's partial from ``visit`` into the accumulator."""
        mine = self.shard(self.ring.rank)
        self.b.merge(
            Rows(f"part_in{visit.step % 2}", mine, *rows), Rows("acc", mine, *rows), at_step
        )

    def compute(self, visit: Visit, elements) -> None:
        local = visit.step == 0
        self.b.compute(
            cover(tuple(elements)),
            q=(self.query_slot(visit.step), self.shard(visit.owner)),
            kv=(self.ring.kv, self.shard(self.ring.rank)),
            q_out="acc" if local else f"part{visit.step % 2}",
            kv_out=self.kv_out,
            step=visit.step,
            q_owner=visit.owner,
            kv_owner=self.ring.rank,
        )

    def streamed_last_visit(self, visit: Visit) -> str | None:
        """The last remote step, computed and returned half a shard at a time: the first
        half travels home while the second computes, so only the second half's return
        is left after the final block (the hidden tail).

        The first half's send and the receive of this rank's own first half go in one
        group, posted on every rank at the same point (after its first half): NCCL runs
        a lane's groups in order, and a receive-only group queued ahead of a send the
        peer waits for would deadlock (``simulate.check_stream_order`` checks this).
        """
        out_pieces, home_pieces = self.pieces(visit.result), self.pieces(visit.home)
        self.b.reset(f"part{visit.step % 2}")
        early = None
        for n, (a, z) in enumerate(out_pieces or (EMPTY,)):
            self.compute(visit, [e for e in visit.elements if a <= e[0] < z])
            if n == 0:
                moves = [self.send_partial(visit, out) for out in out_pieces[:-1]]
                moves += [self.receive_home(visit, home) for home in home_pieces[:-1]]
                early = self.b.post(f"part@{visit.step}.early", visit.step, moves)
        return early

    def run(self) -> None:
        b, ring = self.b, self.ring
        P = ring.world
        visits = plan_visits(ring, b.geometry, b.mask)
        last = P - 1

        # Step 0: the whole local block, one call, while the queries leave.
        q_wait = self.rotate_queries(visits, 1)
        self.compute(visits[0], visits[0].elements)

        returns: dict[int, str | None] = {}  # step whose partial travels -> handle
        early = None
        for t in range(1, P):
            b.wait(q_wait, t)
            q_wait = self.rotate_queries(visits, t + 1)
            if t >= 2:  # the partial of step t-1 goes home
                prev = visits[t - 1]
                returns[t - 1] = b.post(
                    f"part@{t}",
                    t,
                    [self.send_partial(prev, prev.result), self.receive_home(prev, prev.home)],
                )
            if t >= 3:  # frees part{t%2} for this step and delivers step t-2's partial
                b.wait(returns.pop(t - 2), t)
                self.merge_home(visits[t - 2], visits[t - 2].home, t)
            if t < last:
                b.reset(f"part{t % 2}")
                self.compute(visits[t], visits[t].elements)
            else:
                early = self.streamed_last_visit(visits[t])

        # The tail: the second half of the last partial, and every partial still out.
        tail = P
        if P >= 2:
            final = visits[last]
            out_last = self.pieces(final.result)[-1:] or (EMPTY,)
            home_last = self.pieces(final.home)[-1:] or (EMPTY,)
            returns[last] = b.post(
                f"part@{tail}",
                tail,
                [self.send_partial(final, out_last[0]), self.receive_home(final, home_last[0])],
            )
        if P >= 3:
            b.wait(returns.pop(last - 1), tail)
            self.merge_home(visits[last - 1], visits[last - 1].home, tail)
        if P >= 2:
            b.wait(early, tail)
            for rows in self.pieces(visits[last].home)[:-1]:
                self.merge_home(visits[last], rows, tail)
            b.wait(returns.pop(last), tail)
            self.merge_home(visits[last], home_last[0], tail)


def emit_tokenring(
    b: ScheduleBuilder, ring: RingAxis, backward: bool, stream: bool = True
) -> tuple[str, str | None]:
    """Emit one TokenRing pass over ``ring`` (its slots from ``tokenring_slots``); returns
    the query result slot and, backward, the key/value result slot. ``stream``: return the
    last step's result in halves (the hidden tail), or whole (for blocks too small for
    the first half's return to hide behind the second half's compute)."""
    kv_out = "kvacc" if backward else None
    _Emitter(b, ring, kv_out, stream).run()
    return "acc", kv_out


def tokenring_schedule(key: ScheduleKey) -> Schedule:
    """The TokenRing schedule of one rank for one pass (forward and backward share it)."""
    ring = RingAxis.of_group(key)
    backward = key.pass_ is Pass.BACKWARD
    slots = {
        "q": SlotSpec(SlotKind.QUERY, local=True),
        "kv": SlotSpec(SlotKind.KV, local=True),
        **tokenring_slots(ring, backward),
    }
    b = ScheduleBuilder(
        "tokenring", key.rank, key.world, ring.pieces, slots, key.geometry, key.mask
    )
    return b.build(*emit_tokenring(b, ring, backward, key.stream_tail))


class TokenRing(StrategyDef):
    name = Strategy.TOKENRING
    summary = (
        "TokenRing attention: Q travels around the ring, each partial output goes straight "
        "back to its owner on a second communicator, K and V never move."
    )

    def schedule(self, key: ScheduleKey) -> Schedule:
        return tokenring_schedule(key)

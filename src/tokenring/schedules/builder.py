"""A small helper that schedule functions use to emit operations.

It tracks which cells (and head parts) of each result slot have been written
so that the first write overwrites (``fresh``) and later ones accumulate, and
it drops empty transfers, computes and merges so schedules can be written
without guards.
"""

from __future__ import annotations

from .blocks import Block, cover, relations
from .ir import (
    WHOLE,
    Compute,
    HeadPart,
    Merge,
    Move,
    Op,
    Post,
    Rows,
    Schedule,
    SlotSpec,
    Transfer,
    Wait,
)

__all__ = ["ScheduleBuilder"]


class ScheduleBuilder:
    def __init__(
        self,
        strategy: str,
        rank: int,
        world: int,
        pieces: tuple[int, ...],
        slots: dict[str, SlotSpec],
    ):
        self.strategy = strategy
        self.rank = rank
        self.world = world
        self.pieces = pieces
        self.slots = slots
        self.ops: list[Op] = []
        self._written: dict[str, set[tuple[int, HeadPart]]] = {}
        self._posted: set[str] = set()

    def peer(self, offset: int) -> int:
        """Rank ``offset`` hops from this one around the ring."""
        return (self.rank + offset) % self.world

    def reset(self, slot: str) -> None:
        """Forget what ``slot`` holds: the next write to it overwrites."""
        self._written.pop(slot, None)

    def _mark(self, rows: Rows) -> None:
        self._written.setdefault(rows.slot, set()).update(
            (i, rows.part) for i in range(rows.start, rows.stop)
        )

    def _fresh(self, rows: Rows) -> tuple[bool, ...]:
        """Per cell of ``rows``: True where this write is the first since the last reset."""
        written = self._written.setdefault(rows.slot, set())
        counts = {part.count for _, part in written} | {rows.part.count}
        if len(counts) > 1:
            raise AssertionError(f"schedule bug: {rows.slot} written in head parts of {counts}")
        fresh = tuple((i, rows.part) not in written for i in range(rows.start, rows.stop))
        self._mark(rows)
        return fresh

    def post(self, handle: str, step: int, moves: list[Move]) -> str | None:
        """Start the non-empty ``moves``; return the handle, or None if nothing moves."""
        moves = [m for m in moves if not (m.rows if isinstance(m, Transfer) else m.dst).empty]
        if not moves:
            return None
        if len(moves) > 1 and not all(isinstance(m, Transfer) for m in moves):
            raise AssertionError("schedule bug: a collective is posted alone")
        for m in moves:  # a receive overwrites its rows
            if not isinstance(m, Transfer):
                self._mark(m.dst)
            elif not m.send:
                self._mark(m.rows)
        self.ops.append(Post(handle, tuple(moves), step))
        self._posted.add(handle)
        return handle

    def wait(self, handle: str | None, step: int) -> None:
        if handle is not None and handle in self._posted:
            self._posted.discard(handle)
            self.ops.append(Wait(handle, step))

    def compute(
        self,
        blocks: list[Block],
        *,
        q_slot: str,
        kv_slot: str,
        q_out: str,
        kv_out: str | None,
        step: int,
        q_owner: int | None,
        kv_owner: int | None,
        q_part: HeadPart = WHOLE,
        kv_part: HeadPart = WHOLE,
    ) -> None:
        """Emit one Compute per block, on head part ``q_part`` of the query slot and its
        result and ``kv_part`` of the key/value slot and its result; results land at
        the same cells of the out slots as their queries and keys."""
        for b in blocks:
            out_rows = Rows(q_out, b.q0, b.q1, q_part)
            kv_rows = Rows(kv_out, b.k0, b.k1, kv_part) if kv_out is not None else None
            self.ops.append(
                Compute(
                    q=Rows(q_slot, b.q0, b.q1, q_part),
                    kv=Rows(kv_slot, b.k0, b.k1, kv_part),
                    causal=b.causal,
                    q_out=out_rows,
                    kv_out=kv_rows,
                    fresh_q=self._fresh(out_rows),
                    fresh_kv=self._fresh(kv_rows) if kv_rows is not None else (),
                    step=step,
                    q_owner=q_owner,
                    kv_owner=kv_owner,
                )
            )

    def own_block(self, causal: bool, *, q_out: str, kv_out: str | None, step: int = 0) -> None:
        """This rank's queries against its own keys and values (slots ``q`` and ``kv``)."""
        self.compute(
            cover(relations(self.pieces, self.pieces, causal)),
            q_slot="q",
            kv_slot="kv",
            q_out=q_out,
            kv_out=kv_out,
            step=step,
            q_owner=self.rank,
            kv_owner=self.rank,
        )

    def merge(self, src: Rows, dst: Rows, step: int) -> None:
        if src.empty:
            return
        written = self._written.get(dst.slot, set())
        if not all((i, dst.part) in written for i in range(dst.start, dst.stop)):
            raise AssertionError(f"schedule bug: merge into unwritten rows {dst}")
        self.ops.append(Merge(src, dst, step))

    def build(self, query_result: str, kv_result: str | None) -> Schedule:
        if self._posted:
            raise AssertionError(f"schedule bug: handles never waited: {sorted(self._posted)}")
        return Schedule(
            strategy=self.strategy,
            rank=self.rank,
            world=self.world,
            pieces=self.pieces,
            slots=dict(self.slots),
            ops=tuple(self.ops),
            query_result=query_result,
            kv_result=kv_result,
        )

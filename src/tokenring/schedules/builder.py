"""A small helper that schedule functions use to emit operations.

It tracks which rows of each result slot have been written so that the first
write overwrites (``fresh``) and later ones accumulate, and it drops empty
transfers, computes and merges so schedules can be written without guards.
"""

from __future__ import annotations

from .blocks import Block
from .ir import Compute, Merge, Op, Post, Rows, Schedule, SlotSpec, Transfer, Wait

__all__ = ["ScheduleBuilder"]


class ScheduleBuilder:
    def __init__(self, strategy: str, rank: int, world: int, slots: dict[str, SlotSpec]):
        self.strategy = strategy
        self.rank = rank
        self.world = world
        self.slots = slots
        self.ops: list[Op] = []
        self._written: dict[str, set[int]] = {}
        self._posted: set[str] = set()

    def peer(self, offset: int) -> int:
        """Group rank ``offset`` hops from this one around the ring."""
        return (self.rank + offset) % self.world

    def reset(self, slot: str) -> None:
        """Forget what ``slot`` holds: the next write to it overwrites."""
        self._written.pop(slot, None)

    def _fresh(self, rows: Rows) -> tuple[bool, ...]:
        """Per sub-chunk of ``rows``: True where this write is the first since the last reset."""
        written = self._written.setdefault(rows.slot, set())
        fresh = tuple(i not in written for i in range(rows.start, rows.stop))
        written.update(range(rows.start, rows.stop))
        return fresh

    def post(self, handle: str, step: int, transfers: list[Transfer]) -> str | None:
        """Start the non-empty ``transfers``; return the handle, or None if nothing moves."""
        transfers = [t for t in transfers if not t.rows.empty]
        if not transfers:
            return None
        for t in transfers:
            if not t.send:  # a receive overwrites its rows
                self.reset(t.rows.slot)
                self._written[t.rows.slot] = set(range(t.rows.start, t.rows.stop))
        self.ops.append(Post(handle, tuple(transfers), step))
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
        q_owner: int,
        kv_owner: int,
    ) -> None:
        """Emit one Compute per block, writing results at the same rows of the out slots."""
        for b in blocks:
            out_rows = Rows(q_out, b.q0, b.q1)
            kv_rows = Rows(kv_out, b.k0, b.k1) if kv_out is not None else None
            self.ops.append(
                Compute(
                    q=Rows(q_slot, b.q0, b.q1),
                    kv=Rows(kv_slot, b.k0, b.k1),
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

    def merge(self, src: Rows, dst: Rows, step: int) -> None:
        if src.empty:
            return
        if not set(range(dst.start, dst.stop)) <= self._written.get(dst.slot, set()):
            raise AssertionError(f"schedule bug: merge into unwritten rows {dst}")
        self.ops.append(Merge(src, dst, step))

    def build(self, query_result: str, kv_result: str | None) -> Schedule:
        if self._posted:
            raise AssertionError(f"schedule bug: handles never waited: {sorted(self._posted)}")
        return Schedule(
            strategy=self.strategy,
            rank=self.rank,
            world=self.world,
            slots=dict(self.slots),
            ops=tuple(self.ops),
            query_result=query_result,
            kv_result=kv_result,
        )

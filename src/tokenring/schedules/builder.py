"""A small helper that schedule functions use to emit operations.

It knows the call's geometry and mask, so schedules ask it which pairs of
pieces meet (``elements``) and never compute token ranges themselves; it tracks
which cells (and head parts) of each result slot have been written so that the
first write overwrites (``fresh``) and later ones accumulate; and it drops
transfers, computes and merges of no tokens, on every rank alike (they all
read the same geometry), so schedules can be written without guards.
"""

from __future__ import annotations

from dataclasses import replace

from .blocks import Block, Element, cover, piece_relations
from .geometry import Geometry
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
from .masks import BlockKind, Mask

__all__ = ["ScheduleBuilder"]


def _ragged_alone(
    blocks: tuple[Block, ...], kv_content: tuple[int, ...], ragged: frozenset[int]
) -> tuple[Block, ...]:
    """``blocks`` with every ragged key/value piece (``Geometry.ragged``) in kernel calls
    of its own, so that the executor can hand a call the valid length of each batch row
    (a FULL or masked block cut into column ranges stays exact; a causal square never
    holds a ragged piece: its positions are not the queries')."""
    out: list[Block] = []
    for b in blocks:
        pieces = kv_content[b.k0 : b.k1]
        if not any(p in ragged for p in pieces) or len(pieces) == 1:
            out.append(b)
            continue
        if b.kind is BlockKind.DIAG:
            raise AssertionError("schedule bug: a causal square over a ragged piece")
        start = b.k0
        for k in range(b.k0, b.k1 + 1):  # cut before and after every ragged cell
            if k == b.k1 or kv_content[k] in ragged:
                if k > start:
                    out.append(Block(b.q0, b.q1, start, k, b.kind))
                if k < b.k1:
                    out.append(Block(b.q0, b.q1, k, k + 1, b.kind))
                start = k + 1
    return tuple(out)


class ScheduleBuilder:
    def __init__(
        self,
        strategy: str,
        rank: int,
        world: int,
        pieces: tuple[int, ...],
        slots: dict[str, SlotSpec],
        geometry: Geometry,
        mask: Mask,
    ):
        self.strategy = strategy
        self.rank = rank
        self.world = world
        self.pieces = pieces
        self.slots = slots
        self.geometry = geometry
        self.mask = mask
        self.ops: list[Op] = []
        # per slot, per head part: the cells written since the slot's last reset
        self._written: dict[str, dict[HeadPart, set[int]]] = {}
        self._posted: set[str] = set()
        self._shell = Schedule(strategy, rank, world, pieces, geometry, slots, (), "")

    def elements(
        self, q_pieces: tuple[int, ...], kv_pieces: tuple[int, ...]
    ) -> tuple[Element, ...]:
        """The (query cell, key cell) pairs of two runs of pieces that the mask lets meet."""
        return piece_relations(self.geometry, self.mask, q_pieces, kv_pieces)

    def tokens(self, rows: Rows) -> int:
        return self._shell.tokens(rows)

    def peer(self, offset: int) -> int:
        """Rank ``offset`` hops from this one around the ring."""
        return (self.rank + offset) % self.world

    def reset(self, slot: str) -> None:
        """Forget what ``slot`` holds: the next write to it overwrites."""
        self._written.pop(slot, None)

    def _cells(self, rows: Rows) -> set[int]:
        """The cells of ``rows``'s slot written so far in its head part (a live set)."""
        parts = self._written.setdefault(rows.slot, {})
        cells = parts.get(rows.part)
        if cells is None:
            cells = parts[rows.part] = set()
        return cells

    def _mark(self, rows: Rows) -> None:
        self._cells(rows).update(range(rows.start, rows.stop))

    def _fresh(self, rows: Rows) -> tuple[bool, ...]:
        """Per cell of ``rows``: True where this write is the first since the last reset."""
        parts = self._written.get(rows.slot)
        if parts and any(part.count != rows.part.count for part in parts):
            counts = {part.count for part in parts} | {rows.part.count}
            raise AssertionError(f"schedule bug: {rows.slot} written in head parts of {counts}")
        cells = self._cells(rows)
        fresh = tuple(i not in cells for i in range(rows.start, rows.stop))
        cells.update(range(rows.start, rows.stop))
        return fresh

    def post(self, handle: str, step: int, moves: list[Move]) -> str | None:
        """Start the ``moves`` that carry tokens; return the handle, or None if nothing moves.

        A collective is kept even when this rank's part of it is empty (its members
        must all take part); a transfer of no tokens is dropped on both sides alike.
        """
        moves = [m for m in moves if not isinstance(m, Transfer) or self.tokens(m.rows)]
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
        blocks: tuple[Block, ...],
        *,
        q: tuple[str, tuple[int, ...]],
        kv: tuple[str, tuple[int, ...]],
        q_out: str,
        kv_out: str | None,
        step: int,
        q_owner: int | None,
        kv_owner: int | None,
        q_part: HeadPart = WHOLE,
        kv_part: HeadPart = WHOLE,
    ) -> None:
        """Emit one Compute per block, ``q`` and ``kv`` being (slot, the pieces it holds),
        on head part ``q_part`` of the query slot and its result and ``kv_part`` of the
        key/value slot and its result; results land at the same cells of the out slots
        as their queries and keys."""
        (q_slot, q_content), (kv_slot, kv_content) = q, kv
        if self.geometry.ragged:
            blocks = _ragged_alone(blocks, kv_content, self.geometry.ragged)
        for b in blocks:
            out_rows = Rows(q_out, q_content, b.q0, b.q1, q_part)
            kv_rows = Rows(kv_out, kv_content, b.k0, b.k1, kv_part) if kv_out is not None else None
            self.ops.append(
                Compute(
                    q=Rows(q_slot, q_content, b.q0, b.q1, q_part),
                    kv=Rows(kv_slot, kv_content, b.k0, b.k1, kv_part),
                    kind=b.kind,
                    mask=self.mask,
                    q_out=out_rows,
                    kv_out=kv_rows,
                    fresh_q=self._fresh(out_rows),
                    fresh_kv=self._fresh(kv_rows) if kv_rows is not None else (),
                    step=step,
                    q_owner=q_owner,
                    kv_owner=kv_owner,
                )
            )

    def own_block(self, *, q_out: str, kv_out: str | None, step: int = 0) -> None:
        """This rank's queries against its own keys and values (slots ``q`` and ``kv``)."""
        self.compute(
            cover(self.elements(self.pieces, self.pieces)),
            q=("q", self.pieces),
            kv=("kv", self.pieces),
            q_out=q_out,
            kv_out=kv_out,
            step=step,
            q_owner=self.rank,
            kv_owner=self.rank,
        )

    def wrote(self, slot: str) -> bool:
        """Whether any operation so far writes ``slot``."""
        return any(self._written.get(slot, {}).values())

    def identity(self, rows: Rows) -> None:
        """``rows`` of a ``zeroed`` result slot start as the merge's identity: merges may
        accumulate into them before anything is written."""
        if not self.slots[rows.slot].zeroed:
            raise AssertionError(f"schedule bug: {rows.slot} does not start zeroed")
        self._mark(rows)

    def merge(self, src: Rows, dst: Rows, step: int) -> None:
        if not self.tokens(src):
            return
        written = self._written.get(dst.slot, {}).get(dst.part, set())
        table = self._shell.table(dst)
        if not all(
            i in written or not table.length(dst.content[i]) for i in range(dst.start, dst.stop)
        ):
            raise AssertionError(f"schedule bug: merge into unwritten rows {dst}")
        self.ops.append(Merge(src, dst, step))

    def _never_written(self, slot: str | None, table) -> bool:
        """Whether a cell of result ``slot`` (holding this rank's pieces) that has tokens
        is never written: its queries meet no key (or its keys no query) anywhere."""
        if slot is None:
            return False
        written = set().union(*self._written.get(slot, {}).values())
        return any(table.length(p) and i not in written for i, p in enumerate(self.pieces))

    def build(self, query_result: str, kv_result: str | None) -> Schedule:
        """The schedule; a result slot with cells no operation writes starts as the merge's
        identity (``zeroed``: zeros, and an LSE of -inf), so those rows come out empty."""
        if self._posted:
            raise AssertionError(f"schedule bug: handles never waited: {sorted(self._posted)}")
        slots = dict(self.slots)
        for name, table in ((query_result, self.geometry.q), (kv_result, self.geometry.kv)):
            if self._never_written(name, table) and name is not None:
                slots[name] = replace(slots[name], zeroed=True)
        return Schedule(
            strategy=self.strategy,
            rank=self.rank,
            world=self.world,
            pieces=self.pieces,
            geometry=self.geometry,
            slots=slots,
            ops=tuple(self.ops),
            query_result=query_result,
            kv_result=kv_result,
        )

"""How each collective move of a schedule runs: pack, one torch.distributed call, unpack.

A collective moves several components (q, do, lse, delta; k and v; out and lse)
of one or two cells per member. Each becomes *one* call: every component's
piece for a member is copied into that member's share of one flat buffer,
the buffer moves (``all_to_all_single``, ``all_gather_single``,
``reduce_scatter_single``), and the received shares are copied into the
slots' cells when the move's ``Wait`` completes. One call instead of one per
component and cell costs a copy of what moves, and saves the per-call
latency and host time that dominate short sequences (on gloo, 28 calls of a
Ulysses forward and backward became 7). Buffers that only move are packed as
bytes, so components of different dtypes share one; a reduce-scatter sums,
so its components share a dtype.

Both sides agree on a share's layout from the move alone (``_Share``):
components in ``COMPONENTS`` order, then cells, each piece padded to 16 bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..schedules.ir import FAMILY, AllGather, AllToAll, Direction, ReduceScatter, Rows
from .comm import Lanes
from .slots import SlotStore
from .timeline import Sent

__all__ = ["post_collective"]

ALIGN = 16  # bytes: every piece starts where any dtype can view it

Finish = Callable[[], None]


@dataclass(frozen=True)
class _Piece:
    component: str
    cell: int  # shard-side cell
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # in bytes, or in elements when the share is typed

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class _Share:
    """The layout of one member's share of a flat buffer."""

    pieces: tuple[_Piece, ...]
    size: int  # bytes (or elements when typed)
    typed: torch.dtype | None  # None: packed as bytes

    def view(self, flat: torch.Tensor, member: int, piece: _Piece) -> torch.Tensor:
        start = member * self.size + piece.offset
        if self.typed is not None:
            return flat[start : start + piece.numel].view(piece.shape)
        nbytes = piece.numel * piece.dtype.itemsize
        return flat[start : start + nbytes].view(piece.dtype).view(piece.shape)

    def alloc(self, members: int, device: torch.device) -> torch.Tensor:
        return torch.empty(members * self.size, dtype=self.typed or torch.uint8, device=device)


def _share(store: SlotStore, rows: Rows, heads: int, move, typed: bool) -> _Share:
    """Layout of one member's share: every component of ``rows``'s kind, every shard
    cell of ``rows``, with ``heads`` heads (of its family) each, each in the narrower
    of its dtypes in the move's source and destination slots (an fp32 accumulator
    bound for a result in the input dtype travels in the input dtype). ``typed``:
    elements of one dtype (for a reduction) instead of bytes."""
    p = store.problem
    pieces, offset, dtypes = [], 0, set()
    for comp in store.components(rows):
        ends = (store.tensors[move.src.slot][comp].dtype, store.tensors[move.dst.slot][comp].dtype)
        dtype = min(ends, key=lambda d: d.itemsize)
        dtypes.add(dtype)
        per_row = (p.batch, heads) if FAMILY[comp] == "row" else (p.batch, heads, p.head_dim)
        for cell in range(rows.start, rows.stop):
            a, z = store.span(Rows(rows.slot, cell, cell + 1))
            piece = _Piece(comp, cell, (z - a, *per_row), dtype, offset)
            pieces.append(piece)
            if typed:
                offset += piece.numel
            else:
                offset += -(-piece.numel * dtype.itemsize // ALIGN) * ALIGN
    if typed and len(dtypes) > 1:
        raise AssertionError(f"a reduce-scatter sums components of one dtype, got {dtypes}")
    return _Share(tuple(pieces), offset, dtypes.pop() if typed else None)


def _nbytes(share: _Share) -> int:
    return sum(p.numel * p.dtype.itemsize for p in share.pieces)


def _heads_of(store: SlotStore, rows: Rows) -> int:
    """Heads of the family that ``rows`` address (their part of the slot's heads)."""
    comp = store.components(rows)[0]
    return store.phys(rows, comp).shape[2]


def _cell_rows(rows: Rows, cell: int) -> Rows:
    return Rows(rows.slot, cell, cell + 1, rows.part)


def _post_all_to_all(store: SlotStore, move: AllToAll, lanes: Lanes):
    to_heads = move.direction is Direction.SEQ_TO_HEADS
    shard, whole = (move.src, move.dst) if to_heads else (move.dst, move.src)
    members = len(move.parts)
    size = _heads_of(store, whole)  # heads per member
    share = _share(store, shard, size, move, typed=False)
    device = store.problem.device
    send, recv = share.alloc(members, device), share.alloc(members, device)
    for m in range(members):
        for piece in share.pieces:
            target = share.view(send, m, piece)
            if to_heads:  # member m's head part of my cell
                source = store.phys(_cell_rows(shard, piece.cell), piece.component)
                lo = move.parts[m] * size
                target.copy_(source[:, :, lo : lo + size])
            else:  # my gathered copy of member m's cell
                cell = move.placement[m][piece.cell - shard.start]
                target.copy_(store.phys(_cell_rows(whole, cell), piece.component))
    work = lanes.all_to_all_single(recv, send, move.lane)

    def unpack() -> None:
        written: set[int] = set()
        for m in range(members):
            fresh = move.parts[m] not in written
            written.add(move.parts[m])
            for piece in share.pieces:
                got = share.view(recv, m, piece)
                if to_heads:
                    cell = move.placement[m][piece.cell - shard.start]
                    store.phys(_cell_rows(whole, cell), piece.component).copy_(got)
                    continue
                target = store.phys(_cell_rows(shard, piece.cell), piece.component)
                lo = move.parts[m] * size
                target = target[:, :, lo : lo + size]
                # several members hold the same replicated key/value heads: sum them
                if fresh:
                    target.copy_(got)
                else:
                    target.add_(got)

    return work, unpack, _nbytes(share) * (members - 1)


def _post_all_gather(store: SlotStore, move: AllGather, lanes: Lanes):
    members = len(move.placement)
    share = _share(store, move.src, _heads_of(store, move.src), move, typed=False)
    device = store.problem.device
    send, recv = share.alloc(1, device), share.alloc(members, device)
    for piece in share.pieces:
        share.view(send, 0, piece).copy_(
            store.phys(_cell_rows(move.src, piece.cell), piece.component)
        )
    work = lanes.all_gather_single(recv, send, move.lane)

    def unpack() -> None:
        for m in range(members):
            for piece in share.pieces:
                cell = move.placement[m][piece.cell - move.src.start]
                target = store.phys(_cell_rows(move.dst, cell), piece.component)
                target.copy_(share.view(recv, m, piece))

    return work, unpack, _nbytes(share) * (members - 1)


def _post_reduce_scatter(store: SlotStore, move: ReduceScatter, lanes: Lanes):
    members = len(move.placement)
    share = _share(store, move.dst, _heads_of(store, move.dst), move, typed=True)
    device = store.problem.device
    send, recv = share.alloc(members, device), share.alloc(1, device)
    for m in range(members):
        for piece in share.pieces:
            cell = move.placement[m][piece.cell - move.dst.start]
            source = store.phys(_cell_rows(move.src, cell), piece.component)
            share.view(send, m, piece).copy_(source)
    work = lanes.reduce_scatter_single(recv, send, move.lane)

    def unpack() -> None:
        for piece in share.pieces:
            target = store.phys(_cell_rows(move.dst, piece.cell), piece.component)
            target.copy_(share.view(recv, 0, piece))

    return work, unpack, _nbytes(share) * (members - 1)


def post_collective(
    store: SlotStore, move: AllGather | AllToAll | ReduceScatter, lanes: Lanes
) -> tuple[dist.Work, Finish, list[Sent]]:
    """Start ``move``: returns its work, what to do once it completes, and what it sends."""
    match move:
        case AllToAll():
            work, finish, nbytes = _post_all_to_all(store, move, lanes)
        case AllGather():
            work, finish, nbytes = _post_all_gather(store, move, lanes)
        case ReduceScatter():
            work, finish, nbytes = _post_reduce_scatter(store, move, lanes)
    return work, finish, [Sent(move.lane, nbytes, store.kind(move.src))]

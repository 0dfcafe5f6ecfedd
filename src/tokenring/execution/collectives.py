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

Both sides agree on every share's layout from the move and the geometry alone
(``_Shares``): components in ``COMPONENTS`` order, then the member's cells, each
piece as long as that member's piece and padded to 16 bytes; members whose
pieces differ in length (a sequence that does not divide evenly) have shares
of different sizes, and every share is padded to the longest, so each move is
still one call with equal splits.
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
    cell: int  # the member's own cell index
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
class _Layout:
    """Where a member's pieces sit in its share of a flat buffer."""

    pieces: tuple[_Piece, ...]
    size: int  # bytes (or elements when typed)

    @property
    def nbytes(self) -> int:
        return sum(p.numel * p.dtype.itemsize for p in self.pieces)


@dataclass(frozen=True)
class _Shares:
    """Every member's share of a flat buffer: its own layout (its pieces' lengths), each
    share as long as the longest, so that the buffer splits evenly over the members."""

    layouts: tuple[_Layout, ...]
    typed: torch.dtype | None  # None: packed as bytes

    @property
    def size(self) -> int:
        return max(layout.size for layout in self.layouts)

    def view(self, flat: torch.Tensor, member: int, piece: _Piece) -> torch.Tensor:
        start = member * self.size + piece.offset
        if self.typed is not None:
            return flat[start : start + piece.numel].view(piece.shape)
        nbytes = piece.numel * piece.dtype.itemsize
        return flat[start : start + nbytes].view(piece.dtype).view(piece.shape)

    def alloc(self, device: torch.device, members: int | None = None) -> torch.Tensor:
        count = len(self.layouts) if members is None else members
        return torch.empty(count * self.size, dtype=self.typed or torch.uint8, device=device)


def _shares(store: SlotStore, gathered: Rows, placement, heads: int, move, typed: bool) -> _Shares:
    """The layout of every member's share: every component of ``gathered``'s kind, every
    cell of that member (its cells ``placement[member]`` of the gathered rows, with their
    own lengths), ``heads`` heads each, each in the narrower of its dtypes in the move's
    source and destination slots (an fp32 accumulator bound for a result in the input
    dtype travels in the input dtype). ``typed``: elements of one dtype (for a reduction)
    instead of bytes."""
    p = store.call
    comps = store.components(gathered)
    dtypes = {}
    for comp in comps:
        ends = (store.tensors[move.src.slot][comp].dtype, store.tensors[move.dst.slot][comp].dtype)
        dtypes[comp] = min(ends, key=lambda d: d.itemsize)
    if typed and len(set(dtypes.values())) > 1:
        raise AssertionError(f"a reduce-scatter sums components of one dtype, got {dtypes}")
    layouts = []
    for cells in placement:
        pieces, offset = [], 0
        for comp in comps:
            per_row = (p.batch, heads) if FAMILY[comp] == "row" else (p.batch, heads, p.head_dim)
            for i, cell in enumerate(cells):
                a, z = store.span(_cell(gathered, cell))
                piece = _Piece(comp, i, (z - a, *per_row), dtypes[comp], offset)
                pieces.append(piece)
                if typed:
                    offset += piece.numel
                else:
                    offset += -(-piece.numel * piece.dtype.itemsize // ALIGN) * ALIGN
        layouts.append(_Layout(tuple(pieces), offset))
    typed_as = next(iter(dtypes.values())) if typed else None
    return _Shares(tuple(layouts), typed_as)


def _cell(rows: Rows, index: int) -> Rows:
    """Cell ``index`` of ``rows`` (counted from their first cell, as placements count)."""
    return rows.cell(rows.start + index)


def _heads_of(store: SlotStore, rows: Rows) -> int:
    """Heads of the family that ``rows`` address (their part of the slot's heads)."""
    comp = store.components(rows)[0]
    return store.phys(rows, comp).shape[2]


def _sent_own(shares: _Shares, me: int) -> int:
    """Bytes sent when every other member receives this member's own cells."""
    return shares.layouts[me].nbytes * (len(shares.layouts) - 1)


def _sent_theirs(shares: _Shares, me: int) -> int:
    """Bytes sent when every other member receives its own cells from this member."""
    return sum(layout.nbytes for m, layout in enumerate(shares.layouts) if m != me)


def _post_all_to_all(store: SlotStore, move: AllToAll, lanes: Lanes, me: int):
    to_heads = move.direction is Direction.SEQ_TO_HEADS
    shard, whole = (move.src, move.dst) if to_heads else (move.dst, move.src)
    members = len(move.parts)
    size = _heads_of(store, whole)  # heads per member
    shares = _shares(store, whole, move.placement, size, move, typed=False)
    device = store.device
    send, recv = shares.alloc(device), shares.alloc(device)
    for m in range(members):
        # to heads: member m gets its head part of my cells; back: member m its own cells
        layout = shares.layouts[me if to_heads else m]
        for piece in layout.pieces:
            target = shares.view(send, m, piece)
            if to_heads:
                source = store.phys(_cell(shard, piece.cell), piece.component)
                lo = move.parts[m] * size
                target.copy_(source[:, :, lo : lo + size])
            else:  # my gathered copy of member m's cell
                cell = move.placement[m][piece.cell]
                target.copy_(store.phys(_cell(whole, cell), piece.component))
    work = lanes.all_to_all_single(recv, send, move.lane)

    def unpack() -> None:
        written: set[int] = set()
        for s in range(members):
            fresh = move.parts[s] not in written
            written.add(move.parts[s])
            for piece in shares.layouts[s if to_heads else me].pieces:
                got = shares.view(recv, s, piece)
                if to_heads:
                    cell = move.placement[s][piece.cell]
                    store.phys(_cell(whole, cell), piece.component).copy_(got)
                    continue
                target = store.phys(_cell(shard, piece.cell), piece.component)
                lo = move.parts[s] * size
                target = target[:, :, lo : lo + size]
                # several members hold the same replicated key/value heads: sum them
                if fresh:
                    target.copy_(got)
                else:
                    target.add_(got)

    return work, unpack, _sent_own(shares, me) if to_heads else _sent_theirs(shares, me)


def _post_all_gather(store: SlotStore, move: AllGather, lanes: Lanes, me: int):
    members = len(move.placement)
    shares = _shares(store, move.dst, move.placement, _heads_of(store, move.src), move, False)
    device = store.device
    send, recv = shares.alloc(device, members=1), shares.alloc(device)
    for piece in shares.layouts[me].pieces:
        source = store.phys(_cell(move.src, piece.cell), piece.component)
        shares.view(send, 0, piece).copy_(source)
    work = lanes.all_gather_single(recv, send, move.lane)

    def unpack() -> None:
        for s in range(members):
            for piece in shares.layouts[s].pieces:
                cell = move.placement[s][piece.cell]
                target = store.phys(_cell(move.dst, cell), piece.component)
                target.copy_(shares.view(recv, s, piece))

    return work, unpack, _sent_own(shares, me)


def _post_reduce_scatter(store: SlotStore, move: ReduceScatter, lanes: Lanes, me: int):
    members = len(move.placement)
    heads = _heads_of(store, move.dst)
    shares = _shares(store, move.src, move.placement, heads, move, typed=True)
    device = store.device
    send, recv = shares.alloc(device), shares.alloc(device, members=1)
    for m in range(members):
        for piece in shares.layouts[m].pieces:
            cell = move.placement[m][piece.cell]
            source = store.phys(_cell(move.src, cell), piece.component)
            shares.view(send, m, piece).copy_(source)
    work = lanes.reduce_scatter_single(recv, send, move.lane)

    def unpack() -> None:
        for piece in shares.layouts[me].pieces:
            target = store.phys(_cell(move.dst, piece.cell), piece.component)
            target.copy_(shares.view(recv, 0, piece))

    return work, unpack, _sent_theirs(shares, me)


def post_collective(
    store: SlotStore, move: AllGather | AllToAll | ReduceScatter, lanes: Lanes, me: int
) -> tuple[dist.Work, Finish, list[Sent]]:
    """Start ``move`` (``me``: this rank's index on the move's axis): returns its work,
    what to do once it completes, and what it sends to the other members."""
    match move:
        case AllToAll():
            work, finish, nbytes = _post_all_to_all(store, move, lanes, me)
        case AllGather():
            work, finish, nbytes = _post_all_gather(store, move, lanes, me)
        case ReduceScatter():
            work, finish, nbytes = _post_reduce_scatter(store, move, lanes, me)
    return work, finish, [Sent(move.lane, nbytes, store.kind(move.src))]

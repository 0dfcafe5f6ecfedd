"""Which tokens each rank holds, as arithmetic: the pieces of a sequence and their bounds.

A sequence of ``S`` tokens sharded over ``P`` ranks is cut into ``2P`` *pieces*,
numbered in global order (piece ``i`` ends where piece ``i + 1`` starts), and
every rank holds two of them (see docs/algorithms.md, "Layouts"):

- ``contiguous``: the sequence is split into ``P`` shards as ``torch.tensor_split``
  does (the first ``S mod P`` ranks hold one token more); rank ``r`` holds shard
  ``r``, cut into halves: pieces ``2r`` (``L // 2`` tokens) and ``2r + 1``;
- ``zigzag``: the sequence is split into ``2P`` chunks likewise (the first
  ``S mod 2P`` chunks hold one more); rank ``r`` holds chunks ``r`` and
  ``2P - 1 - r``, which balances causal work.

Either way per-rank lengths differ by at most one token, and a piece may be
empty (``S < 2P``). A ``PieceTable`` holds the global bounds of every piece;
schedules address pieces by index and read their token ranges from it, so no
code assumes equal lengths. Pure: no process state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..options import Layout

__all__ = [
    "Geometry",
    "PieceTable",
    "Span",
    "chunk_ids",
    "local_lengths",
    "mesh_pieces",
    "piece_table",
]

Span = tuple[int, int]
"""A range of global token positions ``[start, stop)``."""


@dataclass(frozen=True)
class PieceTable:
    """Global token bounds of a sequence's pieces: piece ``i`` is
    ``[bounds[i], bounds[i + 1])``, in increasing global order."""

    bounds: tuple[int, ...]
    _hash: int = field(default=0, compare=False, repr=False)

    def __post_init__(self) -> None:
        # tables key many caches; hash the (possibly long) bounds once
        object.__setattr__(self, "_hash", hash(self.bounds))

    def __hash__(self) -> int:
        return self._hash

    @property
    def count(self) -> int:
        """Number of pieces."""
        return len(self.bounds) - 1

    @property
    def seq_len(self) -> int:
        """Tokens in the whole sequence."""
        return self.bounds[-1] - self.bounds[0]

    @property
    def positions(self) -> range:
        """Every global position the pieces hold."""
        return range(self.bounds[0], self.bounds[-1])

    def span(self, piece: int) -> Span:
        return self.bounds[piece], self.bounds[piece + 1]

    def length(self, piece: int) -> int:
        return self.bounds[piece + 1] - self.bounds[piece]

    def spans(self, pieces: tuple[int, ...]) -> tuple[Span, ...]:
        return tuple(self.span(p) for p in pieces)

    def tokens(self, pieces: tuple[int, ...] | list[int]) -> int:
        """Tokens in ``pieces`` together."""
        bounds, n = self.bounds, 0
        for p in pieces:  # a loop, not sum(): schedules of 1,024 ranks ask this millions of times
            n += bounds[p + 1] - bounds[p]
        return n

    @classmethod
    def from_lengths(cls, lengths: list[int] | tuple[int, ...]) -> PieceTable:
        bounds = [0]
        for n in lengths:
            if n < 0:
                raise ValueError(f"a piece cannot have {n} tokens")
            bounds.append(bounds[-1] + n)
        return cls(tuple(bounds))


@dataclass(frozen=True)
class Geometry:
    """The pieces of a call's queries and of its keys/values. Self-attention over one
    sharded sequence has the same table on both sides."""

    q: PieceTable
    kv: PieceTable

    @classmethod
    def self_attention(cls, table: PieceTable) -> Geometry:
        return cls(table, table)


def _split(total: int, parts: int) -> list[int]:
    """Sizes of ``torch.tensor_split(range(total), parts)``: the first ``total mod parts``
    parts hold one more."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def piece_table(layout: Layout, seq_len: int, world: int) -> PieceTable:
    """The ``2 * world`` pieces of a sequence of ``seq_len`` tokens in ``layout``."""
    if seq_len < 0 or world < 1:
        raise ValueError(f"no layout of {seq_len} tokens over {world} ranks")
    if layout is Layout.ZIGZAG:
        return PieceTable.from_lengths(_split(seq_len, 2 * world))
    lengths = []
    for shard in _split(seq_len, world):
        lengths += [shard // 2, shard - shard // 2]
    return PieceTable.from_lengths(lengths)


def chunk_ids(layout: Layout, world: int, rank: int) -> tuple[int, int]:
    """Global pieces (out of ``2 * world``) held by ``rank``, in local order."""
    return mesh_pieces(layout, world, 1, rank, 0)


def mesh_pieces(layout: Layout, ring: int, ulysses: int, r: int, u: int) -> tuple[int, int]:
    """Global pieces (out of ``2 * ring * ulysses``) held by rank (``r``, ``u``) of a
    ring x ulysses mesh, in local order.

    The sequence is cut into ``2 ring`` *ring chunks*, each into ``ulysses``
    pieces. ``contiguous``: rank (r, u) holds shard ``r * ulysses + u``, pieces
    ``2 (r ulysses + u)`` and the next. ``zigzag``: ring rank r's Ulysses group
    holds ring chunks r and ``2 ring - 1 - r`` (balanced causal work across
    the ring); its member u holds piece u of the first and piece
    ``ulysses - 1 - u`` of the second. With ``ulysses = 1`` or ``ring = 1`` this
    is the 1-D layout over the other axis. The pieces' bounds are those of
    ``piece_table(layout, S, ring * ulysses)``.
    """
    if layout is Layout.CONTIGUOUS:
        shard = r * ulysses + u
        return (2 * shard, 2 * shard + 1)
    return (r * ulysses + u, (2 * ring - 1 - r) * ulysses + (ulysses - 1 - u))


def local_lengths(layout: Layout, seq_len: int, world: int) -> tuple[int, ...]:
    """Tokens each rank holds (1-D rank order, or logical mesh rank ``r * ulysses + u``,
    which holds the same pieces as 1-D rank ``r * ulysses + u`` does)."""
    table = piece_table(layout, seq_len, world)
    return tuple(table.tokens(chunk_ids(layout, world, r)) for r in range(world))

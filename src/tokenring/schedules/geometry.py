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
code assumes equal lengths.

Packed sequences (documents with offsets ``cu_seqlens``): ``contiguous`` splits
the packed sequence as one; ``zigzag`` cuts *each document* into ``2P`` chunks
and piece ``c`` gathers chunk ``c`` of every document, in document order, so
rank ``r`` holds chunk ``r`` of every document, then chunk ``2P - 1 - r`` of
every document (``packed_zigzag``). A piece is then several runs of positions,
one per document (``PieceTable.runs``); with one document it is the zigzag
above. Pure: no process state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

from ..options import Layout

__all__ = [
    "Geometry",
    "PieceTable",
    "Span",
    "canonical",
    "chunk_ids",
    "local_lengths",
    "mesh_pieces",
    "packed_zigzag",
    "piece_table",
    "split_sizes",
]

Span = tuple[int, int]
"""A range of global token positions ``[start, stop)``."""


@dataclass(frozen=True)
class PieceTable:
    """The pieces of a sequence. ``bounds``: the pieces laid end to end in index order,
    piece ``i`` holding tokens ``[bounds[i], bounds[i + 1])`` of that order (what sizes
    and offsets read). ``runs``: where each piece's tokens sit in the sequence, as
    ranges of global positions in the piece's own order; ``None`` when the pieces are
    in global order and ``bounds`` are their positions (every unpacked layout)."""

    bounds: tuple[int, ...]
    runs: tuple[tuple[Span, ...], ...] | None = None
    _hash: int = field(default=0, compare=False, repr=False)

    def __post_init__(self) -> None:
        # tables key many caches; hash the (possibly long) bounds once
        object.__setattr__(self, "_hash", hash((self.bounds, self.runs)))

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
        """Where ``piece`` sits among the pieces laid end to end (not its positions when
        the table has ``runs``: see ``cell``)."""
        return self.bounds[piece], self.bounds[piece + 1]

    def cell(self, piece: int) -> tuple[Span, ...]:
        """The global positions of ``piece``'s tokens, as ranges in its own order."""
        if self.runs is None:
            return ((self.bounds[piece], self.bounds[piece + 1]),)
        return self.runs[piece]

    def cells(self, pieces: tuple[int, ...]) -> tuple[tuple[Span, ...], ...]:
        """``cell`` of each of ``pieces``: what masks classify."""
        return tuple(self.cell(p) for p in pieces)

    def positions_of(self, piece: int) -> list[int]:
        """Every global position of ``piece``, in its own order."""
        return [x for a, b in self.cell(piece) for x in range(a, b)]

    def length(self, piece: int) -> int:
        return self.bounds[piece + 1] - self.bounds[piece]

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
    sharded sequence has the same table on both sides.

    ``ragged``: key/value pieces whose batch rows hold fewer valid tokens than the
    piece's length, a prefix whose length per row is known only when the call runs
    (a KV cache's part on one rank: ``schedules/cache.py``). The schedule computes
    such a piece in kernel calls of its own (``ScheduleBuilder.compute``), which the
    executor hands the valid lengths."""

    q: PieceTable
    kv: PieceTable
    ragged: frozenset[int] = frozenset()

    @classmethod
    def self_attention(cls, table: PieceTable) -> Geometry:
        return cls(table, table)


def canonical(table: PieceTable, piece: int) -> int:
    """The first piece of ``table`` holding the same positions as ``piece``: pieces
    replicated on several ranks (queries every rank holds) are one piece's data."""
    cell = table.cell(piece)
    for i in range(table.count):
        if table.cell(i) == cell:
            return i
    raise AssertionError("a piece is always its own match")


def split_sizes(total: int, parts: int) -> list[int]:
    """Sizes of ``torch.tensor_split(range(total), parts)``: the first ``total mod parts``
    parts hold one more."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def packed_zigzag(documents: tuple[int, ...], parts: int) -> PieceTable:
    """``parts`` pieces of a packed sequence (document offsets ``documents``, ``[0, ...,
    S]``): each document is cut into ``parts`` chunks of ``n // parts`` tokens, the
    ``n mod parts`` left over going one each to the next chunks in a count that runs on
    from document to document (chunk ``c`` of a document continues where the previous
    document's extra tokens stopped, wrapping after ``parts - 1``); piece ``c`` is chunk
    ``c`` of every document, one run per non-empty chunk. Rank ``r`` of ``P`` (pieces
    ``r`` and ``2P - 1 - r``, ``parts = 2P``) then holds within one token of every other
    rank, whatever the document lengths; with one document this is the zigzag table."""
    runs: list[list[Span]] = [[] for _ in range(parts)]
    cursor = 0  # the chunk the next left-over token goes to
    for start, stop in pairwise(documents):
        base, extra = divmod(stop - start, parts)
        given = {(cursor + i) % parts for i in range(extra)}
        cursor = (cursor + extra) % parts
        for c in range(parts):
            size = base + (c in given)
            if size:
                runs[c].append((start, start + size))
            start += size
    lengths = [sum(b - a for a, b in piece) for piece in runs]
    table = PieceTable.from_lengths(lengths)
    return PieceTable(table.bounds, tuple(tuple(piece) for piece in runs))


def piece_table(
    layout: Layout, seq_len: int, world: int, documents: tuple[int, ...] = ()
) -> PieceTable:
    """The ``2 * world`` pieces of a sequence of ``seq_len`` tokens in ``layout``;
    ``documents``: the offsets of the documents packed in it (``cu_seqlens``; none or
    one document: the sequence is one), which cut a zigzag layout per document."""
    if seq_len < 0 or world < 1:
        raise ValueError(f"no layout of {seq_len} tokens over {world} ranks")
    if layout is Layout.ZIGZAG:
        if len(documents) > 2 and world > 1:  # on one rank, balance needs no reordering
            return packed_zigzag(documents, 2 * world)
        return PieceTable.from_lengths(split_sizes(seq_len, 2 * world))
    lengths = []
    for shard in split_sizes(seq_len, world):
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


def local_lengths(
    layout: Layout, seq_len: int, world: int, documents: tuple[int, ...] = ()
) -> tuple[int, ...]:
    """Tokens each rank holds (1-D rank order, or logical mesh rank ``r * ulysses + u``,
    which holds the same pieces as 1-D rank ``r * ulysses + u`` does)."""
    table = piece_table(layout, seq_len, world, documents)
    return tuple(table.tokens(chunk_ids(layout, world, r)) for r in range(world))

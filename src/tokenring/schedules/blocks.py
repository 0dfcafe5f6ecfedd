"""Pure functions: which (query cell, key cell) pairs a mask allows, and how to
cover them with as few rectangular kernel calls as possible.

Cells are pieces of the global sequence, named by their global index (pieces
are in increasing global order inside a shard or a gathered sequence). A pair
of pieces (pq, pk) relates in one of three ways under a causal mask: ``FULL``
(every query sees every key, pq > pk), ``DIAG`` (the same piece: a lower
triangle) or ``NONE`` (pq < pk). Without a mask every pair is FULL.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

__all__ = ["Block", "Element", "Rel", "cover", "pair_relation", "relations"]


class Rel(str, Enum):
    FULL = "full"
    DIAG = "diag"
    NONE = "none"


def pair_relation(q_piece: int, k_piece: int, causal: bool) -> Rel:
    """How queries of global piece ``q_piece`` see keys of global piece ``k_piece``."""
    if not causal or q_piece > k_piece:
        return Rel.FULL
    return Rel.DIAG if q_piece == k_piece else Rel.NONE


Element = tuple[int, int, Rel]  # (query cell, key cell, relation), cells as local indices


@lru_cache(maxsize=4096)
def relations(
    q_pieces: tuple[int, ...], kv_pieces: tuple[int, ...], causal: bool
) -> tuple[Element, ...]:
    """All non-empty (query cell, key cell) pairs between two runs of cells (as
    ``pair_relation`` says; remembered, since every rank's schedule asks for the same)."""
    if not causal:
        return tuple((i, j, Rel.FULL) for i in range(len(q_pieces)) for j in range(len(kv_pieces)))
    out = []
    for i, pq in enumerate(q_pieces):
        for j, pk in enumerate(kv_pieces):
            if pq > pk:
                out.append((i, j, Rel.FULL))
            elif pq == pk:
                out.append((i, j, Rel.DIAG))
    return tuple(out)


@dataclass(frozen=True)
class Block:
    """One kernel call: query cells [q0, q1) against key cells [k0, k1)."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool


def _causal_squares(pairs: dict[tuple[int, int], Rel]) -> list[Block]:
    """Maximal square runs of diagonal cells, each one causal call: the cells of a run
    are consecutive on both sides, DIAG on its diagonal, FULL below, absent above."""
    squares = []
    diagonals = sorted((i, j) for (i, j), rel in pairs.items() if rel is Rel.DIAG)
    taken: set[tuple[int, int]] = set()
    for i0, j0 in diagonals:
        if (i0, j0) in taken:
            continue
        n = 1
        # Growing the square by one cell adds one row below the diagonal (FULL) and one
        # column above it (absent); what is inside was checked already.
        while pairs.get((i0 + n, j0 + n)) is Rel.DIAG and all(
            pairs.get((i0 + n, j0 + b)) is Rel.FULL and (i0 + b, j0 + n) not in pairs
            for b in range(n)
        ):
            n += 1
        squares.append(Block(i0, i0 + n, j0, j0 + n, True))
        taken.update((i0 + a, j0 + a) for a in range(n))
    return squares


def cover(elements: tuple[Element, ...] | list[Element]) -> list[Block]:
    """Cover exactly ``elements`` with few rectangular calls (each FULL or square causal).

    Diagonal runs first (one causal call each), then the FULL pairs left: per
    query cell, runs of consecutive key cells, stacked where neighbouring query
    cells have the same run.
    """
    pairs = {(i, j): rel for i, j, rel in elements}
    squares = _causal_squares(pairs)
    covered = {(i, j) for s in squares for i in range(s.q0, s.q1) for j in range(s.k0, s.k1)}
    rest = sorted((i, j) for (i, j) in pairs if (i, j) not in covered)
    per_row: list[Block] = []
    for i, j in rest:
        last = per_row[-1] if per_row else None
        if last is not None and last.q0 == i and last.k1 == j:
            per_row[-1] = Block(i, i + 1, last.k0, j + 1, False)
        else:
            per_row.append(Block(i, i + 1, j, j + 1, False))
    stacked: list[Block] = []
    open_at: dict[tuple[int, int, int], int] = {}  # (k0, k1, q1) of a block -> its index
    for b in per_row:
        match = open_at.pop((b.k0, b.k1, b.q0), None)
        if match is None:
            match = len(stacked)
            stacked.append(b)
        else:
            s = stacked[match]
            stacked[match] = Block(s.q0, b.q1, s.k0, s.k1, False)
        open_at[(b.k0, b.k1, stacked[match].q1)] = match
    return sorted(squares + stacked, key=lambda b: (b.q0, b.k0))

"""Pure functions: which (query cell, key cell) pairs a mask allows, and how to cover
them with as few rectangular kernel calls as possible.

Cells are pieces of the sequence, given by their global positions (each a tuple of
ranges; a run of cells is a shard, or shards gathered over ranks).
``relations`` classifies every pair with ``masks.classify``; ``cover`` turns
the non-empty pairs into kernel calls: causal squares along runs of diagonal
cells, and rectangles of the rest (FULL, or masked where a pair is PARTIAL).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .masks import BlockKind, Cell, Mask, classify, combine

__all__ = ["Block", "Element", "cover", "relations"]

Element = tuple[int, int, BlockKind]
"""(query cell, key cell, how they meet), cells as local indices; never EMPTY."""


@lru_cache(maxsize=8192)
def relations(
    q_cells: tuple[Cell, ...], kv_cells: tuple[Cell, ...], mask: Mask
) -> tuple[Element, ...]:
    """All non-empty (query cell, key cell) pairs between two runs of cells, given by
    their token ranges (remembered, since every rank's schedule asks for the same)."""
    out = []
    for i, q in enumerate(q_cells):
        for j, k in enumerate(kv_cells):
            kind = classify(mask, q, k)
            if kind is not BlockKind.EMPTY:
                out.append((i, j, kind))
    return tuple(out)


@dataclass(frozen=True)
class Block:
    """One kernel call: query cells [q0, q1) against key cells [k0, k1), of ``kind``
    FULL, DIAG (a causal square) or PARTIAL (a masked call)."""

    q0: int
    q1: int
    k0: int
    k1: int
    kind: BlockKind


def _causal_squares(pairs: dict[tuple[int, int], BlockKind]) -> list[Block]:
    """Maximal square runs of diagonal cells, each one causal call: the cells of a run
    are consecutive on both sides, DIAG on its diagonal, FULL below, absent above."""
    squares = []
    diagonals = sorted((i, j) for (i, j), kind in pairs.items() if kind is BlockKind.DIAG)
    taken: set[tuple[int, int]] = set()
    for i0, j0 in diagonals:
        if (i0, j0) in taken:
            continue
        n = 1
        # Growing the square by one cell adds one row below the diagonal (FULL) and one
        # column above it (absent); what is inside was checked already.
        while pairs.get((i0 + n, j0 + n)) is BlockKind.DIAG and all(
            pairs.get((i0 + n, j0 + b)) is BlockKind.FULL and (i0 + b, j0 + n) not in pairs
            for b in range(n)
        ):
            n += 1
        squares.append(Block(i0, i0 + n, j0, j0 + n, BlockKind.DIAG))
        taken.update((i0 + a, j0 + a) for a in range(n))
    return squares


@lru_cache(maxsize=8192)
def cover(elements: tuple[Element, ...]) -> tuple[Block, ...]:
    """Cover exactly ``elements`` with few rectangular calls (remembered: every rank's
    schedule asks for the same few).

    Diagonal runs first (one causal call each), then the pairs left: per query
    cell, runs of consecutive key cells, stacked where neighbouring query cells
    have the same run; a call that holds a PARTIAL pair is a masked call.
    """
    pairs = {(i, j): kind for i, j, kind in elements}
    squares = _causal_squares(pairs)
    covered = {(i, j) for s in squares for i in range(s.q0, s.q1) for j in range(s.k0, s.k1)}
    rest = sorted((i, j) for (i, j) in pairs if (i, j) not in covered)
    rows: list[tuple[int, int, int, list[BlockKind]]] = []  # (query cell, k0, k1, kinds)
    for i, j in rest:
        last = rows[-1] if rows else None
        if last is not None and last[0] == i and last[2] == j:
            rows[-1] = (i, last[1], j + 1, [*last[3], pairs[(i, j)]])
        else:
            rows.append((i, j, j + 1, [pairs[(i, j)]]))
    stacked: list[tuple[int, int, int, int, list[BlockKind]]] = []  # q0, q1, k0, k1, kinds
    open_at: dict[tuple[int, int, int], int] = {}  # (k0, k1, q1) of a block -> its index
    for i, k0, k1, kinds in rows:
        match = open_at.pop((k0, k1, i), None)
        if match is None:
            match = len(stacked)
            stacked.append((i, i + 1, k0, k1, kinds))
        else:
            q0, _, _, _, before = stacked[match]
            stacked[match] = (q0, i + 1, k0, k1, before + kinds)
        open_at[(k0, k1, stacked[match][1])] = match
    rectangles = [Block(q0, q1, k0, k1, combine(kinds)) for q0, q1, k0, k1, kinds in stacked]
    return tuple(sorted(squares + rectangles, key=lambda b: (b.q0, b.k0)))

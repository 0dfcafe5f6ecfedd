"""Pure functions: which (query sub-chunk, key sub-chunk) pairs a mask allows, and
how to cover them with as few rectangular kernel calls as possible.

A pair of global chunks (cq, ck) relates in one of three ways under a causal
mask: ``FULL`` (every query sees every key, cq > ck), ``DIAG`` (the same chunk:
a lower triangle) or ``NONE`` (cq < ck). Without a mask every pair is FULL.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ..layouts import chunk_ids
from ..options import Layout

__all__ = ["Block", "Rel", "cover", "pair_relation", "relations"]


class Rel(str, Enum):
    FULL = "full"
    DIAG = "diag"
    NONE = "none"


def pair_relation(q_chunk: int, k_chunk: int, causal: bool) -> Rel:
    """How queries of global chunk ``q_chunk`` see keys of global chunk ``k_chunk``."""
    if not causal or q_chunk > k_chunk:
        return Rel.FULL
    return Rel.DIAG if q_chunk == k_chunk else Rel.NONE


Element = tuple[int, int, Rel]  # (local query sub-chunk, local key sub-chunk, relation)


def relations(
    layout: Layout, world: int, q_owner: int, kv_owner: int, causal: bool
) -> list[Element]:
    """All non-empty (query sub-chunk, key sub-chunk) pairs between two shards."""
    q_chunks = chunk_ids(layout, world, q_owner)
    k_chunks = chunk_ids(layout, world, kv_owner)
    out = []
    for i, cq in enumerate(q_chunks):
        for j, ck in enumerate(k_chunks):
            rel = pair_relation(cq, ck, causal)
            if rel is not Rel.NONE:
                out.append((i, j, rel))
    return out


@dataclass(frozen=True)
class Block:
    """One kernel call: query sub-chunks [q0, q1) against key sub-chunks [k0, k1)."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool


def cover(elements: list[Element]) -> list[Block]:
    """Cover exactly ``elements`` with few rectangular calls (each FULL or square causal)."""
    if not elements:
        return []
    pairs = {(i, j): rel for i, j, rel in elements}
    rows = sorted({i for i, _, _ in elements})
    cols = sorted({j for _, j, _ in elements})
    # A whole square with a causal diagonal and nothing above it is one causal call.
    if rows == cols and rows == list(range(rows[0], rows[-1] + 1)):
        square = all(
            pairs.get((i, j)) == (Rel.DIAG if i == j else Rel.FULL if i > j else None)
            for i in rows
            for j in cols
        )
        if square:
            return [Block(rows[0], rows[-1] + 1, cols[0], cols[-1] + 1, True)]
    # Otherwise: per query row, runs of FULL key sub-chunks, and each DIAG alone.
    per_row: list[Block] = []
    for i in rows:
        run: list[int] = []
        for j in sorted(j for (ii, j) in pairs if ii == i):
            if pairs[(i, j)] is Rel.DIAG:
                per_row.append(Block(i, i + 1, j, j + 1, True))
            elif run and j == run[-1] + 1:
                run.append(j)
            else:
                if run:
                    per_row.append(Block(i, i + 1, run[0], run[-1] + 1, False))
                run = [j]
        if run:
            per_row.append(Block(i, i + 1, run[0], run[-1] + 1, False))
    # Stack vertically adjacent FULL blocks over the same key range.
    merged: list[Block] = []
    for b in per_row:
        last = merged[-1] if merged else None
        if (
            last is not None
            and not b.causal
            and not last.causal
            and (last.k0, last.k1) == (b.k0, b.k1)
            and last.q1 == b.q0
        ):
            merged[-1] = Block(last.q0, b.q1, b.k0, b.k1, False)
        else:
            merged.append(b)
    return merged

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

import torch

from .geometry import Geometry
from .masks import (
    BlockKind,
    Cell,
    Mask,
    classify,
    classify_in_document,
    combine,
    split_at_documents,
)

__all__ = [
    "Block",
    "Element",
    "SubCall",
    "cover",
    "cut_cells",
    "piece_relations",
    "relations",
    "still_needed_spans",
    "sub_calls",
]

Element = tuple[int, int, BlockKind]
"""(query cell, key cell, how they meet), cells as local indices; never EMPTY."""


@lru_cache(maxsize=8192)
def relations(
    q_cells: tuple[Cell, ...], kv_cells: tuple[Cell, ...], mask: Mask
) -> tuple[Element, ...]:
    """All non-empty (query cell, key cell) pairs between two runs of cells, given by
    their token ranges (remembered, since every rank's schedule asks for the same)."""
    if len(q_cells) * len(kv_cells) >= VECTOR_PAIRS and _plain_cells(q_cells, kv_cells, mask):
        return _ranges_relations(q_cells, kv_cells, mask)
    out = []
    for i, q in enumerate(q_cells):
        for j, k in enumerate(kv_cells):
            kind = classify(mask, q, k)
            if kind is not BlockKind.EMPTY:
                out.append((i, j, kind))
    return tuple(out)


VECTOR_PAIRS = 256
"""From this many pairs ``relations`` classifies them as tensors (USP's ring shards hold
``2 U`` cells each: 4,096 pairs a shard pair at ``U = 32``, where a loop of ``classify``
took seconds per schedule at 1,024 ranks)."""


def _plain_cells(q_cells: tuple[Cell, ...], kv_cells: tuple[Cell, ...], mask: Mask) -> bool:
    """One range per cell and one document: what ``_ranges_relations`` classifies."""
    return not mask.documents and all(len(c) == 1 for c in q_cells + kv_cells)


def _ranges_relations(
    q_cells: tuple[Cell, ...], kv_cells: tuple[Cell, ...], mask: Mask
) -> tuple[Element, ...]:
    """``relations`` of single-range cells under a window and causality alone, every pair
    at once: ``masks._range_kind``'s rules on the range of ``j - i`` over each block, in
    float64 (exact for positions below 2^53, infinite bounds where unbounded)."""
    code = _pair_codes(q_cells, kv_cells, mask)
    kinds = (BlockKind.EMPTY, BlockKind.FULL, BlockKind.DIAG, BlockKind.PARTIAL)
    found = code.nonzero().tolist()
    codes = code[code != 0].tolist()
    return tuple((i, j, kinds[c]) for (i, j), c in zip(found, codes))


def _pair_codes(q_cells: tuple[Cell, ...], kv_cells: tuple[Cell, ...], mask: Mask) -> torch.Tensor:
    """``[len(q_cells), len(kv_cells)]``: 0 EMPTY, 1 FULL, 2 DIAG, 3 PARTIAL, for
    single-range cells under a window and causality alone."""
    q = torch.tensor([c[0] for c in q_cells], dtype=torch.float64).reshape(-1, 2)
    k = torch.tensor([c[0] for c in kv_cells], dtype=torch.float64).reshape(-1, 2)
    (qa, qb), (ka, kb) = q.unbind(1), k.unbind(1)
    low, high = mask.offsets
    least = ka[None, :] - (qb[:, None] - 1)
    most = (kb[None, :] - 1) - qa[:, None]
    empty = (most < low) | (least > high) | (qa >= qb)[:, None] | (ka >= kb)[None, :]
    full = (least >= low) & (most <= high)
    same = (qa[:, None] == ka[None, :]) & (qb[:, None] == kb[None, :])
    diag = same & (least >= low) if high == 0 else torch.zeros_like(same)
    return torch.where(full, 1, torch.where(diag, 2, 3)).masked_fill(empty, 0)


def still_needed_spans(
    geometry: Geometry,
    mask: Mask,
    shards: tuple[tuple[int, ...], ...],
    owner: int,
    owner_queries: bool,
    direction: int,
) -> tuple[tuple[int, int], ...]:
    """Per step ``s`` (and an empty one after the last), the cells ``[start, stop)`` of
    shard ``owner`` that meet some cell of the shards ``owner + direction * t`` for
    ``t >= s`` (the owner's cells as queries, or as keys): what a ring must still carry
    of a travelling shard. Building any rank's schedule asks this of every owner, so it
    is answered for all owners at once where it can be (``_every_owner``)."""
    found = _every_owner(geometry, mask, shards, owner_queries, direction)
    if found is not None:
        return found[owner]
    P = len(shards)
    tables = (geometry.q, geometry.kv) if owner_queries else (geometry.kv, geometry.q)
    own = tables[0].cells(shards[owner])
    met = torch.zeros(1, P, len(own), dtype=torch.bool)
    for t in range(P):  # documents, or cells of several ranges: pair by pair
        cells = tables[1].cells(shards[(owner + direction * t) % P])
        pairs = relations(own, cells, mask) if owner_queries else relations(cells, own, mask)
        for i, j, _ in pairs:
            met[0, t, i if owner_queries else j] = True
    return _suffix_spans(met)[0]


@lru_cache(maxsize=16)
def _every_owner(
    geometry: Geometry,
    mask: Mask,
    shards: tuple[tuple[int, ...], ...],
    owner_queries: bool,
    direction: int,
) -> tuple[tuple[tuple[int, int], ...], ...] | None:
    """``still_needed_spans`` of every owner, from one classification of every shard's
    cells against every shard's; None unless the cells are single ranges in one document
    and every shard has as many."""
    P = len(shards)
    counts = {len(shard) for shard in shards}
    tables = (geometry.q, geometry.kv) if owner_queries else (geometry.kv, geometry.q)
    own = tuple(c for shard in shards for c in tables[0].cells(shard))
    other = tuple(c for shard in shards for c in tables[1].cells(shard))
    if len(counts) != 1 or not _plain_cells(own, other, mask):
        return None
    n = counts.pop()
    found: list = []
    chunk = max(1, PAIRS_AT_ONCE // (n * len(other)))  # owners classified together
    for o in range(0, P, chunk):
        mine = own[o * n : (o + chunk) * n]
        if owner_queries:
            codes = _pair_codes(mine, other, mask)
        else:
            codes = _pair_codes(other, mine, mask).T
        owners = codes.shape[0] // n
        meets = (codes != 0).view(owners, n, P, n).any(-1).transpose(1, 2)  # owner, shard, cell
        rows = torch.arange(o, o + owners)
        steps = (rows[:, None] + direction * torch.arange(P)[None, :]) % P
        found += _suffix_spans(meets[torch.arange(owners)[:, None], steps])
    return tuple(found)


PAIRS_AT_ONCE = 1 << 22
"""Cell pairs ``_every_owner`` classifies in one go (a few tens of MB of float64)."""


def _suffix_spans(met: torch.Tensor) -> tuple[tuple[tuple[int, int], ...], ...]:
    """``met[o, s, i]``: owner ``o``'s cell ``i`` meets step ``s``'s shard. Per owner and
    step, the span of the cells met from that step on, then an empty one."""
    later = met.to(torch.int8).flip(1).cummax(1).values.flip(1).bool()
    cells = later.shape[2]
    first = torch.where(later.any(2), later.to(torch.int8).argmax(2), 0)
    last = cells - later.flip(2).to(torch.int8).argmax(2)
    stop = torch.where(later.any(2), last, 0)
    return tuple((*zip(a, b), (0, 0)) for a, b in zip(first.tolist(), stop.tolist()))


@lru_cache(maxsize=1 << 16)
def piece_relations(
    geometry: Geometry, mask: Mask, q_pieces: tuple[int, ...], kv_pieces: tuple[int, ...]
) -> tuple[Element, ...]:
    """``relations`` of two runs of pieces of ``geometry``, remembered by the pieces:
    schedule building asks for every pair of shards, and finding their cells and hashing
    those (tuples of ranges) cost more than the answer."""
    return relations(geometry.q.cells(q_pieces), geometry.kv.cells(kv_pieces), mask)


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
def cover(elements: tuple[Element, ...], mix: bool = True) -> tuple[Block, ...]:
    """Cover exactly ``elements`` with few rectangular calls (remembered: every rank's
    schedule asks for the same few).

    Diagonal runs first (one causal call each), then the pairs left: per query
    cell, runs of consecutive key cells, stacked where neighbouring query cells
    have the same run; a call that holds a PARTIAL pair is a masked call. With
    ``mix=False`` FULL and PARTIAL pairs never share a call (so that the dense ones
    run on a kernel without a mask).
    """
    pairs = {(i, j): kind for i, j, kind in elements}
    squares = _causal_squares(pairs)
    covered = {(i, j) for s in squares for i in range(s.q0, s.q1) for j in range(s.k0, s.k1)}
    rest = sorted((i, j) for (i, j) in pairs if (i, j) not in covered)

    def masked(kind: BlockKind) -> bool:
        return not mix and kind is BlockKind.PARTIAL

    rows: list[tuple[int, int, int, list[BlockKind]]] = []  # (query cell, k0, k1, kinds)
    for i, j in rest:
        last = rows[-1] if rows else None
        if (
            last is not None and last[0] == i and last[2] == j
            and masked(pairs[(i, j)]) == masked(last[3][-1])
        ):  # fmt: skip
            rows[-1] = (i, last[1], j + 1, [*last[3], pairs[(i, j)]])
        else:
            rows.append((i, j, j + 1, [pairs[(i, j)]]))
    stacked: list[tuple[int, int, int, int, list[BlockKind]]] = []  # q0, q1, k0, k1, kinds
    open_at: dict[tuple[int, int, int, bool], int] = {}  # (k0, k1, q1, masked) -> index
    for i, k0, k1, kinds in rows:
        flag = masked(kinds[0])
        match = open_at.pop((k0, k1, i, flag), None)
        if match is None:
            match = len(stacked)
            stacked.append((i, i + 1, k0, k1, kinds))
        else:
            q0, _, _, _, before = stacked[match]
            stacked[match] = (q0, i + 1, k0, k1, before + kinds)
        open_at[(k0, k1, stacked[match][1], flag)] = match
    rectangles = [Block(q0, q1, k0, k1, combine(kinds)) for q0, q1, k0, k1, kinds in stacked]
    return tuple(sorted(squares + rectangles, key=lambda b: (b.q0, b.k0)))


SubCall = tuple[int, int, int, int, BlockKind]
"""One kernel call inside a block: query tokens [q0, q1) against key tokens [k0, k1),
offsets within the block, of kind FULL, DIAG or PARTIAL."""


def _tile(mask: Mask, cells: tuple[Cell, ...]) -> int:
    """The grid a window's band is cut on (0: none): half the window, a power of two,
    at least 4 and coarse enough that a block has at most 256 tiles per side."""
    if not mask.windowed:
        return 0
    reach = max(w for w in mask.window if w >= 0)
    tile = 4
    while tile * 2 <= reach // 2:
        tile *= 2
    span = sum(b - a for cell in cells for a, b in cell)
    while span > 256 * tile:
        tile *= 2
    return tile


def cut_cells(
    cells: tuple[Cell, ...], mask: Mask, tile: int = 0
) -> tuple[tuple[Cell, ...], list[int]]:
    """The block's cells cut into single ranges, at every run's end, every document
    boundary and every multiple of ``tile`` (0: none), each one cell of its own; and
    where each starts among the block's tokens (one more entry: the block's length)."""
    out: list[Cell] = []
    starts: list[int] = []
    offset = 0
    for cell in cells:
        for _, (a, b) in split_at_documents(mask, cell):
            while a < b:
                end = min(b, (a // tile + 1) * tile) if tile else b
                out.append(((a, end),))
                starts.append(offset)
                offset += end - a
                a = end
    starts.append(offset)
    return tuple(out), starts


@lru_cache(maxsize=1024)
def sub_calls(
    q_cells: tuple[Cell, ...], kv_cells: tuple[Cell, ...], mask: Mask
) -> tuple[SubCall, ...]:
    """The kernel calls that compute exactly the pairs ``mask`` allows between a block's
    query and key cells, as few as ``cover`` makes them.

    Cut at document boundaries and at the ends of runs, the cells become ranges that
    on the two sides of self-attention are equal or disjoint, and inside one document
    such ranges meet as FULL, DIAG or EMPTY under a causal or full mask: documents
    alone need no explicit mask at all, only dense and causal calls. Under a window
    the ranges are also cut on a grid of about half the window, so that tiles wholly
    inside the band are dense calls (merged into rectangles), tiles outside it are
    skipped, and only the tiles its edges cut (PARTIAL) take a mask.
    """
    q_sub, q_starts = cut_cells(q_cells, mask, _tile(mask, q_cells))
    kv_sub, kv_starts = cut_cells(kv_cells, mask, _tile(mask, kv_cells))
    # each cut cell lies in one document: only pairs within a document are classified
    # (sum of squares of the documents' cell counts, not the square of the block's)
    by_document: dict[int, list[int]] = {}
    for j, ((a, _),) in enumerate(kv_sub):
        by_document.setdefault(mask.document(a), []).append(j)
    elements = []
    for i, (span,) in enumerate(q_sub):
        for j in by_document.get(mask.document(span[0]), ()):
            kind = classify_in_document(mask, span, kv_sub[j][0])
            if kind is not BlockKind.EMPTY:
                elements.append((i, j, kind))
    return tuple(
        (q_starts[b.q0], q_starts[b.q1], kv_starts[b.k0], kv_starts[b.k1], b.kind)
        for b in cover(tuple(elements), mix=False)
    )

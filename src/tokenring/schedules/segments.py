"""Pure functions: a masked block as the sequences of one variable-length kernel call.

Kernels with variable-length batches and a sliding window (flash-attention's
``cu_seqlens`` and ``window_size``) compute many (queries, keys) pairs of ranges
in one launch, each under a window aligned to its bottom-right corner: query
``i`` of a sequence of ``sq`` queries and ``sk`` keys sees key ``j`` when
``i + sk - sq - left <= j <= i + sk - sq + right`` (``-1``: unbounded). A block
under documents and a window is such a batch: cut both sides at document
boundaries and run ends (``blocks.cut_cells``), and every (query range, key
range) pair of one document is one sequence, its window the mask's shifted by
how far the key range ends past the query range. Trimming each pair to the
queries that see a key and the keys that some query sees keeps both window sides
non-negative and no query row empty.

Pairs sharing a query range are joined where the join is still one window: keys
that every query sees, followed by keys under a window without a left edge (a
document's earlier chunks and its causal diagonal, zigzag's case), are one
sequence, so each query row is computed once and written, not merged. Sequences
with the same window form one call (``groups``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise

from .blocks import cut_cells
from .geometry import Span
from .masks import Cell, Mask

__all__ = ["Segment", "VarlenBlock", "varlen_block"]


@dataclass(frozen=True)
class Segment:
    """Query tokens ``[q0, q1)`` of a block against the key tokens of ``keys`` (ranges
    of the block's key tokens, concatenated in position order) under a bottom-right
    window ``(left, right)``."""

    q0: int
    q1: int
    keys: tuple[Span, ...]
    left: int
    right: int

    @property
    def len_k(self) -> int:
        return sum(b - a for a, b in self.keys)

    @property
    def pairs(self) -> int:
        """How many (query, key) pairs the window lets attend: query ``i`` sees keys
        ``max(0, i + shift - left) .. min(sk - 1, i + shift + right)`` (``shift = sk -
        sq``), never none (the segment is trimmed), summed in closed form."""
        sq, sk = self.q1 - self.q0, self.len_k
        shift = sk - sq
        high = sq * (sk - 1) if self.right < 0 else _sum_min(sq, shift + self.right, sk - 1)
        low = 0 if self.left < 0 else _sum_max0(sq, shift - self.left)
        return high - low + sq


def _sum_max0(n: int, a: int) -> int:
    """``sum(max(0, i + a) for i in range(n))``."""
    start = max(0, -a)
    if start >= n:
        return 0
    return (start + a + n - 1 + a) * (n - start) // 2


def _sum_min(n: int, b: int, c: int) -> int:
    """``sum(min(c, i + b) for i in range(n))``."""
    free = min(n, max(0, c - b + 1))  # rows below the clamp
    return (2 * b + free - 1) * free // 2 + c * (n - free)


@dataclass(frozen=True)
class VarlenBlock:
    """A block as variable-length calls: ``groups`` of segments with one window each
    and distinct query rows within a group; ``disjoint``: no query row in two segments
    (results are written, not merged); ``every_row``: and every row in one."""

    groups: tuple[tuple[Segment, ...], ...]
    disjoint: bool
    every_row: bool

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        """Per group: its query rows and the pairs it computes (what the planner prices)."""
        return tuple((sum(s.q1 - s.q0 for s in g), sum(s.pairs for s in g)) for g in self.groups)


def _pair(mask: Mask, q: Span, k: Span, q_at: int, k_at: int) -> Segment | None:
    """Queries at positions ``q`` against keys at ``k`` (one document; ``q_at``,
    ``k_at``: where they start in the block), trimmed, with the window that maps the
    mask onto bottom-right alignment; None when no pair attends."""
    low, high = mask.offsets  # allowed k - q
    (qa, qb), (ka, kb) = q, k
    # queries that see a key: ka <= i + high and i + low <= kb - 1
    qa2 = qa if high == math.inf else max(qa, ka - int(high))
    qb2 = qb if low == -math.inf else min(qb, kb - int(low))
    if qa2 >= qb2:
        return None
    ka2 = ka if low == -math.inf else max(ka, qa2 + int(low))
    kb2 = kb if high == math.inf else min(kb, qb2 + int(high))
    sq, sk, end = qb2 - qa2, kb2 - ka2, kb2 - qb2  # end: how far the keys end past
    left = -1 if low == -math.inf else -int(low) + end
    right = -1 if high == math.inf else int(high) - end
    if left >= sk - 1:  # the last query sees the first key: no left edge inside
        left = -1
    if right >= sq - 1:  # the first query sees the last key: no right edge inside
        right = -1
    return Segment(q_at + qa2 - qa, q_at + qb2 - qa, ((k_at + ka2 - ka, k_at + kb2 - ka),),
                   left, right)  # fmt: skip


def _join(parts: list[tuple[int, Segment]]) -> list[Segment]:
    """Segments of one query range (with their keys' first positions), joined where
    keys every query sees are followed by keys under a window without a left edge."""
    parts.sort(key=lambda p: p[0])
    joined: list[Segment] = []
    dense: list[Segment] = []  # a run of every-pair segments waiting for a closing one
    for _, seg in parts:
        if seg.left == -1 and dense:
            keys = tuple(r for d in dense for r in d.keys) + seg.keys
            right = seg.right
            if right >= seg.q1 - seg.q0 - 1:
                right = -1
            seg = Segment(seg.q0, seg.q1, keys, -1, right)
            dense = []
        if seg.left == -1 and seg.right == -1:
            dense.append(seg)
        else:
            joined.extend(dense)
            dense = []
            joined.append(seg)
    if dense:  # several every-pair segments in a row are one too
        keys = tuple(r for d in dense for r in d.keys)
        joined.append(Segment(dense[0].q0, dense[0].q1, keys, -1, -1))
    return joined


@lru_cache(maxsize=1024)
def varlen_block(q_cells: tuple[Cell, ...], kv_cells: tuple[Cell, ...], mask: Mask) -> VarlenBlock:
    """The variable-length calls that compute exactly the pairs ``mask`` allows between
    a block's query and key cells (remembered: every rank's schedule asks for the same)."""
    q_sub, q_starts = _runs(*cut_cells(q_cells, mask), mask)
    kv_sub, kv_starts = _runs(*cut_cells(kv_cells, mask), mask)
    by_document: dict[int, list[int]] = {}
    for j, ((a, _),) in enumerate(kv_sub):
        by_document.setdefault(mask.document(a), []).append(j)
    segments: list[Segment] = []
    for i, (span,) in enumerate(q_sub):
        by_rows: dict[tuple[int, int], list[tuple[int, Segment]]] = {}
        for j in by_document.get(mask.document(span[0]), ()):
            seg = _pair(mask, span, kv_sub[j][0], q_starts[i], kv_starts[j])
            if seg is not None:
                first = kv_sub[j][0][0] + seg.keys[0][0] - kv_starts[j]
                by_rows.setdefault((seg.q0, seg.q1), []).append((first, seg))
        for parts in by_rows.values():
            segments.extend(_join(parts))
    spans = sorted((s.q0, s.q1) for s in segments)
    disjoint = all(a[1] <= b[0] for a, b in pairwise(spans))
    every_row = disjoint and sum(b - a for a, b in spans) == q_starts[-1]
    return VarlenBlock(_groups(segments), disjoint, every_row)


def _runs(cells: tuple[Cell, ...], starts: list[int], mask: Mask) -> tuple[list[Cell], list[int]]:
    """Cut cells joined again where one continues the last (consecutive positions, one
    document): a contiguous shard of several pieces is one range, one sequence."""
    out: list[Cell] = []
    at: list[int] = []
    for ((a, b),), start in zip(cells, starts, strict=False):
        if out and out[-1][0][1] == a and mask.document(a) == mask.document(a - 1):
            out[-1] = ((out[-1][0][0], b),)
        else:
            out.append(((a, b),))
            at.append(start)
    at.append(starts[-1])
    return out, at


def _groups(segments: list[Segment]) -> tuple[tuple[Segment, ...], ...]:
    """Segments by window, each group's query rows distinct (a row's result of one call
    is written at one place). Taken in order of their first row, a segment overlaps a
    group's rows exactly when it starts before the group's last row ends."""
    groups: list[list[Segment]] = []
    open_by_window: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (end, group)
    for seg in sorted(segments, key=lambda s: (s.q0, s.q1)):
        candidates = open_by_window.setdefault((seg.left, seg.right), [])
        for n, (end, index) in enumerate(candidates):
            if seg.q0 >= end:
                groups[index].append(seg)
                candidates[n] = (seg.q1, index)
                break
        else:
            candidates.append((seg.q1, len(groups)))
            groups.append([seg])
    return tuple(tuple(g) for g in groups)

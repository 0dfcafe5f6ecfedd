"""Masks over global token positions, and how one decides a block.

A ``Mask`` says which (query position, key position) pairs attend, in the
positions of the whole sequence (never of a block): causal or not, a sliding
window ``(left, right)``, and documents packed in the sequence (a pair attends
only inside one document). ``classify`` decides a (query cell, key cell) pair
from their positions alone, a cell being the ranges of positions of one piece
(``PieceTable.cell``):

- ``EMPTY``: no pair attends (or a cell holds no tokens): nothing to compute, and
  nothing to send for it;
- ``FULL``: every pair attends: a kernel call without a mask;
- ``DIAG``: one range on both sides, under a mask that is causal inside it (top-left
  and bottom-right alignment agree on a square): a causal kernel call;
- ``PARTIAL``: anything else: a kernel call with an explicit mask built from the
  positions (``allowed``).

Causal attention over one unpacked sequence only ever gives EMPTY, FULL and DIAG
(pieces are equal or disjoint); documents, windows, and queries and keys with
pieces of their own give PARTIAL blocks. Pure: no process state.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass, field
from enum import Enum

import torch

from .geometry import Span

__all__ = [
    "BlockKind",
    "Cell",
    "Mask",
    "classify",
    "classify_in_document",
    "combine",
    "split_at_documents",
]

Cell = tuple[Span, ...]
"""The positions of one piece: ranges ``[a, b)`` of global positions."""


class BlockKind(str, Enum):
    """How a block of queries meets a block of keys under a mask (see the module)."""

    EMPTY = "empty"
    FULL = "full"
    DIAG = "diag"
    PARTIAL = "partial"


@dataclass(frozen=True)
class Mask:
    """Which pairs attend, over global positions. Query ``i`` sees key ``j`` when all of:
    ``j <= i`` if ``causal``; ``i - left <= j <= i + right`` for ``window = (left,
    right)`` (``-1``: unbounded on that side; under ``causal`` the right side is 0); and
    ``i`` and ``j`` lie in one document, ``documents`` being the documents' offsets
    ``[0, ..., S]`` (flash-attention's ``cu_seqlens``; empty: one document)."""

    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    documents: tuple[int, ...] = ()
    _hash: int = field(default=0, compare=False, repr=False)

    def __post_init__(self) -> None:
        left, right = self.window
        if self.causal:
            right = 0
        object.__setattr__(self, "window", (left, right))
        if len(self.documents) <= 2:  # one document: no boundary to respect
            object.__setattr__(self, "documents", ())
        object.__setattr__(self, "_hash", hash((self.causal, self.window, self.documents)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def windowed(self) -> bool:
        """A sliding window beyond what causality already says."""
        return self.window != ((-1, 0) if self.causal else (-1, -1))

    @property
    def plain(self) -> bool:
        """Full or causal only: no window, one document."""
        return not self.windowed and not self.documents

    @property
    def offsets(self) -> tuple[float, float]:
        """The allowed range of ``j - i`` inside a document (infinite where unbounded)."""
        left, right = self.window
        return (-left if left >= 0 else -math.inf, right if right >= 0 else math.inf)

    @property
    def mean_document(self) -> int:
        """The mean document length in tokens (0: one document)."""
        if not self.documents:
            return 0
        return max(1, round(self.documents[-1] / (len(self.documents) - 1)))

    def document(self, position: int) -> int:
        """The index of the document holding ``position`` (0 with one document)."""
        return bisect_right(self.documents, position) - 1 if self.documents else 0

    def allows(self, q_position: int, k_position: int) -> bool:
        """Whether the query at ``q_position`` attends the key at ``k_position``."""
        low, high = self.offsets
        if not low <= k_position - q_position <= high:
            return False
        return self.document(q_position) == self.document(k_position)

    def allowed(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
        """Boolean ``[len(q), len(k)]``: which pairs attend (``q_positions`` and
        ``k_positions``: 1-D integer tensors of global positions)."""
        shape = (q_positions.shape[0], k_positions.shape[0])
        ok = torch.ones(shape, dtype=torch.bool, device=q_positions.device)
        offset = k_positions[None, :] - q_positions[:, None]
        low, high = self.offsets
        if low > -math.inf:
            ok &= offset >= low
        if high < math.inf:
            ok &= offset <= high
        if self.documents:
            bounds = torch.tensor(self.documents, device=q_positions.device)
            qd = torch.bucketize(q_positions, bounds, right=True)
            kd = torch.bucketize(k_positions, bounds, right=True)
            ok &= qd[:, None] == kd[None, :]
        return ok

    def describe(self) -> str:
        parts = ["causal" if self.causal else "full"]
        if self.windowed:
            parts.append(f"window {self.window}")
        if self.documents:
            parts.append(f"{len(self.documents) - 1} documents")
        return ", ".join(parts)


def _range_kind(mask: Mask, q: Span, k: Span) -> BlockKind:
    """Queries ``q`` against keys ``k``, two non-empty ranges inside one document."""
    low, high = mask.offsets
    (qa, qb), (ka, kb) = q, k
    least, most = ka - (qb - 1), (kb - 1) - qa  # the range of j - i over the block
    if most < low or least > high:
        return BlockKind.EMPTY
    if least >= low and most <= high:
        return BlockKind.FULL
    if q == k and high == 0 and least >= low:
        return BlockKind.DIAG
    return BlockKind.PARTIAL


def classify_in_document(mask: Mask, q: Span, k: Span) -> BlockKind:
    """``classify`` of two non-empty ranges known to lie in one document (what the
    document-cut cells of ``blocks.sub_calls`` are): the window and causality alone."""
    return _range_kind(mask, q, k)


def split_at_documents(mask: Mask, cell: Cell) -> list[tuple[int, Span]]:
    """The non-empty ranges of ``cell`` cut at document boundaries, with their document."""
    found = []
    for a, b in cell:
        while a < b:
            doc = mask.document(a)
            end = min(b, mask.documents[doc + 1]) if mask.documents else b
            found.append((doc, (a, end)))
            a = end
    return found


def classify(mask: Mask, q: Cell, k: Cell) -> BlockKind:
    """How queries at positions ``q`` meet keys at positions ``k`` (each a tuple of
    ranges ``[a, b)``)."""
    if len(q) == 1 and len(k) == 1 and not mask.documents:  # every unpacked layout
        (qa, qb), (ka, kb) = q[0], k[0]
        if qa >= qb or ka >= kb:
            return BlockKind.EMPTY
        return _range_kind(mask, q[0], k[0])
    qs, ks = split_at_documents(mask, q), split_at_documents(mask, k)
    if not qs or not ks:
        return BlockKind.EMPTY
    if len(qs) == 1 and len(ks) == 1:
        return BlockKind.EMPTY if qs[0][0] != ks[0][0] else _range_kind(mask, qs[0][1], ks[0][1])
    by_doc: dict[int, list[Span]] = {}
    for doc, span in ks:
        by_doc.setdefault(doc, []).append(span)
    kinds = [_range_kind(mask, span, other) for doc, span in qs for other in by_doc.get(doc, ())]
    if all(kind is BlockKind.EMPTY for kind in kinds):
        return BlockKind.EMPTY
    every_pair = len(kinds) == len(qs) * len(ks)  # no pair across documents
    if every_pair and all(kind is BlockKind.FULL for kind in kinds):
        return BlockKind.FULL
    return BlockKind.PARTIAL


def combine(kinds: list[BlockKind]) -> BlockKind:
    """The kind of one kernel call over several non-empty pairs that are all FULL (a
    FULL call) or include a PARTIAL one (a masked call)."""
    return BlockKind.PARTIAL if BlockKind.PARTIAL in kinds else BlockKind.FULL

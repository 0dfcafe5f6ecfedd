"""Masks over global token positions, and how one decides a block.

A ``Mask`` says which (query position, key position) pairs attend, in the
positions of the whole sequence (never of a block). ``classify`` decides a
(query piece, key piece) pair from their token ranges alone:

- ``EMPTY``: no pair attends (or a piece holds no tokens): nothing to compute, and
  nothing to send for it;
- ``FULL``: every pair attends: a kernel call without a mask;
- ``DIAG``: the same range on both sides under a causal mask: a causal kernel call
  (top-left and bottom-right alignment agree on a square);
- ``PARTIAL``: anything else: a kernel call with an explicit mask built from the
  positions (``allowed``).

Causal attention over one sharded sequence only ever gives EMPTY, FULL and DIAG
(pieces are equal or disjoint); queries and keys with their own pieces (a KV
cache, other layouts) give PARTIAL blocks. Pure: no process state.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from .geometry import Span

__all__ = ["BlockKind", "Mask", "classify", "combine"]


class BlockKind(str, Enum):
    """How a block of queries meets a block of keys under a mask (see the module)."""

    EMPTY = "empty"
    FULL = "full"
    DIAG = "diag"
    PARTIAL = "partial"


@dataclass(frozen=True)
class Mask:
    """Which pairs attend, over global positions. ``causal``: query ``i`` sees key ``j``
    when ``j <= i``; otherwise every pair."""

    causal: bool = False

    def allows(self, q_position: int, k_position: int) -> bool:
        """Whether the query at ``q_position`` attends the key at ``k_position``."""
        return not self.causal or k_position <= q_position

    def allowed(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
        """Boolean ``[len(q), len(k)]``: which pairs attend (``q_positions`` and
        ``k_positions``: 1-D integer tensors of global positions)."""
        if not self.causal:
            shape = (q_positions.shape[0], k_positions.shape[0])
            return torch.ones(shape, dtype=torch.bool, device=q_positions.device)
        return k_positions[None, :] <= q_positions[:, None]

    def describe(self) -> str:
        return "causal" if self.causal else "full"


def classify(mask: Mask, q: Span, k: Span) -> BlockKind:
    """How queries at positions ``q`` meet keys at positions ``k`` (ranges ``[a, b)``)."""
    (qa, qb), (ka, kb) = q, k
    if qa >= qb or ka >= kb:
        return BlockKind.EMPTY
    if not mask.causal:
        return BlockKind.FULL
    if ka >= qb:  # every key after every query
        return BlockKind.EMPTY
    if kb - 1 <= qa:  # every key at or before every query
        return BlockKind.FULL
    if (qa, qb) == (ka, kb):
        return BlockKind.DIAG
    return BlockKind.PARTIAL


def combine(kinds: list[BlockKind]) -> BlockKind:
    """The kind of one kernel call over several non-empty pairs that are all FULL (a
    FULL call) or include a PARTIAL one (a masked call)."""
    return BlockKind.PARTIAL if BlockKind.PARTIAL in kinds else BlockKind.FULL

"""Sharding contract, as arithmetic: which pieces of the global sequence each rank holds.

Pure functions (no process state); ``tokenring.api.sharding`` applies them to tensors.
See docs/algorithms.md, "Layouts".
"""

from __future__ import annotations

from ..options import Layout

__all__ = ["cell_offset", "check_global_length", "chunk_ids", "local_bounds", "mesh_pieces"]


def chunk_ids(layout: Layout, world: int, rank: int) -> tuple[int, int]:
    """Global chunk indices (out of 2*world) held by ``rank``, in local order."""
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
    is the 1-D layout over the other axis.
    """
    if layout is Layout.CONTIGUOUS:
        shard = r * ulysses + u
        return (2 * shard, 2 * shard + 1)
    return (r * ulysses + u, (2 * ring - 1 - r) * ulysses + (ulysses - 1 - u))


def local_bounds(length: int) -> tuple[int, int, int]:
    """Token offsets of the two sub-chunks inside a local shard of ``length`` tokens."""
    return (0, length // 2, length)


def cell_offset(length: int, cell: int) -> int:
    """Token offset of ``cell`` in a run of cells (a shard, or shards gathered in global
    order), when every rank holds ``length`` tokens: cell ``i`` is as long as the
    local sub-chunk ``i % 2``."""
    return (cell // 2) * length + (cell % 2) * (length // 2)


def check_global_length(layout: Layout, world: int, length: int, argument: str = "x") -> None:
    """Raise ValueError unless a global sequence of ``length`` tokens can be sharded."""
    parts = 2 * world if layout is Layout.ZIGZAG else world
    if length <= 0 or length % parts:
        raise ValueError(
            f"{argument}: the {layout.value} layout over {world} ranks needs a sequence length "
            f"divisible by {parts}, got {length}"
        )

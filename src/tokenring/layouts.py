"""Sharding contract: which tokens of the global sequence each rank holds.

Every layout cuts the sequence into ``2P`` chunks and gives each rank two of
them, in increasing global order (see docs/algorithms.md, "Layouts"):

- ``contiguous``: rank r holds chunks 2r and 2r+1 (its tokens are one block);
- ``zigzag``: rank r holds chunks r and 2P-1-r (balanced causal work).

The two local halves are the *sub-chunks* that schedules address. For
zigzag the global sequence must split into 2P equal chunks; for contiguous
only into P equal shards (the halves of a shard may then differ by one token).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .options import Layout, parse_enum

__all__ = ["cell_offset", "check_global_length", "chunk_ids", "local_bounds", "shard", "unshard"]


def chunk_ids(layout: Layout, world: int, rank: int) -> tuple[int, int]:
    """Global chunk indices (out of 2*world) held by ``rank``, in local order."""
    if layout is Layout.CONTIGUOUS:
        return (2 * rank, 2 * rank + 1)
    return (rank, 2 * world - 1 - rank)


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


def _group_info(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialized")
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _global_chunks(x: torch.Tensor, layout: Layout, world: int, dim: int) -> list[torch.Tensor]:
    """Split a global tensor into its 2*world chunks (contiguous halves may be uneven)."""
    length = x.shape[dim]
    if layout is Layout.ZIGZAG:
        return list(x.split(length // (2 * world), dim=dim))
    shard_len = length // world
    lo, mid, hi = local_bounds(shard_len)
    sizes = [mid - lo, hi - mid] * world
    return list(x.split(sizes, dim=dim))


def _take(x: torch.Tensor, layout: Layout, world: int, rank: int, dim: int) -> torch.Tensor:
    """This rank's shard of a global tensor (a contiguous copy)."""
    chunks = _global_chunks(x, layout, world, dim)
    first, second = chunk_ids(layout, world, rank)
    return torch.cat([chunks[first], chunks[second]], dim=dim).contiguous()


def _gather(
    x_local: torch.Tensor, layout: Layout, world: int, group: dist.ProcessGroup | None, dim: int
) -> torch.Tensor:
    """Every rank's shard, in global order (an all-gather over ``group``)."""
    local = x_local.contiguous()
    if world == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=group)
    chunks: list[torch.Tensor] = [local] * (2 * world)
    for rank, part in enumerate(parts):
        lo, mid, hi = local_bounds(part.shape[dim])
        first, second = chunk_ids(layout, world, rank)
        chunks[first] = part.narrow(dim, lo, mid - lo)
        chunks[second] = part.narrow(dim, mid, hi - mid)
    return torch.cat(chunks, dim=dim)


class _Shard(torch.autograd.Function):
    """Replicated -> sharded. The gradient of a replicated input is the sum of every
    rank's contribution, so the backward gathers the shards' gradients."""

    @staticmethod
    def forward(ctx, x, layout, world, rank, group, dim):
        ctx.args = (layout, world, group, dim)
        return _take(x, layout, world, rank, dim)

    @staticmethod
    def backward(ctx, grad):
        layout, world, group, dim = ctx.args
        return _gather(grad, layout, world, group, dim), None, None, None, None, None


class _Unshard(torch.autograd.Function):
    """Sharded -> replicated. Every rank holds the same output and the same gradient
    of it, so each shard's gradient is its own slice (no sum over ranks)."""

    @staticmethod
    def forward(ctx, x_local, layout, world, rank, group, dim):
        ctx.args = (layout, world, rank, dim)
        return _gather(x_local, layout, world, group, dim)

    @staticmethod
    def backward(ctx, grad):
        layout, world, rank, dim = ctx.args
        return _take(grad, layout, world, rank, dim), None, None, None, None, None


def shard(
    x: torch.Tensor, *, layout: str | Layout, group: dist.ProcessGroup | None = None, dim: int = 1
) -> torch.Tensor:
    """Return this rank's part of the global tensor ``x`` (a contiguous copy).

    ``x`` is the full tensor, identical on every rank; ``dim`` is its sequence
    dimension (1 for ``[batch, seq, heads, head_dim]``). Differentiable: the
    gradient of ``x`` is gathered from every rank's shard (a collective in the
    backward pass), as befits a replicated tensor.
    """
    layout = parse_enum(Layout, layout, "layout")
    world, rank = _group_info(group)
    dim = dim % x.dim()
    check_global_length(layout, world, x.shape[dim])
    return _Shard.apply(x, layout, world, rank, group, dim)


def unshard(
    x_local: torch.Tensor,
    *,
    layout: str | Layout,
    group: dist.ProcessGroup | None = None,
    dim: int = 1,
) -> torch.Tensor:
    """Gather every rank's shard and return the full tensor, in global order, on every rank.

    Differentiable: every rank is assumed to hold the same gradient of the
    full result (a replicated loss), and each shard receives its own slice.
    """
    layout = parse_enum(Layout, layout, "layout")
    world, rank = _group_info(group)
    dim = dim % x_local.dim()
    return _Unshard.apply(x_local, layout, world, rank, group, dim)

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

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..options import Layout, parse_enum
from ..runtime import runtime
from ..schedules.geometry import check_global_length, chunk_ids, local_bounds, mesh_pieces

__all__ = ["shard", "unshard"]


@dataclass(frozen=True)
class _Sharding:
    """Who holds what: the layout over ``world`` shards, this rank's pieces, and the
    pieces of each rank of the group that gathers them (in its rank order)."""

    layout: Layout
    world: int
    mine: tuple[int, int]
    pieces: tuple[tuple[int, int], ...]
    group: dist.ProcessGroup | None


def _sharding(layout: Layout, group: dist.ProcessGroup | None, mesh: object) -> _Sharding:
    if mesh is not None:
        if group is not None:
            raise ValueError("give group= or mesh=, not both")
        return _mesh_sharding(layout, mesh)
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialized")
        return _Sharding(layout, 1, chunk_ids(layout, 1, 0), (chunk_ids(layout, 1, 0),), None)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    pieces = tuple(chunk_ids(layout, world, r) for r in range(world))
    return _Sharding(layout, world, pieces[rank], pieces, group)


def _mesh_sharding(layout: Layout, mesh: object) -> _Sharding:
    """The ring x ulysses sub-mesh of ``mesh`` this rank is in (``mesh_pieces``)."""
    rt = runtime()
    sp = rt.sp_mesh(mesh)
    group = rt.sp_group(sp.members)

    def of(global_rank: int) -> tuple[int, int]:
        r, u = sp.coords(sp.members.index(global_rank))
        return mesh_pieces(layout, sp.ring, sp.ulysses, r, u)

    order = sorted(sp.members)  # group ranks follow the sorted global ranks
    return _Sharding(
        layout, sp.size, mesh_pieces(layout, sp.ring, sp.ulysses, sp.r, sp.u),
        tuple(of(g) for g in order), group,
    )  # fmt: skip


def _global_chunks(x: torch.Tensor, layout: Layout, world: int, dim: int) -> list[torch.Tensor]:
    """Split a global tensor into its 2*world chunks (contiguous halves may be uneven)."""
    length = x.shape[dim]
    if layout is Layout.ZIGZAG:
        return list(x.split(length // (2 * world), dim=dim))
    shard_len = length // world
    lo, mid, hi = local_bounds(shard_len)
    sizes = [mid - lo, hi - mid] * world
    return list(x.split(sizes, dim=dim))


def _take(x: torch.Tensor, how: _Sharding, dim: int) -> torch.Tensor:
    """This rank's shard of a global tensor (a contiguous copy)."""
    chunks = _global_chunks(x, how.layout, how.world, dim)
    first, second = how.mine
    return torch.cat([chunks[first], chunks[second]], dim=dim).contiguous()


def _gather(x_local: torch.Tensor, how: _Sharding, dim: int) -> torch.Tensor:
    """Every rank's shard, in global order (an all-gather over the sharding's group)."""
    local = x_local.contiguous()
    if how.world == 1:
        return local
    parts = [torch.empty_like(local) for _ in how.pieces]
    dist.all_gather(parts, local, group=how.group)
    chunks: list[torch.Tensor] = [local] * (2 * how.world)
    for (first, second), part in zip(how.pieces, parts):
        lo, mid, hi = local_bounds(part.shape[dim])
        chunks[first] = part.narrow(dim, lo, mid - lo)
        chunks[second] = part.narrow(dim, mid, hi - mid)
    return torch.cat(chunks, dim=dim)


class _Shard(torch.autograd.Function):
    """Replicated -> sharded. The gradient of a replicated input is the sum of every
    rank's contribution, so the backward gathers the shards' gradients."""

    @staticmethod
    def forward(ctx, x, how, dim):
        ctx.args = (how, dim)
        return _take(x, how, dim)

    @staticmethod
    def backward(ctx, grad):
        how, dim = ctx.args
        return _gather(grad, how, dim), None, None


class _Unshard(torch.autograd.Function):
    """Sharded -> replicated. Every rank holds the same output and the same gradient
    of it, so each shard's gradient is its own slice (no sum over ranks)."""

    @staticmethod
    def forward(ctx, x_local, how, dim):
        ctx.args = (how, dim)
        return _gather(x_local, how, dim)

    @staticmethod
    def backward(ctx, grad):
        how, dim = ctx.args
        return _take(grad, how, dim), None, None


def shard(
    x: torch.Tensor,
    *,
    layout: str | Layout,
    group: dist.ProcessGroup | None = None,
    mesh: object = None,
    dim: int = 1,
) -> torch.Tensor:
    """Return this rank's part of the global tensor ``x`` (a contiguous copy).

    ``x`` is the full tensor, identical on every rank; ``dim`` is its sequence
    dimension (1 for ``[batch, seq, heads, head_dim]``). ``group``: the ranks the
    sequence is sharded over (1-D strategies); ``mesh``: a DeviceMesh with dims
    ``"ring"`` and ``"ulysses"`` (``strategy="usp"``), where rank (r, u) holds
    ``mesh_pieces(layout, ring, ulysses, r, u)``. Differentiable: the gradient of
    ``x`` is gathered from every rank's shard (a collective in the backward
    pass), as befits a replicated tensor.
    """
    layout = parse_enum(Layout, layout, "layout")
    how = _sharding(layout, group, mesh)
    dim = dim % x.dim()
    check_global_length(layout, how.world, x.shape[dim])
    return _Shard.apply(x, how, dim)


def unshard(
    x_local: torch.Tensor,
    *,
    layout: str | Layout,
    group: dist.ProcessGroup | None = None,
    mesh: object = None,
    dim: int = 1,
) -> torch.Tensor:
    """Gather every rank's shard and return the full tensor, in global order, on every rank.

    ``group`` or ``mesh`` as for ``shard``. Differentiable: every rank is assumed
    to hold the same gradient of the full result (a replicated loss), and each
    shard receives its own slice.
    """
    layout = parse_enum(Layout, layout, "layout")
    how = _sharding(layout, group, mesh)
    dim = dim % x_local.dim()
    return _Unshard.apply(x_local, how, dim)

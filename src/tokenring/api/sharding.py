"""``shard`` and ``unshard``: a global tensor to this rank's part and back, differentiable.

Which tokens each rank holds is the layouts' arithmetic (``schedules.geometry``,
docs/algorithms.md "Layouts"): any sequence length, the remainder spread so that
per-rank lengths differ by at most one token; with ``cu_seqlens`` the zigzag
layout is cut per document ("Packed sequences" there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..call.packing import read_documents
from ..execution.comm import group_ranks, group_world
from ..execution.operations import TransferFailed
from ..options import Layout, parse_enum
from ..runtime import runtime
from ..runtime.agreement import exchange
from ..schedules.geometry import PieceTable, chunk_ids, mesh_pieces, piece_table

__all__ = ["shard", "unshard"]


@dataclass(frozen=True)
class _Sharding:
    """Who holds what: the layout over ``world`` shards, this rank's pieces, and the
    pieces of each rank of the group that gathers them (in its rank order)."""

    layout: Layout
    world: int
    rank: int  # this rank's index in ``pieces``
    pieces: tuple[tuple[int, int], ...]
    group: dist.ProcessGroup | None

    @property
    def mine(self) -> tuple[int, int]:
        return self.pieces[self.rank]


def _sharding(layout: Layout, group: dist.ProcessGroup | None, mesh: object) -> _Sharding:
    """Who holds what for ``layout`` over ``group`` (one rank without torch.distributed)
    or over ``mesh``."""
    if mesh is not None:
        if group is not None:
            raise ValueError("give group= or mesh=, not both")
        return _mesh_sharding(layout, mesh)
    world, rank = group_world(group)  # refuses a launch of several ranks without a group
    pieces = tuple(chunk_ids(layout, world, r) for r in range(world))
    return _Sharding(layout, world, rank, pieces, group)


def _mesh_sharding(layout: Layout, mesh: object) -> _Sharding:
    """The ring x ulysses sub-mesh of ``mesh`` this rank is in (``mesh_pieces``)."""
    rt = runtime()
    sp = rt.sp_mesh(mesh)
    group = rt.sp_group(sp.members)

    def of(global_rank: int) -> tuple[int, int]:
        r, u = sp.coords(sp.members.index(global_rank))
        return mesh_pieces(layout, sp.ring, sp.ulysses, r, u)

    order = sorted(sp.members)  # group ranks follow the sorted global ranks
    me = order.index(sp.members[sp.rank])
    return _Sharding(layout, sp.size, me, tuple(of(g) for g in order), group)


def _take(x: torch.Tensor, how: _Sharding, table: PieceTable, dim: int) -> torch.Tensor:
    """This rank's part of a global tensor (a contiguous copy): its pieces in order, each
    piece's runs of positions in order."""
    parts = [x.narrow(dim, a, b - a) for piece in how.mine for a, b in table.cell(piece)]
    return torch.cat(parts, dim=dim).contiguous() if parts else x.narrow(dim, 0, 0).contiguous()


def _gather(x_local: torch.Tensor, how: _Sharding, table: PieceTable, dim: int) -> torch.Tensor:
    """Every rank's part, in global order (one all-gather over the sharding's group; parts
    of unequal length travel padded to the longest)."""
    local = x_local.contiguous()
    if how.world == 1:
        return local
    lengths = [table.tokens(p) for p in how.pieces]
    longest = max(lengths)
    if local.shape[dim] < longest:
        pad = list(local.shape)
        pad[dim] = longest - local.shape[dim]
        local = torch.cat([local, local.new_zeros(pad)], dim=dim)
    parts = [torch.empty_like(local) for _ in how.pieces]
    dist.all_gather(parts, local, group=how.group)
    runs: list[tuple[int, torch.Tensor]] = []  # (first position, its tokens)
    for pieces, part in zip(how.pieces, parts):
        offset = 0
        for piece in pieces:
            for a, b in table.cell(piece):
                runs.append((a, part.narrow(dim, offset, b - a)))
                offset += b - a
    runs.sort(key=lambda run: run[0])
    return torch.cat([t for _, t in runs], dim=dim)


def _differing(values: list, reference: object) -> list[int]:
    """Group ranks whose value is not ``reference``."""
    return [r for r, value in enumerate(values) if value != reference]


def _ranks(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def _check_replicated(x: torch.Tensor, how: _Sharding) -> None:
    """Raise the same ValueError on every rank of the sharding's group unless ``x`` is
    bitwise the same tensor on all of them (``shard(check=True)``): shape and dtype
    exchanged first (over the group's lanes, within the runtime's timeout), then group
    rank 0's bytes broadcast and compared on every rank, and the verdicts exchanged."""
    if how.world == 1:
        return
    rt = runtime()
    lanes, timeout = rt.lanes(how.group), rt.settings.timeout
    where = "shard(check=True): the global tensor differs across ranks"
    advice = "it must be the same full tensor on every rank (the same seed, or the same batch)"
    try:
        records = exchange((tuple(x.shape), str(x.dtype)), lanes, timeout)
        odd = _differing(records, records[0])
        if odd:
            shapes = [f"rank {r} has shape {records[r][0]} {records[r][1]}" for r in [0, *odd]]
            raise ValueError(f"{where}: {', '.join(shapes)}; {advice}")
        mine = x.detach().contiguous().reshape(-1).view(torch.uint8)
        first = mine.clone() if how.rank == 0 else torch.empty_like(mine)
        dist.broadcast(first, src=group_ranks(how.group)[0], group=how.group)
        odd = _differing(exchange(torch.equal(mine, first), lanes, timeout), True)
    except RuntimeError as err:
        raise TransferFailed(
            f"tokenring: shard(check=True) compares the global tensor across every rank of "
            f"the group, and not every rank took part within the timeout of "
            f"{timeout.total_seconds():g} s (check=True must be given on every rank): {err}"
        ) from err
    if odd:
        raise ValueError(f"{where}: the values of {_ranks(odd)} differ from rank 0's; {advice}")


class _Shard(torch.autograd.Function):
    """Replicated -> sharded. The gradient of a replicated input is the sum of every
    rank's contribution, so the backward gathers the shards' gradients."""

    @staticmethod
    def forward(ctx, x, how, table, dim):
        ctx.args = (how, table, dim)
        return _take(x, how, table, dim)

    @staticmethod
    def backward(ctx, grad):
        how, table, dim = ctx.args
        return _gather(grad, how, table, dim), None, None, None


class _Unshard(torch.autograd.Function):
    """Sharded -> replicated. Every rank holds the same output and the same gradient
    of it, so each shard's gradient is its own slice (no sum over ranks)."""

    @staticmethod
    def forward(ctx, x_local, how, table, dim):
        ctx.args = (how, table, dim)
        return _gather(x_local, how, table, dim)

    @staticmethod
    def backward(ctx, grad):
        how, table, dim = ctx.args
        return _take(grad, how, table, dim), None, None, None


def shard(
    x: torch.Tensor,
    *,
    layout: str | Layout,
    group: dist.ProcessGroup | None = None,
    mesh: object = None,
    dim: int = 1,
    check: bool = False,
    cu_seqlens: object = None,
) -> torch.Tensor:
    """Return this rank's part of the global tensor ``x`` (a contiguous copy).

    ``x`` is the full tensor, identical on every rank; ``dim`` is its sequence
    dimension (1 for ``[batch, seq, heads, head_dim]``), of any length: the
    layout spreads the remainder so that ranks hold at most one token more than
    others (docs/algorithms.md, "Layouts"; some may hold none). ``group``: the ranks the
    sequence is sharded over (1-D strategies); ``mesh``: a DeviceMesh with dims
    ``"ring"`` and ``"ulysses"`` (``strategy="usp"``), where rank (r, u) holds
    ``mesh_pieces(layout, ring, ulysses, r, u)``. Differentiable: the gradient of
    ``x`` is gathered from every rank's shard (a collective in the backward
    pass), as befits a replicated tensor. ``check=True`` (on every rank, collective)
    first verifies that ``x`` is bitwise the same on every rank of the group and raises
    the same ``ValueError`` on each, naming the ranks that differ, when it is not: it
    costs a broadcast of ``x``, so use it while setting up, not in every step.

    ``cu_seqlens``: the offsets ``[0, ..., S]`` of documents packed in the sequence
    (flash-attention's convention; a list, tuple or 1-D integer tensor, the same on
    every rank). ``layout="zigzag"`` is then cut per document: rank ``r`` holds chunk
    ``r`` of every document, then chunk ``2P - 1 - r`` of every document
    (docs/algorithms.md, "Packed sequences"); ``contiguous`` is unchanged. Give
    ``tokenring.attention`` and ``unshard`` the same ``cu_seqlens``.
    """
    layout = parse_enum(Layout, layout, "layout")
    documents, problem = read_documents(cu_seqlens)
    if problem:
        raise ValueError(f"shard: {problem}")
    how = _sharding(layout, group, mesh)
    if check:
        _check_replicated(x, how)
    dim = dim % x.dim()
    if x.shape[dim] == 0:
        raise ValueError(f"shard: the sequence is empty (dim {dim} of shape {tuple(x.shape)})")
    if documents and documents[-1] != x.shape[dim]:
        raise ValueError(
            f"shard: cu_seqlens ends at {documents[-1]}, but the sequence (dim {dim} of shape "
            f"{tuple(x.shape)}) holds {x.shape[dim]} tokens"
        )
    table = piece_table(layout, x.shape[dim], how.world, documents)
    return _Shard.apply(x, how, table, dim)


def _agreed_length(
    how: _Sharding, local: int, seq_len: int | None, device, documents: tuple[int, ...]
) -> int:
    """The global length, from every rank's local length (one small all-gather): every
    rank raises the same ValueError when the parts do not follow the layout."""
    lengths = [local]
    if how.world > 1:
        mine = torch.tensor([local], dtype=torch.int64, device=device)
        every = torch.empty(how.world, dtype=torch.int64, device=device)
        dist.all_gather_into_tensor(every, mine, group=how.group)
        lengths = [int(n) for n in every.tolist()]
    total = sum(lengths) if seq_len is None else seq_len
    if documents and documents[-1] != total:
        raise ValueError(
            f"unshard: cu_seqlens ends at {documents[-1]}, but the parts hold {total} tokens "
            f"together ({lengths} in group rank order)"
        )
    table = piece_table(how.layout, total, how.world, documents) if total >= 0 else None
    expected = [table.tokens(p) for p in how.pieces] if table is not None else None
    if expected != lengths:
        raise ValueError(
            f"unshard: the parts hold {lengths} tokens (in group rank order), but the "
            f"{how.layout.value} layout of {total} tokens over {how.world} ranks gives "
            f"{expected}: shard with tokenring.shard and the same layout, group or mesh"
            + ("" if seq_len is None else ", and pass the global length as seq_len")
        )
    return total


def unshard(
    x_local: torch.Tensor,
    *,
    layout: str | Layout,
    group: dist.ProcessGroup | None = None,
    mesh: object = None,
    dim: int = 1,
    seq_len: int | None = None,
    cu_seqlens: object = None,
) -> torch.Tensor:
    """Gather every rank's shard and return the full tensor, in global order, on every rank.

    ``group`` or ``mesh`` as for ``shard``. The global length is the sum of the
    parts (``seq_len``, if given, must match it); the parts' lengths are checked
    against the layout with one small all-gather, so every rank raises the same
    ``ValueError`` when they do not follow it. Differentiable: every rank is
    assumed to hold the same gradient of the full result (a replicated loss), and
    each shard receives its own slice. ``cu_seqlens``: as given to ``shard``.
    """
    layout = parse_enum(Layout, layout, "layout")
    documents, problem = read_documents(cu_seqlens)
    if problem:
        raise ValueError(f"unshard: {problem}")
    how = _sharding(layout, group, mesh)
    dim = dim % x_local.dim()
    total = _agreed_length(how, x_local.shape[dim], seq_len, x_local.device, documents)
    table = piece_table(layout, total, how.world, documents)
    return _Unshard.apply(x_local, how, table, dim)

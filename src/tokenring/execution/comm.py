"""Lanes over torch.distributed: communicators of their own for a group's data movement.

A *lane* is a process group over the same ranks as the user's group. Moves
that must run concurrently go on different lanes (TokenRing: queries on lane
0, returning partials on lane 1; all-gather: gathers on lane 0, reduce-scatters
on lane 1), so NCCL runs them on different streams, both directions of a link
carry data at once, and nothing queues behind the user's own collectives on
the group. Lanes carry point-to-point batches and flat collectives (all-gather,
all-to-all, reduce-scatter of one buffer: ``collectives.py`` packs them), each
posted asynchronously.

For the default group lanes are made with ``new_group`` like any other group.
For a sub-group only its members take part (torch's
``use_local_synchronization``), which requires, as torch documents, that all
ranks create their process groups in the same order; where ranks belong to
different numbers of groups, call ``tokenring.setup_lanes(group)`` on the
members right after creating ``group``, before creating the next one. The
runtime (``runtime.py``) owns the lanes of each group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["LANE_COUNT", "Lanes", "group_ranks", "group_world", "make_lanes"]

# torch 2.13 renamed the flat collectives (the old names warn); older releases have only those
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

LANE_COUNT = 2
"""Lanes made per group: enough for every strategy (a schedule declares the ones it uses)."""


def group_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(world size, rank) of ``group``; (1, 0) when torch.distributed is not initialized
    and no launcher started several ranks (``_refuse_a_launch_without_a_group``)."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialized")
        _refuse_a_launch_without_a_group()
        return 1, 0
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this rank is not a member of the given group")
    return dist.get_world_size(group), rank


def _refuse_a_launch_without_a_group() -> None:
    """Raise when a launcher (torchrun) started several ranks (``WORLD_SIZE`` > 1) but no
    process group was initialized: each rank would otherwise run alone on its own shard
    and return a wrong result without a word. Asked only where a call found no process
    group, so the distributed path never pays for it; every rank raises the same."""
    size = os.environ.get("WORLD_SIZE", "")
    if size.isdigit() and int(size) > 1:
        raise ValueError(
            f"WORLD_SIZE={size} in the environment (a launcher such as torchrun started "
            f"{size} ranks), but torch.distributed is not initialized, so each rank would "
            "run alone on its own part of the sequence: call "
            "torch.distributed.init_process_group first"
        )


def group_ranks(group: dist.ProcessGroup | None) -> list[int]:
    """Global ranks of ``group`` (default: the world), indexed by group rank."""
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)


@dataclass
class Lanes:
    """The lane process groups of one user group, and this rank's place in it."""

    groups: list[dist.ProcessGroup]
    global_ranks: list[int]
    backend: str
    rank: int

    def p2p(self, tensor: torch.Tensor, peer: int, send: bool, lane: int) -> dist.P2POp:
        """A send of ``tensor`` to group rank ``peer`` (or a receive from it) on ``lane``."""
        op = dist.isend if send else dist.irecv
        return dist.P2POp(op, tensor, self.global_ranks[peer], self.groups[lane])

    def post_ops(self, ops: list[dist.P2POp]) -> list[dist.Work]:
        """Start one lane's point-to-point ``ops`` as one batch.

        Always a batch, even of one: on NCCL a lone ``isend``/``irecv`` runs on a
        separate two-rank communicator that torch creates for the pair, outside
        the lane's in-order stream that the schedules are checked against.
        """
        return dist.batch_isend_irecv(ops)

    def all_to_all_single(self, output: torch.Tensor, tensor: torch.Tensor, lane: int) -> dist.Work:
        """Equal shares: share ``d`` of ``tensor`` goes to member ``d``; share ``s`` of
        ``output`` comes from member ``s``."""
        return dist.all_to_all_single(output, tensor, group=self.groups[lane], async_op=True)

    def all_gather_single(self, output: torch.Tensor, tensor: torch.Tensor, lane: int) -> dist.Work:
        """Share ``s`` of ``output`` receives member ``s``'s ``tensor``."""
        return _ALL_GATHER(output, tensor, group=self.groups[lane], async_op=True)

    def reduce_scatter_single(
        self, output: torch.Tensor, tensor: torch.Tensor, lane: int
    ) -> dist.Work:
        """``output`` receives the sum over members of their share ``me`` of ``tensor``."""
        return _REDUCE_SCATTER(
            output, tensor, op=dist.ReduceOp.SUM, group=self.groups[lane], async_op=True
        )

    def all_reduce(self, tensor: torch.Tensor, lane: int) -> dist.Work:
        """``tensor`` becomes the sum over members, in place."""
        return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.groups[lane], async_op=True)

    def destroy(self) -> None:
        for pg in self.groups:
            dist.destroy_process_group(pg)


def make_lanes(group: dist.ProcessGroup | None, timeout: timedelta) -> Lanes:
    """Create the lanes of ``group`` (collective over its members)."""
    parent = group if group is not None else dist.group.WORLD
    ranks = group_ranks(parent)
    backend = dist.get_backend(parent)
    whole_world = len(ranks) == dist.get_world_size()
    groups = [
        dist.new_group(
            ranks,
            timeout=timeout,
            backend=backend,
            use_local_synchronization=not whole_world,
            group_desc=f"tokenring_lane{lane}",
        )
        for lane in range(LANE_COUNT)
    ]
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None
    for pg in groups:  # initialise every communicator now, with all ranks present
        dist.all_reduce(torch.zeros(1, device=device), group=pg)
    return Lanes(groups, ranks, backend, ranks.index(dist.get_rank()))

"""Point-to-point channels over torch.distributed, one communicator per lane.

A *lane* is a process group over the same ranks as the user's group. Each
strategy puts the transfers that must run concurrently on different lanes
(TokenRing: queries on lane 0, returning partials on lane 1), so NCCL runs
them on different streams and both directions of a link carry data at once.
Lanes are created once per user group and cached; ``destroy_lanes`` releases
them. For the default group they are made with ``new_group`` like any other
group. For a sub-group only its members take part (torch's
``use_local_synchronization``), which requires, as torch documents, that all
ranks create their process groups in the same order; where ranks belong to
different numbers of groups, call ``setup_lanes(group)`` on the members right
after creating ``group``, before creating the next one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_TIMEOUT",
    "Lanes",
    "destroy_lanes",
    "get_lanes",
    "group_ranks",
    "group_world",
    "setup_lanes",
]

DEFAULT_TIMEOUT = timedelta(seconds=float(os.environ.get("TOKENRING_TIMEOUT_S", 300)))
"""How long a transfer may wait for its peer before raising (``TOKENRING_TIMEOUT_S`` overrides)."""

_CACHE: dict[tuple[str, int], Lanes] = {}
_DESTROYED: set[tuple[str, int]] = set()  # sub-group lanes that cannot be made again


def group_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(world size, rank) of ``group``; (1, 0) when torch.distributed is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialized")
        return 1, 0
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this rank is not a member of the given group")
    return dist.get_world_size(group), rank


def group_ranks(group: dist.ProcessGroup | None) -> list[int]:
    """Global ranks of ``group`` (default: the world), indexed by group rank."""
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)


@dataclass
class Lanes:
    """The per-lane process groups of one user group."""

    groups: list[dist.ProcessGroup]
    global_ranks: list[int]
    backend: str
    timeout: timedelta

    def post(
        self, transfers: list[tuple[torch.Tensor, int, bool, int]]
    ) -> dict[int, list[dist.Work]]:
        """Start ``(tensor, group_peer, is_send, lane)`` transfers; one batch per lane.

        Always a batch, even of one: on NCCL a lone ``isend``/``irecv`` runs on a
        separate two-rank communicator that torch creates for the pair, outside
        the lane's in-order stream that the schedules are checked against.
        """
        by_lane: dict[int, list[dist.P2POp]] = {}
        for tensor, peer, is_send, lane in transfers:
            op = dist.isend if is_send else dist.irecv
            by_lane.setdefault(lane, []).append(
                dist.P2POp(op, tensor, self.global_ranks[peer], self.groups[lane])
            )
        return {lane: dist.batch_isend_irecv(by_lane[lane]) for lane in sorted(by_lane)}


def get_lanes(
    group: dist.ProcessGroup | None, count: int = 2, timeout: timedelta = DEFAULT_TIMEOUT
) -> Lanes:
    """The cached lanes of ``group``, creating them (collectively over its ranks) on first use."""
    parent = group if group is not None else dist.group.WORLD
    key = (parent.group_name, count)
    lanes = _CACHE.get(key)
    if lanes is not None:
        return lanes
    if key in _DESTROYED:
        raise RuntimeError(
            "the lanes of this sub-group were destroyed (destroy_lanes); torch would give new "
            "ones the same names and their creation would hang, so they cannot be made again "
            "in this process: call destroy_lanes only at shutdown"
        )
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
        for lane in range(count)
    ]
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None
    for pg in groups:  # initialise every communicator now, with all ranks present
        dist.all_reduce(torch.zeros(1, device=device), group=pg)
    lanes = Lanes(groups, ranks, backend, timeout)
    _CACHE[key] = lanes
    return lanes


def setup_lanes(group: dist.ProcessGroup | None = None) -> None:
    """Create the lanes of ``group`` now (collective over its members; see the module docstring)."""
    get_lanes(group)


def destroy_lanes() -> None:
    """Destroy every lane process group this library created."""
    while _CACHE:
        key, lanes = _CACHE.popitem()
        if len(lanes.global_ranks) != dist.get_world_size():
            _DESTROYED.add(key)
        for pg in lanes.groups:
            dist.destroy_process_group(pg)

"""The first call of a kind agrees across ranks: every rank raises the same error.

Each rank describes its call (``tokenring.call.checks``) and records its own first
problem instead of raising; the ranks exchange those descriptions once per distinct
description and group, and every rank raises the same ``ValueError``: the first
rank's own problem, or the first difference between ranks. Raising on one rank only
would leave the others waiting in a transfer that never comes. See docs/errors.md.
"""

from __future__ import annotations

import torch.distributed as dist

from ..call.checks import FIELDS, CallInfo
from .state import BoundedCache

__all__ = ["check_across_ranks"]


def check_across_ranks(
    info: CallInfo, group: dist.ProcessGroup | None, world: int, agreed: BoundedCache
) -> None:
    """Raise the same ValueError on every rank if any rank's call is wrong or they disagree.

    Exchanges ``info`` over ``group`` unless this description is in ``agreed``
    (the group's memory of descriptions all ranks agreed on, which it joins).
    """
    if world == 1:
        if info.problem:
            raise ValueError(info.problem)
        return
    if info in agreed:
        return
    parent = group if group is not None else dist.group.WORLD
    gathered: list[CallInfo | None] = [None] * world
    dist.all_gather_object(gathered, info, group=parent)
    for rank, other in enumerate(gathered):
        if other is not None and other.problem:
            raise ValueError(f"rank {rank}: {other.problem}")
    reference = gathered[0]
    for rank, other in enumerate(gathered):
        if other.agreement_key() != reference.agreement_key():  # type: ignore[union-attr]
            diffs = [
                f"{f}: rank 0 has {getattr(reference, f)!r}, rank {rank} has {getattr(other, f)!r}"
                for f in FIELDS
                if getattr(reference, f) != getattr(other, f)
            ]
            raise ValueError("inputs differ across ranks: " + "; ".join(diffs))
    agreed.put(info, True)

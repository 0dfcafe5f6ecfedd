"""What the integrations share: how many ranks a sequence is sharded over."""

from __future__ import annotations

import torch.distributed as dist

from ..runtime import runtime

__all__ = ["sharded_over"]


def sharded_over(group: dist.ProcessGroup | None, mesh: object) -> int:
    """The number of ranks ``tokenring.shard`` splits a sequence over, for ``group``
    (default: the world; 1 without torch.distributed) or ``mesh`` (its ring x ulysses)."""
    if mesh is not None:
        return runtime().sp_mesh(mesh).size
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)

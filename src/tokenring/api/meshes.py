"""``sp_mesh``: a ring x ulysses DeviceMesh for ``strategy="usp"``, known to the runtime
from the start (so compiled calls can find it by name)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from ..runtime import runtime
from ..runtime.meshes import RING_DIM, ULYSSES_DIM

__all__ = ["sp_mesh"]


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def sp_mesh(
    *, ulysses: int, ring: int, device_type: str | None = None, ulysses_inner: bool = True
) -> DeviceMesh:
    """A mesh over the default group with dims ``"ring"`` and ``"ulysses"``.

    ``ulysses * ring`` ranks form one sequence-parallel group; when the world
    is a larger multiple of it, a leading ``"dp"`` dim holds the copies.
    ``ulysses_inner=True`` puts each Ulysses group on neighbouring ranks (on
    one node: the fast links carry the all-to-alls); ``False`` puts each ring
    on neighbouring ranks. ``device_type``: default ``"cuda"`` under NCCL, else
    ``"cpu"``. Collective: every rank of the default group calls it.
    """
    ulysses, ring = _positive("ulysses", ulysses), _positive("ring", ring)
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("sp_mesh needs torch.distributed to be initialized")
    world = dist.get_world_size()
    size = ulysses * ring
    if world % size:
        raise ValueError(
            f"sp_mesh(ulysses={ulysses}, ring={ring}) needs a world size divisible by "
            f"{size}, got {world}"
        )
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    dp = world // size
    ranks = torch.arange(world)
    if ulysses_inner:
        grid = ranks.view(dp, ring, ulysses)
    else:
        grid = ranks.view(dp, ulysses, ring).transpose(1, 2).contiguous()
    if dp == 1:
        mesh = DeviceMesh(device_type, grid[0], mesh_dim_names=(RING_DIM, ULYSSES_DIM))
    else:
        mesh = DeviceMesh(device_type, grid, mesh_dim_names=("dp", RING_DIM, ULYSSES_DIM))
    runtime().sp_mesh(mesh)
    return mesh

"""2-D sequence-parallel meshes: ``sp_mesh`` makes one, ``SpMesh`` reads any.

The Ulysses x ring hybrid (``strategy="usp"``) runs over a
``torch.distributed.device_mesh.DeviceMesh`` with dims named ``"ring"`` and
``"ulysses"`` (and, outside them, any others, such as a leading ``"dp"``):
Ulysses over the ``ulysses`` dim, TokenRing or ring over the ``ring`` dim.
A rank's *sequence-parallel group* is the ring x ulysses sub-mesh it is in;
its *logical rank* in it is ``ring_rank * ulysses + ulysses_rank``.
Which tokens each rank holds: ``layouts.mesh_pieces``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

__all__ = ["RING_DIM", "ULYSSES_DIM", "SpMesh", "sp_mesh"]

RING_DIM = "ring"
ULYSSES_DIM = "ulysses"


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
    from .runtime import runtime  # the runtime reads meshes; made here, this one is known

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


@dataclass(frozen=True)
class SpMesh:
    """This rank's place in a mesh's ring x ulysses sub-mesh."""

    ring: int  # members of the ring dim
    ulysses: int  # members of the ulysses dim
    r: int  # this rank on the ring dim
    u: int  # this rank on the ulysses dim
    ring_group: dist.ProcessGroup
    ulysses_group: dist.ProcessGroup
    members: tuple[int, ...]  # global ranks of the sub-mesh, by logical rank r * ulysses + u

    @classmethod
    def of(cls, mesh: object) -> SpMesh:
        """Read ``mesh`` (any ``DeviceMesh`` with dims ``"ring"`` and ``"ulysses"``); a
        ``ValueError`` says what is missing."""
        if not isinstance(mesh, DeviceMesh):
            kind = type(mesh).__name__
            raise ValueError(f"mesh must be a torch.distributed DeviceMesh, got {kind}")
        names = tuple(mesh.mesh_dim_names or ())
        missing = [d for d in (RING_DIM, ULYSSES_DIM) if d not in names]
        if missing:
            raise ValueError(
                f"mesh needs dims named 'ring' and 'ulysses' (tokenring.sp_mesh makes one); "
                f"it has {names or 'no names'}"
            )
        coordinate = mesh.get_coordinate()
        if coordinate is None:
            raise ValueError("this rank is not in the mesh")
        index = tuple(
            slice(None) if name in (RING_DIM, ULYSSES_DIM) else coordinate[i]
            for i, name in enumerate(names)
        )
        sub = mesh.mesh[index]
        if names.index(RING_DIM) > names.index(ULYSSES_DIM):
            sub = sub.transpose(0, 1)
        return cls(
            ring=mesh.size(names.index(RING_DIM)),
            ulysses=mesh.size(names.index(ULYSSES_DIM)),
            r=coordinate[names.index(RING_DIM)],
            u=coordinate[names.index(ULYSSES_DIM)],
            ring_group=mesh.get_group(RING_DIM),
            ulysses_group=mesh.get_group(ULYSSES_DIM),
            members=tuple(int(g) for g in sub.reshape(-1).tolist()),
        )

    @property
    def size(self) -> int:
        return self.ring * self.ulysses

    @property
    def rank(self) -> int:
        """The logical rank, ``r * ulysses + u``."""
        return self.r * self.ulysses + self.u

    def coords(self, logical: int) -> tuple[int, int]:
        return divmod(logical, self.ulysses)

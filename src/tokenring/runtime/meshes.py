"""2-D sequence-parallel meshes: ``SpMesh`` reads any (``tokenring.sp_mesh`` makes one).

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

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

__all__ = ["RING_DIM", "ULYSSES_DIM", "SpMesh"]

RING_DIM = "ring"
ULYSSES_DIM = "ulysses"


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

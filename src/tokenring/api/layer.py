"""``SequenceParallelAttention``: the attention functions as a module, configured once."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..options import AUTO, JointStrategy, Layout, RingImpl, Strategy, parse_enum, parse_strategy
from ..runtime.meshes import SpMesh
from .attention import attention

__all__ = ["SequenceParallelAttention"]


class SequenceParallelAttention(nn.Module):
    """Exact attention over a sequence sharded across ranks, as a layer.

    Configured once: ``strategy`` (any of ``tokenring.Strategy``, or ``"auto"``: the
    planner's pick per call shape, over ``group`` or, given ``mesh``, TokenRing or ring
    across it), where it runs (``group`` for the 1-D strategies, ``mesh`` for
    ``"usp"``), ``layout``,
    ``kernel``, ``ring_impl`` (``usp``: what runs across the ring axis),
    ``softmax_scale`` and ``deterministic``; the options are checked here, so a
    typo fails at construction. ``forward`` takes this rank's shards like
    ``tokenring.attention`` (and the replicated joint tensors, for MM-DiT) and
    returns what it returns. No parameters: projections stay in the model.
    """

    def __init__(
        self,
        strategy: str | Strategy = "tokenring",
        *,
        mesh: object = None,
        group: dist.ProcessGroup | None = None,
        layout: str | Layout = "contiguous",
        kernel: str = "auto",
        ring_impl: str | RingImpl = "tokenring",
        softmax_scale: float | None = None,
        deterministic: bool = False,
    ):
        super().__init__()
        self.strategy = AUTO if strategy == AUTO else parse_strategy(strategy)
        self.layout = parse_enum(Layout, layout, "layout")
        self.ring_impl = parse_enum(RingImpl, ring_impl, "ring_impl")
        if self.strategy == AUTO:
            if mesh is not None and group is not None:
                raise ValueError("strategy='auto' runs over group= or mesh=, not both")
            if mesh is not None:
                SpMesh.of(mesh)
        elif self.strategy is Strategy.USP:
            if mesh is None or group is not None:
                raise ValueError("strategy='usp' needs mesh= (tokenring.sp_mesh), not group=")
            SpMesh.of(mesh)  # the mesh has the dims usp needs
        elif mesh is not None:
            raise ValueError(f"mesh= is for strategy='usp'; {self.strategy.value!r} takes group=")
        elif self.ring_impl is not RingImpl.TOKENRING:
            raise ValueError(f"ring_impl= is for strategy='usp', not {self.strategy.value!r}")
        self.mesh = mesh
        self.group = group
        self.kernel = kernel
        self.softmax_scale = softmax_scale
        self.deterministic = deterministic

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool = False,
        joint_q: torch.Tensor | None = None,
        joint_k: torch.Tensor | None = None,
        joint_v: torch.Tensor | None = None,
        joint_strategy: str | JointStrategy = "none",
        return_lse: bool = False,
    ):
        """``tokenring.attention`` with this layer's configuration."""
        usp = self.strategy is Strategy.USP or (self.strategy == AUTO and self.mesh is not None)
        return attention(
            q,
            k,
            v,
            strategy=self.strategy,
            causal=causal,
            softmax_scale=self.softmax_scale,
            layout=self.layout,
            group=None if usp else self.group,
            mesh=self.mesh if usp else None,
            ring_impl=self.ring_impl,
            return_lse=return_lse,
            kernel=self.kernel,
            deterministic=self.deterministic,
            joint_q=joint_q,
            joint_k=joint_k,
            joint_v=joint_v,
            joint_strategy=joint_strategy,
        )

    def extra_repr(self) -> str:
        where = "mesh" if self.mesh is not None else "group" if self.group is not None else "world"
        return (
            f"strategy={getattr(self.strategy, 'value', self.strategy)}, "
            f"layout={self.layout.value}, kernel={self.kernel}, "
            f"ring_impl={self.ring_impl.value}, over={where}"
        )

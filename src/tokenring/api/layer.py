"""``SequenceParallelAttention``: the attention functions as a module, configured once."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..call.description import AUTO, Options
from ..options import JointStrategy, Layout, RingImpl, Strategy
from ..runtime.meshes import SpMesh
from .attention import hashable, run

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
        self.options = Options.checked(
            strategy=strategy, layout=layout, kernel=kernel, ring_impl=ring_impl,
            softmax_scale=softmax_scale, deterministic=deterministic,
        )  # fmt: skip
        chosen = self.options.strategy
        if chosen == AUTO:
            if mesh is not None and group is not None:
                raise ValueError("strategy='auto' runs over group= or mesh=, not both")
            if mesh is not None:
                SpMesh.of(mesh)
        elif chosen is Strategy.USP:
            if mesh is None or group is not None:
                raise ValueError("strategy='usp' needs mesh= (tokenring.sp_mesh), not group=")
            SpMesh.of(mesh)  # the mesh has the dims usp needs
        elif mesh is not None:
            raise ValueError(f"mesh= is for strategy='usp'; {chosen.value!r} takes group=")
        elif self.options.ring_impl is not RingImpl.TOKENRING:
            raise ValueError(f"ring_impl= is for strategy='usp', not {chosen.value!r}")
        self.mesh = mesh
        self.group = group

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
        joint_mask: torch.Tensor | None = None,
        seq_len: int | None = None,
        window_size: tuple[int, int] | None = None,
        cu_seqlens: object = None,
        sinks: torch.Tensor | None = None,
        return_lse: bool = False,
    ):
        """``tokenring.attention`` with this layer's configuration (``seq_len``: the
        global length, for shards of unequal length; ``window_size`` and ``cu_seqlens``:
        the mask beyond ``causal``, ``joint_mask`` and ``sinks``, as there)."""
        options = _with_call_options(
            self.options, causal, joint_strategy, seq_len, window_size, cu_seqlens
        )
        return run(
            q, k, v, (joint_q, joint_k, joint_v), options, group=self.group, mesh=self.mesh,
            recorder=None, return_lse=return_lse, sinks=sinks, joint_mask=joint_mask,
        )  # fmt: skip

    def extra_repr(self) -> str:
        where = "mesh" if self.mesh is not None else "group" if self.group is not None else "world"
        o = self.options
        return (
            f"strategy={getattr(o.strategy, 'value', o.strategy)}, "
            f"layout={o.layout.value}, kernel={o.kernel}, "
            f"ring_impl={o.ring_impl.value}, over={where}"
        )


def _with_call_options(
    options: Options, causal, joint_strategy, seq_len, window_size, cu_seqlens
) -> tuple:
    """A forward's options: the layer's, with this call's mask, joint side and length
    (as raw values, parsed and checked like ``tokenring.attention``'s)."""
    return (
        options.strategy, options.ring_impl, options.layout, causal, options.softmax_scale,
        options.kernel, options.deterministic, joint_strategy, seq_len, hashable(window_size),
        hashable(cu_seqlens),
    )  # fmt: skip

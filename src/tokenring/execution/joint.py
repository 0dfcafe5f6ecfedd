"""Joint tokens (MM-DiT's text tokens): replicated on every rank, attended with the image.

``joint_q``, ``joint_k``, ``joint_v`` are ``[B, J, H, D]``, the same full tensors on
every rank of the sequence-parallel group. The result equals attention over the
concatenated sequence (joint tokens in front of the image tokens, or behind:
without a mask the order does not change the maths): every image query
attends every image key and every joint key once; every joint query attends
every image key and every joint key. A ``mask`` (``joint_mask``: a text's
padding, rows of a batch may differ) takes a row's padded joint tokens out of
every query's keys, in the blocks that have joint keys.

Joint keys and values never move: they are where every query is. Per rank,
on top of the strategy's own work:

- its image queries against the joint keys: one local block, merged into the
  strategy's result (in fp32, before the output is rounded);
- the joint queries against its own shard of image keys: one local block
  whose partial result (out, lse; ``J`` rows) is all-gathered over the group
  and merged, in rank order, with the joint queries against the joint keys,
  so every rank holds the same ``joint_out``.

Backward: each rank's ``joint_*.grad`` is its *share*; summed over the group it
is the unsharded gradient when each rank's loss takes the ``joint_out`` term
divided by the group size (the gradients of the shared output add up over
the ranks that each hold it). Blocks that touch this rank's image keys need
the whole gradient of ``joint_out``, so it is all-reduced first (``J`` rows);
the joint-against-joint block uses this rank's own, so that summing the
shares counts it once. See docs/algorithms.md, "Joint tokens".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .comm import Lanes
from .kernels import KernelBackend
from .kernels.base import accum_dtype
from .merge import merge_into, write_into

__all__ = ["Joint", "JointComm", "joint_backward", "joint_forward"]

LANE = 0


@dataclass(frozen=True)
class Joint:
    """The joint tensors of a call (``q`` may be None: joint keys only); ``mask``: bool
    ``[B, J]``, the real joint tokens of each row (padded ones are nobody's keys)."""

    q: torch.Tensor | None
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class JointComm:
    """The collectives the joint path needs over the sequence-parallel group, with its
    members in the order partials are merged (None on one rank)."""

    lanes: Lanes | None

    def gather(self, tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Every member's ``tensors`` (the same shapes on each), in group-rank order:
        one all-gather of all of them packed as bytes."""
        if self.lanes is None:
            return [tensors]
        flat = torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in tensors])
        out = flat.new_empty(len(self.lanes.global_ranks) * flat.numel())
        self.lanes.all_gather_single(out, flat, LANE).wait()
        members = []
        for share in out.view(len(self.lanes.global_ranks), -1):
            parts, offset = [], 0
            for t in tensors:
                n = t.numel() * t.element_size()
                parts.append(share[offset : offset + n].view(t.dtype).view(t.shape))
                offset += n
            members.append(parts)
        return members

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the group (in place)."""
        if self.lanes is not None:
            self.lanes.all_reduce(tensor, LANE).wait()
        return tensor


def joint_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    joint: Joint,
    kernel: KernelBackend,
    scale: float,
    comm: JointComm,
    fused: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Merge the image queries' joint block into ``out`` (``[B, L, H, D]``, fp32) and
    ``lse`` (``[B, H, L]``) in place; return ``(joint_out, joint_lse)``
    (``joint_out`` fp32 ``[B, J, H, D]``, ``joint_lse`` ``[B, H, J]``), or Nones without
    joint queries."""
    part, part_lse = kernel.forward(q, joint.k, joint.v, False, scale, key_mask=joint.mask)
    merge_into(out, lse, part, part_lse, fused=fused)
    if joint.q is None:
        return None, None
    mine = kernel.forward(joint.q, k, v, False, scale)
    own, own_lse = kernel.forward(joint.q, joint.k, joint.v, False, scale, key_mask=joint.mask)
    wide = accum_dtype(q.dtype)
    jo = torch.empty(own.shape, dtype=wide, device=own.device)
    jlse = torch.empty(own_lse.shape, dtype=wide, device=own.device)
    write_into(jo, jlse, own, own_lse)
    for member_part, member_lse in comm.gather(list(mine)):
        merge_into(jo, jlse, member_part, member_lse, fused=fused)
    return jo, jlse


def joint_backward(
    grad_out: torch.Tensor,
    grad_joint_out: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    joint: Joint,
    joint_out: torch.Tensor | None,
    joint_lse: torch.Tensor | None,
    kernel: KernelBackend,
    scale: float,
    comm: JointComm,
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...]]:
    """The joint blocks' gradients: ``(dq, dk, dv)`` to add to the image shard's and this
    rank's shares ``(djq, djk, djv)`` (see the module docstring). ``out``, ``lse``: the
    image queries' final output and LSE (``[B, L, H, D]``, ``[B, H, L]``)."""
    wide = accum_dtype(q.dtype)

    def delta(do: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        return (do.to(wide) * o.to(wide)).sum(-1).transpose(1, 2)

    dq, djk, djv = kernel.backward(
        grad_out, q, joint.k, joint.v, out, lse, delta(grad_out, out), False, scale,
        key_mask=joint.mask,
    )  # fmt: skip
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    djq = None
    if joint.q is not None:
        assert joint_out is not None and joint_lse is not None
        own = grad_joint_out if grad_joint_out is not None else torch.zeros_like(joint_out)
        whole = comm.sum(own.to(wide).clone()).to(own.dtype)  # the gradient of the shared output
        jo = joint_out.to(q.dtype)
        djq, dk, dv = kernel.backward(
            whole, joint.q, k, v, jo, joint_lse, delta(whole, jo), False, scale
        )
        djq_own, djk_own, djv_own = kernel.backward(
            own.to(q.dtype), joint.q, joint.k, joint.v, jo, joint_lse, delta(own, jo), False,
            scale, key_mask=joint.mask,
        )  # fmt: skip
        djq = djq + djq_own
        djk = djk + djk_own
        djv = djv + djv_own
    return (dq, dk, dv), (djq, djk, djv)

"""The forward and backward passes of one call, and the autograd function around them.

Both are shared by eager calls (``_ShardedAttention``) and compiled ones (the
custom ops of ``ops.py``). A call on one rank is one kernel call each way: its
schedule would be a single block, so the executor is skipped (same maths, no
slot buffers, the host time of the kernel call alone). Joint tokens' blocks
(``joint.py``) run on top of the strategy's result.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .executor import Execution, run_backward, run_forward
from .joint import Joint, JointComm, joint_backward, joint_forward
from .kernels.base import accum_dtype, hides_nan_in, restore_query_nan
from .plan import Plan

__all__ = ["PreparedCall", "ShardedAttention", "backward_pass", "forward_pass"]


@dataclass(frozen=True)
class PreparedCall:
    """One call's plan and how it runs (its joint-token collectives, when it has some)."""

    plan: Plan
    ex: Execution
    comm: JointComm | None = None


def forward_pass(call: PreparedCall, q, k, v, joint: Joint | None, lse_wanted: bool = True):
    """``(out, lse, joint_out, joint_lse)``: ``lse`` float32 ``[B, H, L]``, contiguous where
    ``lse_wanted`` (a caller that drops it spares the copy); the joint results None
    without joint queries."""
    plan, ex = call.plan, call.ex
    p = plan.description
    # a kernel that hides a query's NaN runs unguarded here (``calls._prepare``): the
    # NaN rows are restored once per call, on this rank's own rows, whoever computed them
    hidden = hides_nan_in(ex.kernel, q)
    if plan.site.world == 1:
        mask = plan.whole_mask(q.device)
        out, lse = ex.kernel.forward(q, k, v, p.causal and mask is None, p.scale, mask)
    else:
        out, lse = run_forward(plan.forward_geometry, q, k, v, ex, keep_accum=joint is not None)
    jo = jlse = None
    if joint is not None:
        out, lse = out.to(accum_dtype(p.dtype)), lse.contiguous()
        jo, jlse = joint_forward(
            q, k, v, out, lse, joint, ex.kernel, p.scale, call.comm, ex.fused_merge
        )
        out = out.to(p.dtype)
        jo = jo.to(p.dtype) if jo is not None else None
        if joint.q is not None and hides_nan_in(ex.kernel, joint.q):
            jo, jlse = restore_query_nan(joint.q, jo, jlse)
    if hidden:
        out, lse = restore_query_nan(q, out, lse)
    if lse_wanted and not lse.is_contiguous():  # a check, not a dispatched no-op
        lse = lse.contiguous()
    return out, lse, jo, jlse


def backward_pass(
    call: PreparedCall, grad_out, grad_jo, q, k, v, out, lse, joint: Joint | None, jo, jlse,
    grad_lse=None,
):  # fmt: skip
    """``(dq, dk, dv)`` and, with joint tokens, this rank's shares ``(djq, djk, djv)``
    (``djq`` None without joint queries); ``lse`` as ``forward_pass`` returned it.

    ``grad_lse`` (``[B, H, L]``, or None): the gradient of the LSE, without joint tokens.
    Since ``d lse / d s_ij = p_ij``, it enters as ``delta - grad_lse`` where every
    block's backward forms ``p * (dp - delta)``: no other change to any schedule."""
    plan = call.plan
    p = plan.description
    kernel = plan.backward_kernel
    if plan.site.world == 1:
        wide = accum_dtype(p.dtype)
        delta = (grad_out.to(wide) * out.to(wide)).sum(-1).transpose(1, 2)
        if grad_lse is not None:  # the kernel forms delta from ``delta``, not ``out``
            delta = delta - grad_lse.to(wide)
        mask = plan.whole_mask(q.device)
        dq, dk, dv = kernel.backward(
            grad_out, q, k, v, out if grad_lse is None else None, lse, delta,
            p.causal and mask is None, p.scale, mask,
        )  # fmt: skip
    else:
        dq, dk, dv = run_backward(
            plan.backward_geometry,
            {
                "q": q,
                "k": k,
                "v": v,
                "out": out,
                "do": grad_out,
                "lse": lse.permute(2, 0, 1).contiguous(),
                **({"dlse": grad_lse.permute(2, 0, 1)} if grad_lse is not None else {}),
            },
            replace(call.ex, kernel=kernel),
        )
    shares = (None, None, None)
    if joint is not None:
        (aq, ak, av), shares = joint_backward(
            grad_out, grad_jo, q, k, v, out, lse, joint, jo, jlse, kernel, p.scale, call.comm
        )
        dq, dk, dv = dq + aq, dk + ak.to(dk.dtype), dv + av.to(dv.dtype)
    return (dq, dk, dv), shares


class ShardedAttention(torch.autograd.Function):
    """Thin autograd wrapper for eager calls that need gradients."""

    @staticmethod
    def forward(ctx, q, k, v, jq, jk, jv, jmask, call: PreparedCall):
        joint = Joint(jq, jk, jv, jmask) if jk is not None else None
        out, lse, jo, jlse = forward_pass(call, q, k, v, joint)
        ctx.call = call
        ctx.has = (jq is not None, joint is not None)
        ctx.set_materialize_grads(False)  # an unused LSE's gradient stays None
        ctx.save_for_backward(q, k, v, out, lse, jq, jk, jv, jmask, jo, jlse)
        if joint is not None:  # with joint tokens the LSEs are for inspection only
            ctx.mark_non_differentiable(lse)
        if jlse is not None:
            ctx.mark_non_differentiable(jlse)
        return out, lse, jo, jlse

    @staticmethod
    def backward(ctx, grad_out, grad_lse, grad_jo, grad_jlse):
        del grad_jlse
        q, k, v, out, lse, jq, jk, jv, jmask, jo, jlse = ctx.saved_tensors
        has_q, has_joint = ctx.has
        joint = Joint(jq if has_q else None, jk, jv, jmask) if has_joint else None
        if grad_out is None:  # only the LSE was used
            grad_out = torch.zeros_like(out)
        if grad_jo is None and jo is not None:
            grad_jo = torch.zeros_like(jo)
        (dq, dk, dv), (djq, djk, djv) = backward_pass(
            ctx.call, grad_out, grad_jo, q, k, v, out, lse, joint, jo, jlse,
            None if has_joint else grad_lse,
        )  # fmt: skip
        return dq, dk, dv, djq, djk, djv, None, None

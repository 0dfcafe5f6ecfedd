"""The attention call as ``torch.library`` custom ops, for ``torch.compile``.

Under ``torch.compile`` Dynamo must never trace into process groups, plans or
the executor. So ``tokenring.attention`` turns what it was given into plain
values (strategy and option names, numbers, and the *names* of the process
groups, which Dynamo reads at trace time) and calls ``tokenring::attention``,
one opaque op with a fake (shape-only) implementation and a registered
backward, ``tokenring::attention_backward``. At run time the op finds the
groups by name in the runtime, plans (cached, as in eager calls) and runs the
same passes as an eager call (``passes.py``), so compiled and eager calls
give the same results.

Groups and meshes must be known to the runtime before a compiled call:
the default group always is; others become known by one eager call, by
``tokenring.setup_lanes(group)`` / ``setup_lanes(mesh=mesh)``, and meshes made
by ``tokenring.sp_mesh`` are known from the start.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..call.description import Options
from ..execution.joint import Joint
from ..execution.kernels.base import accum_dtype
from ..execution.passes import PreparedCall, backward_pass, forward_pass
from .calls import call_by_names

__all__ = ["attention_backward_op", "attention_op"]

Outputs = tuple[Tensor, Tensor, Tensor, Tensor]
Grads = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def _call(q, k, v, joint: tuple, options: str, grad: bool, group: str, ring_group: str,
          ulysses_group: str) -> PreparedCall:  # fmt: skip
    return call_by_names(
        q, k, v, joint, Options.decode(options), group=group, ring_group=ring_group,
        ulysses_group=ulysses_group, wants_grad=grad,
    )  # fmt: skip


@torch.library.custom_op("tokenring::attention", mutates_args=())
def attention_op(
    q: Tensor, k: Tensor, v: Tensor, joint_q: Tensor | None, joint_k: Tensor | None,
    joint_v: Tensor | None, options: str, grad: bool, group: str, ring_group: str,
    ulysses_group: str,
) -> Outputs:  # fmt: skip
    """``(out, lse, joint_out, joint_lse)``, the joint ones empty without joint queries.
    ``options``: ``Options.encode()`` of the call's options; the groups by name."""
    joint = (joint_q, joint_k, joint_v)
    call = _call(q, k, v, joint, options, grad, group, ring_group, ulysses_group)
    out, lse, jo, jlse = forward_pass(
        call, q, k, v, Joint(joint_q, joint_k, joint_v) if joint_k is not None else None
    )
    return (
        out.contiguous(),
        lse,
        jo.contiguous() if jo is not None else q.new_empty(0),
        jlse.contiguous() if jlse is not None else q.new_empty(0, dtype=torch.float32),
    )


@attention_op.register_fake
def _(q, k, v, joint_q, joint_k, joint_v, *config) -> Outputs:
    b, length, heads, _ = q.shape
    wide = accum_dtype(q.dtype)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty((b, heads, length), dtype=wide)
    if joint_q is None:
        return out, lse, q.new_empty(0), q.new_empty(0, dtype=torch.float32)
    jo = torch.empty_like(joint_q, memory_format=torch.contiguous_format)
    return out, lse, jo, q.new_empty((b, heads, joint_q.shape[1]), dtype=wide)


@torch.library.custom_op("tokenring::attention_backward", mutates_args=())
def attention_backward_op(
    grad_out: Tensor, grad_joint_out: Tensor | None, grad_lse: Tensor | None, q: Tensor,
    k: Tensor, v: Tensor,
    out: Tensor, lse: Tensor, joint_q: Tensor | None, joint_k: Tensor | None,
    joint_v: Tensor | None, joint_out: Tensor | None, joint_lse: Tensor | None, options: str,
    grad: bool, group: str, ring_group: str, ulysses_group: str,
) -> Grads:  # fmt: skip
    """``(dq, dk, dv, djq, djk, djv)``, the joint ones empty where there is no such input."""
    call = _call(q, k, v, (joint_q, joint_k, joint_v), options, grad, group, ring_group,
                 ulysses_group)  # fmt: skip
    joint = Joint(joint_q, joint_k, joint_v) if joint_k is not None else None
    (dq, dk, dv), shares = backward_pass(
        call, grad_out, grad_joint_out, q, k, v, out, lse, joint, joint_out, joint_lse,
        grad_lse if joint is None else None,
    )  # fmt: skip
    return (dq.contiguous(), dk.contiguous(), dv.contiguous(),
            *(s.contiguous() if s is not None else q.new_empty(0) for s in shares))  # fmt: skip


@attention_backward_op.register_fake
def _(grad_out, grad_joint_out, grad_lse, q, k, v, out, lse, joint_q, joint_k, joint_v,
      *rest) -> Grads:  # fmt: skip
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    return (
        like(q), like(k), like(v),
        *(like(t) if t is not None else q.new_empty(0) for t in (joint_q, joint_k, joint_v)),
    )  # fmt: skip


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, jq, jk, jv, *config = inputs
    out, lse, jo, jlse = output
    ctx.save_for_backward(q, k, v, out, lse, jq, jk, jv, jo, jlse)
    ctx.config = config


def _backward(ctx, grad_out, grad_lse, grad_jo, grad_jlse):
    q, k, v, out, lse, jq, jk, jv, jo, jlse = ctx.saved_tensors
    has_q = jq is not None
    if grad_out is None:  # only the LSE was used
        grad_out = torch.zeros_like(out)
    grads = attention_backward_op(
        grad_out, grad_jo if has_q else None, grad_lse, q, k, v, out, lse, jq, jk, jv,
        jo if has_q else None, jlse if has_q else None, *ctx.config,
    )  # fmt: skip
    dq, dk, dv, djq, djk, djv = grads
    joint = (
        djq if has_q else None,
        djk if jk is not None else None,
        djv if jv is not None else None,
    )
    return (dq, dk, dv, *joint, *([None] * len(ctx.config)))


attention_op.register_autograd(_backward, setup_context=_setup_context)

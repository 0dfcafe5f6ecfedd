"""Public attention functions.

All take this rank's shard of the sequence in the flash-attention layout
and return this rank's shard of the output::

    q: [batch, seq_local, heads_q, head_dim]
    k, v: [batch, seq_local, heads_kv, head_dim]      heads_q % heads_kv == 0
    out: like q;  lse (return_lse=True): float32 [batch, heads_q, seq_local]

The shards must come from ``tokenring.shard`` with the same ``layout`` (or
follow its contract, see ``tokenring.layouts``). With ``causal=True`` query
token i sees key tokens j <= i in *global* positions; the diagonal of each
rank's own block is the global diagonal::

    zigzag, P=2, chunks c0..c3; rank 0 holds (c0, c3), rank 1 holds (c1, c2)

            k: c0  c1  c2  c3
    q: c0     \\
       c1     ##  \\
       c2     ##  ##  \\
       c3     ##  ##  ##  \\

Works without torch.distributed (a single rank) and under any process group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from .comm import Lanes, get_lanes, group_world
from .executor import Problem, run_backward, run_forward
from .kernels import BlockSpec, KernelBackend, select_kernel
from .options import Layout, Pass, Strategy, parse_enum
from .schedules import build_schedule
from .timeline import Recorder
from .validation import check_across_ranks, check_local, with_problem

__all__ = ["attention", "ring_attn", "token_ring_attn"]


@dataclass(frozen=True)
class _Plan:
    """Everything a call decided before running: shared by its forward and backward."""

    strategy: Strategy
    layout: Layout
    world: int
    rank: int
    problem: Problem
    kernel_choice: str
    forward_kernel: KernelBackend
    deterministic: bool

    def schedule(self, pass_: Pass):
        return build_schedule(
            self.strategy, self.layout, self.world, self.rank, self.problem.causal, pass_
        )

    def backward_kernel(self) -> KernelBackend:
        p = self.problem
        spec = BlockSpec(
            p.device.type,
            p.dtype,
            p.head_dim,
            p.heads_q,
            p.heads_kv,
            p.causal,
            backward=True,
            deterministic=self.deterministic,
        )
        return select_kernel(self.kernel_choice, spec)


def _plan(
    q, k, v, *, strategy, causal, softmax_scale, layout, group, kernel, deterministic
) -> _Plan:
    """Check the call on every rank (same error everywhere) and decide how to run it."""
    world, rank = group_world(group)
    info = check_local(
        q, k, v, causal=causal, layout=layout, strategy=strategy, kernel=kernel, scale=softmax_scale
    )
    chosen = None
    if not info.problem:
        spec = BlockSpec(q.device.type, q.dtype, q.shape[3], q.shape[2], k.shape[2], causal)
        wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        try:
            chosen = select_kernel(kernel, spec)
            if wants_grad and deterministic:  # refuse now rather than in the backward
                select_kernel(kernel, replace(spec, backward=True, deterministic=True))
        except ValueError as err:
            info = with_problem(info, str(err))
    check_across_ranks(info, group, world)
    if chosen is None:
        raise AssertionError("check_across_ranks let a failed call through")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[3])
    problem = Problem(
        batch=q.shape[0],
        length=q.shape[1],
        heads_q=q.shape[2],
        heads_kv=k.shape[2],
        head_dim=q.shape[3],
        dtype=q.dtype,
        device=q.device,
        causal=causal,
        scale=float(scale),
    )
    return _Plan(
        parse_enum(Strategy, strategy, "strategy"),
        parse_enum(Layout, layout, "layout"),
        world,
        rank,
        problem,
        str(kernel),
        chosen,
        deterministic,
    )


_PLANS: dict[tuple, _Plan] = {}
_MAX_PLANS = 256


def _call_key(q, k, v, group, options: tuple) -> tuple | None:
    """What a plan depends on (None if the inputs cannot be keyed: validate every time)."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return None
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    group_key = None if group is None else getattr(group, "group_name", id(group))
    key = (
        *((t.shape, t.dtype, t.device, t.stride(-1)) for t in (q, k, v)),
        group_key,
        dist.is_available() and dist.is_initialized(),
        wants_grad,
        *options,
    )
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _cached_plan(q, k, v, group, **options) -> _Plan:
    """``_plan`` for this call, reused for later calls with the same shapes and options
    (the checks and the cross-rank exchange then run once per distinct call)."""
    # keyed by type too: causal=1 must not reuse the plan of causal=True (1 == True)
    key = _call_key(q, k, v, group, tuple((n, type(v_), v_) for n, v_ in sorted(options.items())))
    plan = _PLANS.get(key) if key is not None else None
    if plan is None:
        plan = _plan(q, k, v, group=group, **options)
        if key is not None:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.pop(next(iter(_PLANS)))
            _PLANS[key] = plan
    return plan


class _ShardedAttention(torch.autograd.Function):
    """Thin autograd wrapper: forward and backward are schedules run by the executor."""

    @staticmethod
    def forward(ctx, q, k, v, plan: _Plan, lanes: Lanes | None, recorder: Recorder | None):
        out, lse_rowmajor = run_forward(
            plan.schedule(Pass.FORWARD),
            plan.problem,
            q,
            k,
            v,
            plan.forward_kernel,
            lanes,
            recorder,
        )
        ctx.plan = plan
        ctx.lanes = lanes
        ctx.recorder = recorder
        ctx.save_for_backward(q, k, v, out, lse_rowmajor)
        lse = lse_rowmajor.permute(1, 2, 0).contiguous()
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        del grad_lse  # lse is returned for inspection; it is not differentiable
        q, k, v, out, lse = ctx.saved_tensors
        plan: _Plan = ctx.plan
        dq, dk, dv = run_backward(
            plan.schedule(Pass.BACKWARD),
            plan.problem,
            {"q": q, "k": k, "v": v, "out": out, "do": grad_out, "lse": lse},
            plan.backward_kernel(),
            ctx.lanes,
            ctx.recorder,
        )
        return dq, dk, dv, None, None, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    strategy: str | Strategy = "tokenring",
    causal: bool = False,
    softmax_scale: float | None = None,
    layout: str | Layout = "contiguous",
    group: dist.ProcessGroup | None = None,
    return_lse: bool = False,
    kernel: str = "auto",
    deterministic: bool = False,
    recorder: Recorder | None = None,
):
    """Exact attention over a sequence sharded across the ranks of ``group``.

    ``strategy``: ``"tokenring"`` (queries travel, K and V stay) or ``"ring"``
    (K and V travel). ``kernel``: ``"auto"`` or a backend name (see
    ``tokenring.kernels.kernel_names()``). ``deterministic`` refuses kernels
    whose backward is not bitwise reproducible. ``recorder`` (optional)
    collects a per-step timeline and byte counts of the forward and backward passes.

    Raises ``ValueError`` with the same message on every rank for bad input.
    """
    plan = _cached_plan(
        q,
        k,
        v,
        group,
        strategy=strategy,
        causal=causal,
        softmax_scale=softmax_scale,
        layout=layout,
        kernel=kernel,
        deterministic=deterministic,
    )
    lanes = get_lanes(group) if plan.world > 1 else None
    out, lse = _ShardedAttention.apply(q, k, v, plan, lanes, recorder)
    return (out, lse) if return_lse else out


def token_ring_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    layout: str | Layout = "contiguous",
    group: dist.ProcessGroup | None = None,
    return_lse: bool = False,
    kernel: str = "auto",
    deterministic: bool = False,
):
    """TokenRing attention: Q travels around the ring, each partial output goes
    straight back to its owner on a second communicator, K and V never move.

    See ``attention`` for arguments and shapes, docs/algorithms.md for the schedule.
    """
    return attention(
        q,
        k,
        v,
        strategy=Strategy.TOKENRING,
        causal=causal,
        softmax_scale=softmax_scale,
        layout=layout,
        group=group,
        return_lse=return_lse,
        kernel=kernel,
        deterministic=deterministic,
    )


def ring_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    layout: str | Layout = "contiguous",
    group: dist.ProcessGroup | None = None,
    return_lse: bool = False,
    kernel: str = "auto",
    deterministic: bool = False,
):
    """Ring attention (pass-KV), the baseline: K and V travel, Q stays.

    See ``attention`` for arguments and shapes, docs/algorithms.md for the schedule.
    """
    return attention(
        q,
        k,
        v,
        strategy=Strategy.RING,
        causal=causal,
        softmax_scale=softmax_scale,
        layout=layout,
        group=group,
        return_lse=return_lse,
        kernel=kernel,
        deterministic=deterministic,
    )

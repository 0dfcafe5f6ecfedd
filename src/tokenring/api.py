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
``attention`` is the one definition; ``token_ring_attn``, ``ring_attn``,
``ulysses_attn`` and ``allgather_attn`` are generated from it, one per
strategy, with its signature less ``strategy``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property

import torch
import torch.distributed as dist

from .comm import group_world
from .executor import Execution, run_backward, run_forward
from .kernels import BlockSpec, KernelBackend, select_kernel
from .options import Layout, Pass, Strategy, parse_enum
from .runtime import GroupRuntime, runtime
from .schedules import STRATEGIES, Schedule, ScheduleKey, build_schedule
from .slots import Problem
from .timeline import Recorder
from .validation import check_across_ranks, check_local, with_problem

__all__ = ["allgather_attn", "attention", "ring_attn", "token_ring_attn", "ulysses_attn"]


@dataclass(frozen=True)
class Plan:
    """Everything a call decided before running: shared by its forward and backward."""

    strategy: Strategy
    layout: Layout
    world: int
    rank: int
    problem: Problem
    kernel_choice: str
    forward_kernel: KernelBackend
    deterministic: bool

    def _schedule(self, pass_: Pass) -> Schedule:
        p = self.problem
        key = ScheduleKey(
            self.strategy, self.layout, self.world, self.rank, p.causal, pass_, p.heads_q,
            p.heads_kv,
        )  # fmt: skip
        return build_schedule(key)

    @cached_property
    def forward(self) -> Schedule:
        return self._schedule(Pass.FORWARD)

    @cached_property
    def backward(self) -> Schedule:
        return self._schedule(Pass.BACKWARD)

    @cached_property
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
    q, k, v, *, state: GroupRuntime, strategy, causal, softmax_scale, layout, group, kernel,
    deterministic,
) -> Plan:  # fmt: skip
    """Check the call on every rank (same error everywhere) and decide how to run it."""
    world, rank = group_world(group)
    info = check_local(
        q, k, v, causal=causal, layout=layout, strategy=strategy, kernel=kernel,
        scale=softmax_scale, world=world,
    )  # fmt: skip
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
    check_across_ranks(info, group, world, state.agreed)
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
    return Plan(
        parse_enum(Strategy, strategy, "strategy"),
        parse_enum(Layout, layout, "layout"),
        world,
        rank,
        problem,
        str(kernel),
        chosen,
        deterministic,
    )


def _call_key(q, k, v, options: tuple) -> tuple | None:
    """What a plan depends on (None if the inputs cannot be keyed: validate every time)."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return None
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    key = (
        *((t.shape, t.dtype, t.device, t.stride(-1)) for t in (q, k, v)),
        dist.is_available() and dist.is_initialized(),
        wants_grad,
        *options,
    )
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _cached_plan(q, k, v, state: GroupRuntime, group, **options) -> Plan:
    """``_plan`` for this call, reused for later calls with the same shapes and options
    (the checks and the cross-rank exchange then run once per distinct call)."""
    # keyed by type too: causal=1 must not reuse the plan of causal=True (1 == True)
    key = _call_key(q, k, v, tuple((n, type(v_), v_) for n, v_ in sorted(options.items())))
    plan = state.plans.get_fresh(key) if key is not None else None
    if plan is None:
        plan = _plan(q, k, v, state=state, group=group, **options)
        if key is not None:
            state.plans.put(key, plan)
    return plan


class _ShardedAttention(torch.autograd.Function):
    """Thin autograd wrapper: forward and backward are schedules run by the executor."""

    @staticmethod
    def forward(ctx, q, k, v, plan: Plan, ex: Execution):
        out, lse_rowmajor = run_forward(plan.forward, plan.problem, q, k, v, ex)
        ctx.plan = plan
        ctx.ex = ex
        ctx.save_for_backward(q, k, v, out, lse_rowmajor)
        lse = lse_rowmajor.permute(1, 2, 0).contiguous()
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        del grad_lse  # lse is returned for inspection; it is not differentiable
        q, k, v, out, lse = ctx.saved_tensors
        plan: Plan = ctx.plan
        dq, dk, dv = run_backward(
            plan.backward,
            plan.problem,
            {"q": q, "k": k, "v": v, "out": out, "do": grad_out, "lse": lse},
            replace(ctx.ex, kernel=plan.backward_kernel),
        )
        return dq, dk, dv, None, None


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

    ``strategy``: ``"tokenring"`` (queries travel, K and V stay), ``"ring"`` (K and
    V travel), ``"ulysses"`` (all-to-all to head shards of the whole sequence) or
    ``"allgather"`` (K and V gathered whole); docs/algorithms.md says what each
    moves. ``causal``: the global causal mask. ``softmax_scale``: default
    ``1/sqrt(head_dim)``. ``layout``: how the sequence is sharded
    (``tokenring.shard``). ``group``: the process group the sequence is sharded
    over (default: the world). ``return_lse``: also return the float32 LSE
    ``[batch, heads_q, seq_local]``. ``kernel``: ``"auto"`` or a backend name
    (``tokenring.kernel_names()``). ``deterministic`` refuses kernels whose
    backward is not bitwise reproducible. ``recorder`` (optional) collects a
    per-step timeline and byte counts of the forward and backward passes.

    Raises ``ValueError`` with the same message on every rank for bad input,
    including a strategy that cannot run the call (with the reason, and what
    would work).
    """
    rt = runtime()
    state = rt.group(group)
    plan = _cached_plan(
        q,
        k,
        v,
        state,
        group,
        strategy=strategy,
        causal=causal,
        softmax_scale=softmax_scale,
        layout=layout,
        kernel=kernel,
        deterministic=deterministic,
    )
    lanes = rt.lanes(group) if plan.world > 1 else None
    settings = rt.settings
    ex = Execution(plan.forward_kernel, lanes, settings.timeout, settings.fused_merge, recorder)
    out, lse = _ShardedAttention.apply(q, k, v, plan, ex)
    return (out, lse) if return_lse else out


_PER_STRATEGY = inspect.signature(attention).replace(
    parameters=[
        p
        for p in inspect.signature(attention).parameters.values()
        if p.name not in ("strategy", "recorder")
    ]
)
_OPTIONS = frozenset(_PER_STRATEGY.parameters) - {"q", "k", "v"}


def _strategy_function(name: str, strategy: Strategy) -> Callable:
    """``attention`` with ``strategy`` fixed: same signature (less ``strategy``), own summary."""

    def call(q, k, v, **options):
        unknown = options.keys() - _OPTIONS
        if unknown:
            raise TypeError(f"{name}() got unexpected keyword argument(s) {sorted(unknown)}")
        return attention(q, k, v, strategy=strategy, **options)

    call.__name__ = call.__qualname__ = name
    call.__module__ = __name__
    call.__signature__ = _PER_STRATEGY  # type: ignore[attr-defined]
    call.__doc__ = (
        f"{STRATEGIES[strategy].summary}\n\n"
        f"``tokenring.attention(q, k, v, strategy={strategy.value!r}, ...)``: see ``attention``\n"
        "for arguments and shapes, docs/algorithms.md for the schedule."
    )
    return call


token_ring_attn = _strategy_function("token_ring_attn", Strategy.TOKENRING)
ring_attn = _strategy_function("ring_attn", Strategy.RING)
ulysses_attn = _strategy_function("ulysses_attn", Strategy.ULYSSES)
allgather_attn = _strategy_function("allgather_attn", Strategy.ALLGATHER)

"""Public attention functions.

All take this rank's shard of the sequence in the flash-attention layout
and return this rank's shard of the output::

    q: [batch, seq_local, heads_q, head_dim]
    k, v: [batch, seq_local, heads_kv, head_dim]      heads_q % heads_kv == 0
    out: like q;  lse (return_lse=True): float32 [batch, heads_q, seq_local]

The shards must come from ``tokenring.shard`` with the same ``layout`` (and
``group`` or ``mesh``), or follow its contract (``tokenring.layouts``). With
``causal=True`` query token i sees key tokens j <= i in *global* positions;
the diagonal of each rank's own block is the global diagonal::

    zigzag, P=2, chunks c0..c3; rank 0 holds (c0, c3), rank 1 holds (c1, c2)

            k: c0  c1  c2  c3
    q: c0     \\
       c1     ##  \\
       c2     ##  ##  \\
       c3     ##  ##  ##  \\

Works without torch.distributed (a single rank) and under any process group.
``attention`` is the one definition; ``token_ring_attn``, ``ring_attn``,
``ulysses_attn`` and ``allgather_attn`` are generated from it, one per
strategy, with its signature less ``strategy``, ``mesh`` and ``ring_impl``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property

import torch
import torch.distributed as dist

from .comm import Lanes, group_world
from .executor import Execution, run_backward, run_forward
from .joint import Joint, JointComm, joint_backward, joint_forward
from .kernels import BlockSpec, KernelBackend, select_kernel
from .kernels.base import accum_dtype
from .options import JointStrategy, Layout, Pass, RingImpl, Strategy, parse_enum
from .runtime import GroupRuntime, Runtime, runtime
from .schedules import STRATEGIES, Schedule, ScheduleKey, build_schedule
from .schedules.ir import GROUP_AXIS
from .schedules.usp import RING_AXIS, ULYSSES_AXIS
from .slots import Problem
from .timeline import Recorder
from .validation import check_across_ranks, check_local, with_problem

__all__ = ["allgather_attn", "attention", "ring_attn", "token_ring_attn", "ulysses_attn"]


@dataclass(frozen=True)
class Site:
    """Where a call runs: the sequence-parallel group (checks, plans, joint tokens), this
    rank's place in it, and the process group of each axis a schedule moves data on."""

    world: int
    rank: int
    ulysses: int
    group: dist.ProcessGroup | None
    axes: dict[str, dist.ProcessGroup | None]

    @cached_property
    def key(self) -> tuple:
        """What distinguishes two sites of one group (two meshes over the same ranks)."""
        names = tuple(
            (axis, getattr(g, "group_name", None)) for axis, g in sorted(self.axes.items())
        )
        return (self.world, self.rank, self.ulysses, names)


def _site(strategy: object, group, mesh, ring_impl: object, rt: Runtime) -> Site:
    """Resolve ``group`` (1-D strategies) or ``mesh`` (``usp``); refuses a wrong pairing on
    the calling rank, before any communication (like a group this rank is not in)."""
    usp = strategy in (Strategy.USP, Strategy.USP.value)
    if not usp:
        if mesh is not None:
            raise ValueError(f"mesh= is for strategy='usp'; strategy {strategy!r} takes group=")
        if ring_impl not in (RingImpl.TOKENRING, RingImpl.TOKENRING.value):
            raise ValueError(f"ring_impl= is for strategy='usp', not strategy {strategy!r}")
        world, rank = group_world(group)
        return Site(world, rank, 1, group, {GROUP_AXIS: group})
    if group is not None:
        raise ValueError("strategy='usp' runs over mesh=, not group=")
    if mesh is None:
        raise ValueError(
            "strategy='usp' needs mesh=: a DeviceMesh with dims 'ring' and 'ulysses' "
            "(tokenring.sp_mesh makes one)"
        )
    sp = rt.sp_mesh(mesh)
    return Site(
        sp.size,
        sp.rank,
        sp.ulysses,
        rt.sp_group(sp.members),
        {RING_AXIS: sp.ring_group, ULYSSES_AXIS: sp.ulysses_group},
    )


@dataclass(frozen=True)
class Plan:
    """Everything a call decided before running: shared by its forward and backward."""

    strategy: Strategy
    ring_impl: Strategy
    layout: Layout
    site: Site
    problem: Problem
    kernel_choice: str
    forward_kernel: KernelBackend
    deterministic: bool

    def _schedule(self, pass_: Pass) -> Schedule:
        p, site = self.problem, self.site
        key = ScheduleKey(
            self.strategy, self.layout, site.world, site.rank, p.causal, pass_, p.heads_q,
            p.heads_kv, site.ulysses, self.ring_impl,
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
    q, k, v, joint: tuple, *, site: Site, state: GroupRuntime, strategy, ring_impl, causal,
    softmax_scale, layout, kernel, deterministic, joint_strategy,
) -> Plan:  # fmt: skip
    """Check the call on every rank (same error everywhere) and decide how to run it."""
    info = check_local(
        q, k, v, causal=causal, layout=layout, strategy=strategy, ring_impl=ring_impl,
        kernel=kernel, scale=softmax_scale, world=site.world, ulysses=site.ulysses,
        joint=joint, joint_strategy=joint_strategy,
    )  # fmt: skip
    chosen = None
    if not info.problem:
        spec = BlockSpec(q.device.type, q.dtype, q.shape[3], q.shape[2], k.shape[2], causal)
        tensors = (q, k, v, *(t for t in joint if t is not None))
        wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        try:
            chosen = select_kernel(kernel, spec)
            if wants_grad and deterministic:  # refuse now rather than in the backward
                select_kernel(kernel, replace(spec, backward=True, deterministic=True))
        except ValueError as err:
            info = with_problem(info, str(err))
    check_across_ranks(info, site.group, site.world, state.agreed)
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
        Strategy(parse_enum(RingImpl, ring_impl, "ring_impl").value),
        parse_enum(Layout, layout, "layout"),
        site,
        problem,
        str(kernel),
        chosen,
        deterministic,
    )


def _call_key(tensors: tuple, options: tuple) -> tuple | None:
    """What a plan depends on (None if the inputs cannot be keyed: validate every time)."""
    if not all(isinstance(t, torch.Tensor) for t in tensors[:3]):
        return None
    present = [t for t in tensors if isinstance(t, torch.Tensor)]
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in present)
    key = (
        *((t.shape, t.dtype, t.device, t.stride(-1)) if t is not None else None for t in tensors),
        dist.is_available() and dist.is_initialized(),
        wants_grad,
        *options,
    )
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _cached_plan(q, k, v, joint: tuple, site: Site, state: GroupRuntime, **options) -> Plan:
    """``_plan`` for this call, reused for later calls with the same shapes and options
    (the checks and the cross-rank exchange then run once per distinct call)."""
    # keyed by type too: causal=1 must not reuse the plan of causal=True (1 == True)
    typed = tuple((n, type(v_), v_) for n, v_ in sorted(options.items()))
    key = _call_key((q, k, v, *joint), (site.key, *typed))
    plan = state.plans.get_fresh(key) if key is not None else None
    if plan is None:
        plan = _plan(q, k, v, joint, site=site, state=state, **options)
        if key is not None:
            state.plans.put(key, plan)
    return plan


class _ShardedAttention(torch.autograd.Function):
    """Thin autograd wrapper: forward and backward are schedules run by the executor, and
    the joint tokens' blocks (``joint.py``) on top."""

    @staticmethod
    def forward(ctx, q, k, v, jq, jk, jv, plan: Plan, ex: Execution, comm: JointComm | None):
        p = plan.problem
        joint = Joint(jq, jk, jv) if jk is not None else None
        out, lse_rowmajor = run_forward(plan.forward, p, q, k, v, ex, keep_accum=joint is not None)
        jo = jlse = None
        if joint is not None:
            out = out.to(accum_dtype(p.dtype))
            jo, jlse = joint_forward(
                q, k, v, out, lse_rowmajor, joint, ex.kernel, p.scale, comm, ex.fused_merge
            )
            out = out.to(p.dtype)
            jo = jo.to(p.dtype) if jo is not None else None
        ctx.plan, ctx.ex, ctx.comm = plan, ex, comm
        ctx.has = (jq is not None, joint is not None)
        ctx.save_for_backward(q, k, v, out, lse_rowmajor, jq, jk, jv, jo, jlse)
        lse = lse_rowmajor.permute(1, 2, 0).contiguous()
        ctx.mark_non_differentiable(lse)
        if jlse is not None:
            ctx.mark_non_differentiable(jlse)
        return out, lse, jo, jlse

    @staticmethod
    def backward(ctx, grad_out, grad_lse, grad_jo, grad_jlse):
        del grad_lse, grad_jlse  # LSEs are returned for inspection; not differentiable
        q, k, v, out, lse, jq, jk, jv, jo, jlse = ctx.saved_tensors
        plan: Plan = ctx.plan
        kernel = plan.backward_kernel
        dq, dk, dv = run_backward(
            plan.backward,
            plan.problem,
            {"q": q, "k": k, "v": v, "out": out, "do": grad_out, "lse": lse},
            replace(ctx.ex, kernel=kernel),
        )
        djq = djk = djv = None
        has_q, has_joint = ctx.has
        if has_joint:
            joint = Joint(jq if has_q else None, jk, jv)
            (aq, ak, av), (djq, djk, djv) = joint_backward(
                grad_out, grad_jo, q, k, v, out, lse.permute(1, 2, 0), joint, jo, jlse, kernel,
                plan.problem.scale, ctx.comm,
            )  # fmt: skip
            dq, dk, dv = dq + aq, dk + ak.to(dk.dtype), dv + av.to(dv.dtype)
        return dq, dk, dv, djq, djk, djv, None, None, None


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
    mesh: object = None,
    ring_impl: str | RingImpl = "tokenring",
    return_lse: bool = False,
    kernel: str = "auto",
    deterministic: bool = False,
    joint_q: torch.Tensor | None = None,
    joint_k: torch.Tensor | None = None,
    joint_v: torch.Tensor | None = None,
    joint_strategy: str | JointStrategy = "none",
    recorder: Recorder | None = None,
):
    """Exact attention over a sequence sharded across the ranks of ``group`` (or ``mesh``).

    ``strategy``: ``"tokenring"`` (queries travel, K and V stay), ``"ring"`` (K and
    V travel), ``"ulysses"`` (all-to-all to head shards of the whole sequence),
    ``"allgather"`` (K and V gathered whole) or ``"usp"`` (Ulysses over ``mesh``'s
    ``"ulysses"`` dim x ``ring_impl``, TokenRing or ring, over its ``"ring"`` dim;
    ``tokenring.sp_mesh`` makes such a mesh); docs/algorithms.md says what each
    moves. ``causal``: the global causal mask. ``softmax_scale``: default
    ``1/sqrt(head_dim)``. ``layout``: how the sequence is sharded
    (``tokenring.shard``). ``group``: the process group the sequence is sharded
    over (default: the world); ``usp`` takes ``mesh`` instead. ``return_lse``: also
    return the float32 LSE ``[batch, heads_q, seq_local]``. ``kernel``: ``"auto"``
    or a backend name (``tokenring.kernel_names()``). ``deterministic`` refuses
    kernels whose backward is not bitwise reproducible. ``recorder`` (optional)
    collects a per-step timeline and byte counts of the forward and backward passes.

    Joint tokens (MM-DiT text tokens), non-causal only: ``joint_k``, ``joint_v``
    ``[batch, joint_len, heads_kv, head_dim]`` and optionally ``joint_q``
    ``[batch, joint_len, heads_q, head_dim]``, the same full tensors on every rank
    (replicated, not sharded), with ``joint_strategy="front"`` or ``"rear"``
    (where they sit in the concatenated sequence ``cat([joint, image])`` or
    ``cat([image, joint])``). Image queries attend every image and joint key;
    joint queries attend every image and joint key. With ``joint_q`` the call
    returns ``(out, joint_out)`` (``joint_out`` ``[batch, joint_len, heads_q,
    head_dim]``, identical on every rank), each followed by its LSE with
    ``return_lse=True``. Gradients: q, k, v get their shard's; each rank's
    ``joint_*.grad`` is that rank's share, and summed over the group it equals
    the unsharded model's gradient when each rank's loss takes the ``joint_out``
    term divided by the group size.

    Raises ``ValueError`` with the same message on every rank for bad input,
    including a strategy that cannot run the call (with the reason, and what
    would work).
    """
    rt = runtime()
    site = _site(strategy, group, mesh, ring_impl, rt)
    state = rt.group(site.group)
    joint = (joint_q, joint_k, joint_v)
    plan = _cached_plan(
        q,
        k,
        v,
        joint,
        site,
        state,
        strategy=strategy,
        ring_impl=ring_impl,
        causal=causal,
        softmax_scale=softmax_scale,
        layout=layout,
        kernel=kernel,
        deterministic=deterministic,
        joint_strategy=joint_strategy,
    )
    lanes: dict[str, Lanes] = {}
    if site.world > 1:
        used = {lane.axis for lane in (*plan.forward.lanes, *plan.backward.lanes)}
        lanes = {axis: rt.lanes(site.axes[axis]) for axis in sorted(used)}
    comm = None
    if joint_k is not None:
        comm = JointComm(rt.lanes(site.group) if site.world > 1 else None)
    settings = rt.settings
    ex = Execution(plan.forward_kernel, lanes, settings.timeout, settings.fused_merge, recorder)
    out, lse, jo, jlse = _ShardedAttention.apply(q, k, v, joint_q, joint_k, joint_v, plan, ex, comm)
    if joint_q is None:
        return (out, lse) if return_lse else out
    return (out, lse, jo, jlse) if return_lse else (out, jo)


_HIDDEN = ("strategy", "mesh", "ring_impl", "recorder")
_PER_STRATEGY = inspect.signature(attention).replace(
    parameters=[
        p for p in inspect.signature(attention).parameters.values() if p.name not in _HIDDEN
    ]
)
_OPTIONS = frozenset(_PER_STRATEGY.parameters) - {"q", "k", "v"}


def _strategy_function(name: str, strategy: Strategy) -> Callable:
    """``attention`` with ``strategy`` fixed: same signature (less ``strategy``, ``mesh``
    and ``ring_impl``), its own summary."""

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

"""Planning a call: where it runs (``Site``), and everything it decided before running
(``Plan``), checked on every rank.

A plan is made once per distinct call (shapes, dtypes, options, where): the
checks and the cross-rank exchange run then, and later identical calls reuse
it (``api.prepared_call`` keeps them in ``runtime.GroupRuntime.calls``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property

import torch.distributed as dist

from .comm import group_world
from .kernels import BlockSpec, KernelBackend, select_kernel
from .options import Layout, Pass, RingImpl, Strategy, parse_enum, parse_strategy
from .runtime import GroupRuntime, Runtime
from .schedules import Schedule, ScheduleKey, build_schedule
from .schedules.ir import GROUP_AXIS
from .schedules.usp import RING_AXIS, ULYSSES_AXIS
from .slots import Problem, SlotGeometry
from .validation import check_across_ranks, check_local, with_problem

__all__ = ["Plan", "Site", "make_plan", "site_of"]


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


def site_of(strategy: object, group, mesh, ring_impl: object, rt: Runtime) -> Site:
    """Resolve ``group`` (1-D strategies) or ``mesh`` (``usp``); refuses a wrong pairing on
    the calling rank, before any communication (like a group this rank is not in)."""
    usp = strategy in (Strategy.USP, Strategy.USP.value)
    if not usp:
        if mesh is not None:
            raise ValueError(f"mesh= is for strategy='usp'; strategy {strategy!r} takes group=")
        if ring_impl not in (RingImpl.TOKENRING, RingImpl.TOKENRING.value):
            raise ValueError(f"ring_impl= is for strategy='usp', not strategy {strategy!r}")
        world, rank = group_world(group)
        if world > 1:
            rt.remember(group)
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
    stream_tail: bool

    def _schedule(self, pass_: Pass) -> Schedule:
        p, site = self.problem, self.site
        key = ScheduleKey(
            self.strategy, self.layout, site.world, site.rank, p.causal, pass_, p.heads_q,
            p.heads_kv, site.ulysses, self.ring_impl, self.stream_tail,
        )  # fmt: skip
        return build_schedule(key)

    @cached_property
    def forward(self) -> Schedule:
        return self._schedule(Pass.FORWARD)

    @cached_property
    def backward(self) -> Schedule:
        return self._schedule(Pass.BACKWARD)

    @cached_property
    def forward_geometry(self) -> SlotGeometry:
        return SlotGeometry(self.forward, Pass.FORWARD, self.problem)

    @cached_property
    def backward_geometry(self) -> SlotGeometry:
        return SlotGeometry(self.backward, Pass.BACKWARD, self.problem)

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


def make_plan(
    q, k, v, joint: tuple, *, site: Site, state: GroupRuntime, wants_grad: bool,
    stream_tail_min: int, strategy, ring_impl, causal, softmax_scale, layout, kernel,
    deterministic, joint_strategy,
) -> Plan:  # fmt: skip
    """Check the call on every rank (same error everywhere) and decide how to run it.
    Collective over the group the first time a description is seen."""
    info = check_local(
        q, k, v, causal=causal, layout=layout, strategy=strategy, ring_impl=ring_impl,
        kernel=kernel, scale=softmax_scale, world=site.world, ulysses=site.ulysses,
        joint=joint, joint_strategy=joint_strategy,
    )  # fmt: skip
    chosen = None
    if not info.problem:
        spec = BlockSpec(q.device.type, q.dtype, q.shape[3], q.shape[2], k.shape[2], causal)
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
        parse_strategy(strategy),
        Strategy(parse_enum(RingImpl, ring_impl, "ring_impl").value),
        parse_enum(Layout, layout, "layout"),
        site,
        problem,
        str(kernel),
        chosen,
        deterministic,
        q.numel() >= stream_tail_min,
    )

"""A call's plan: where it runs (``Site``), and everything it decided before running
(``Plan``): schedules, slot geometry, kernels.

A plan is made once per distinct call (shapes, dtypes, options, where), after the
checks and the cross-rank agreement (``tokenring.api.calls``); later identical
calls reuse it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch.distributed as dist

from ..options import Layout, Pass, RingImpl, Strategy, parse_enum, parse_strategy
from ..schedules import Schedule, ScheduleKey, build_schedule
from ..schedules.geometry import Geometry, piece_table
from ..schedules.masks import Mask
from .kernels import BlockSpec, KernelBackend, select_kernel
from .slots import Problem, SlotGeometry

__all__ = ["Plan", "Site", "build_plan"]


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
    seq_len: int

    def _schedule(self, pass_: Pass) -> Schedule:
        p, site = self.problem, self.site
        table = piece_table(self.layout, self.seq_len, site.world)
        key = ScheduleKey(
            self.strategy, self.layout, site.world, site.rank, Geometry.self_attention(table),
            Mask(p.causal), pass_, p.heads_q, p.heads_kv, site.ulysses, self.ring_impl,
            self.stream_tail,
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


def build_plan(
    q, k, *, site: Site, seq_len: int, kernel: KernelBackend, stream_tail_min: int, strategy,
    ring_impl, causal, softmax_scale, layout, kernel_choice: str, deterministic: bool,
) -> Plan:  # fmt: skip
    """The plan of a call every rank has checked and agreed on (``tokenring.api.calls``)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[3])
    problem = Problem(
        batch=q.shape[0],
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
        kernel_choice,
        kernel,
        deterministic,
        q.numel() >= stream_tail_min,
        seq_len,
    )

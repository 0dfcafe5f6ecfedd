"""``strategy="auto"``: the planner's choice for a call, decided once per call shape.

The decision depends only on what every rank of the group sees alike (the group's
size, the shapes and dtype of the shards, the options, the devices' kind), so
every rank decides the same; the cross-rank check of the call would say so if a
mixed machine made them disagree. Decisions are kept in ``Runtime.auto`` with the
planner's report (``tokenring.runtime().auto``), so ``explain()`` can say why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..execution.comm import group_world
from ..options import AUTO, Layout, RingImpl, Strategy, parse_enum
from ..planner.choose import PlanReport, plan_call
from ..planner.costs import Shape
from ..planner.machine import topology_for
from ..runtime import Runtime

__all__ = ["AUTO", "AutoChoice", "resolve_auto"]


@dataclass(frozen=True)
class AutoChoice:
    """What ``auto`` chose for one call shape, and the report it chose from (None when
    there was nothing to choose: one rank, or no candidate could run the call)."""

    strategy: Strategy
    ring_impl: RingImpl
    report: PlanReport | None


def resolve_auto(rt: Runtime, q, k, *, causal, layout, group, mesh, wants_grad: bool) -> AutoChoice:
    """The strategy (and ring across, for a mesh) ``auto`` runs this call with."""
    sp = rt.sp_mesh(mesh) if mesh is not None else None
    world = sp.size if sp is not None else group_world(group)[0]
    fallback = AutoChoice(Strategy.USP if sp else Strategy.TOKENRING, RingImpl.TOKENRING, None)
    try:
        where = id(mesh) if sp is not None else getattr(group, "group_name", None)
        key = (
            where,
            world,
            tuple(q.shape),
            tuple(k.shape),
            q.dtype,
            q.device.type,
            bool(causal),
            str(layout),
            wants_grad,
        )
    except AttributeError:  # not tensors: the call's own checks say what is wrong
        return fallback
    found = rt.auto.get_fresh(key)
    if found is not None:
        return found
    if world == 1 and sp is None:
        choice = fallback
    else:
        shape = Shape(
            q.shape[1] * world,
            q.shape[0],
            q.shape[2],
            k.shape[2],
            q.shape[3],
            torch.finfo(q.dtype).bits // 8 if q.dtype.is_floating_point else 4,
        )
        report = plan_call(
            topology_for(q.device, world, rt.settings.topology),
            world,
            shape,
            causal=bool(causal),
            layout=parse_enum(Layout, layout, "layout"),
            backward=wants_grad,
            with_usp=False,
            mesh_ulysses=sp.ulysses if sp is not None else None,
            stream_tail_min=rt.settings.stream_tail_min,
        )
        if report.priced:  # else: the call's own checks give the refusal
            best = report.best
            choice = AutoChoice(best.strategy, RingImpl(best.ring_impl.value), report)
        else:
            choice = AutoChoice(fallback.strategy, fallback.ring_impl, report)
    rt.auto.put(key, choice)
    return choice

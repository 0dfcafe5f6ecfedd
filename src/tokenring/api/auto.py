"""``strategy="auto"``: the planner's choice for a call, decided once per call description.

The decision depends only on the call's description (``tokenring.call``), which a
correct call has the same on every rank, and on the runtime's topology setting,
so every rank decides the same; the cross-rank agreement on the resolved
description would say so if a mixed machine made them disagree. Decisions are
kept in ``Runtime.auto`` with the planner's report (``tokenring.runtime().auto``),
so ``explain()`` can say why.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..call.description import CallDescription
from ..execution.plan import Site
from ..options import RingImpl, Strategy
from ..planner.choose import PlanReport, plan_call
from ..planner.machine import auto_topology
from ..planner.topology import Topology
from ..runtime import Runtime
from ..schedules.ir import GROUP_AXIS

__all__ = ["AutoChoice", "resolve_auto", "topology_for"]


@dataclass(frozen=True)
class AutoChoice:
    """What ``auto`` chose for one call, the call as it runs, and the report it chose
    from (None when there was nothing to choose: one rank)."""

    strategy: Strategy
    ring_impl: RingImpl
    report: PlanReport | None
    description: CallDescription

    def reason(self) -> str:
        """Why, in one line: the planner's ``PlanReport.headline``, or why there was no
        choice to make."""
        if self.report is None:
            return f"{self.strategy.value}: one rank, nothing to choose"
        if not self.report.priced:
            return f"{self.strategy.value}: no strategy can run it (the call's checks say why)"
        return self.report.headline()

    def summary(self) -> str:
        """One line: the call's shape and ``reason``."""
        d = self.description
        dtype = str(d.dtype).removeprefix("torch.")
        return (
            f"{d.seq_len} tokens/{d.world} ranks {d.layout.value} {d.mask.describe()} "
            f"heads {d.heads_q}/{d.heads_kv} {dtype} -> {self.reason()}"
        )

    def explain(self) -> str:
        """The call as it runs, then the planner's whole explanation (``explain``)."""
        report = self.report
        why = report.explain() if report is not None and report.priced else self.reason()
        topology = f" on {report.topology}" if report is not None else ""
        return f"{self.description.summary()}{topology}\n{why}"


def _device(call: CallDescription) -> torch.device:
    if call.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(call.device_type)


def topology_for(rt: Runtime, call: CallDescription, world: int) -> Topology:
    """The machine ``auto`` plans ``world`` ranks of ``call``'s devices for, found once per
    topology setting, device type and size (``Runtime.topologies``); a setting that does
    not fit (a file of fewer devices, one that cannot be read) warns then, once, and
    says how to measure the machine: ``auto`` never fails a call for its topology."""
    key = (rt.settings.topology, call.device_type, world)
    found = rt.topologies.get(key)
    if found is None:
        found, problem = auto_topology(_device(call), world, rt.settings.topology)
        if problem is not None:
            warnings.warn(f"tokenring: {problem}", stacklevel=2)
        rt.topologies[key] = found
    return found


def resolve_auto(rt: Runtime, call: CallDescription, site: Site) -> AutoChoice:
    """The strategy (and ring across, on a mesh) ``auto`` runs ``call`` with: the planner's
    fastest for this machine; over a mesh, USP with TokenRing or ring across."""
    mesh = GROUP_AXIS not in site.axes  # over a ring x ulysses mesh
    key = (site.key, call)
    found = rt.auto.get_fresh(key)
    if found is not None:
        return found
    strategy = Strategy.USP if mesh else Strategy.TOKENRING
    ring = RingImpl.TOKENRING
    report = None
    if site.world > 1 or mesh:
        report = plan_call(
            topology_for(rt, call, site.world),
            call,
            backward=call.wants_grad,
            with_usp=False,
            mesh_ulysses=site.ulysses if mesh else None,
            stream_tail_min=rt.settings.stream_tail_min,
        )
    if report is not None and report.priced:  # else: the call's own checks give the refusal
        best = report.best
        strategy, ring = best.strategy, RingImpl(best.ring_impl.value)
    choice = AutoChoice(strategy, ring, report, call.with_strategy(strategy, ring))
    rt.auto.put(key, choice)
    return choice
